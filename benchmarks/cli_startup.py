"""How long the command line takes to answer before any model is loaded: ``--help``, a
subcommand's ``--help`` and an argument error, each in a fresh interpreter.

    python -m benchmarks.cli_startup [--reps 5] [--root PATH]

``--root`` times another checkout (e.g. an older commit) with this interpreter. The result
goes to ``benchmarks/results/cli-cpu-<time>.json`` and the pages are regenerated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, Stat, add_common_args, command_line, header, save_json

CASES = {
    "--help": ["--help"],
    "sample --help": ["sample", "--help"],
    "argument error": ["sample", "--regex", "a", "--particles", "0"],
}


def time_cli(argv: list[str], root: Path, reps: int) -> Stat:
    """Wall seconds of ``python -m genlm_bytes_potential ARGV`` (a fresh process each time)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "genlm_bytes_potential", *argv], capture_output=True, env=env, cwd=root
        )
        samples.append(time.perf_counter() - t0)
        if proc.returncode not in (0, 2):
            raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    return Stat(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to time (default: this one)")
    add_common_args(p)
    a = p.parse_args(argv)
    results = []
    for name, args in CASES.items():
        s = time_cli(args, a.root.resolve(), a.reps)
        results.append(
            {"name": name, "command": "python -m genlm_bytes_potential " + " ".join(args), "seconds": s.to_dict()}
        )
        print(f"{name:16s} {s.median:.3f} s ({s.min:.3f}–{s.max:.3f})", flush=True)
    meta, _ = header("CLI", date=a.date, machine=a.machine, model="", backend="")
    meta.update(
        command=command_line("benchmarks.cli_startup", sys.argv[1:] if argv is None else argv),
        root=str(a.root),
        reps=a.reps,
    )
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
