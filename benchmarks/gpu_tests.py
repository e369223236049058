"""The backend tests on a CUDA machine, recorded as a result: vLLM's (through the device
kit, its main engine in bf16 there), the paged backend's CUDA graphs and compiled layer,
and the backend contract on every backend present.

    python -m benchmarks.gpu_tests
    python -m benchmarks.gpu_tests --group tests/test_backends_vllm.py --group "tests/test_trie.py -k cuda"

Each ``--group`` (pytest arguments as one string) runs as its own pytest process, all
groups at once (one GPU, separate processes: the vLLM tests mostly wait on engine start-up
while the compiled-layer tests compile on the CPU). Per group: passed, failed, skipped,
seconds and each failure's first line, read from pytest's JUnit XML; a group still running
at ``--timeout`` is interrupted (SIGINT), so pytest still reports the tests it finished.
The run is saved as ``benchmarks/results/gpu-tests-<device>-<time>.json`` (``--no-write``:
printed only).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, add_common_args, command_line, header, save_json

DEFAULT_GROUPS = (
    "tests/test_backends_vllm.py",
    "tests/test_backends_paged.py -k compile",  # the compiled layer: minutes of compiling
    "tests/test_backends_paged.py -k 'not compile'",
    "tests/test_trie.py tests/test_backend_contract.py",
)


@dataclass
class GroupResult:
    """One pytest process: its command line, counts and failures (test id, first line)."""

    command: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    timed_out: bool = False
    returncode: int | None = None
    failures: list[dict] = field(default_factory=list)


def read_junit(path: Path, result: GroupResult) -> GroupResult:
    """Counts and failures of a pytest JUnit XML report into ``result``."""
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test an interrupt (timeout) cut off: not finished
            continue
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            result.failed += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            result.failures.append({"test": test, "message": (message[0] if message else "")[:300]})
        elif case.find("skipped") is not None:
            result.skipped += 1
        else:
            result.passed += 1
    return result


def _interruptible() -> None:
    """In a group's process before pytest starts: SIGINT at its default, so that Python
    turns it into KeyboardInterrupt and pytest still writes its report. A job started in
    the background (``cmd &`` in a script, ``nohup``) has SIGINT ignored, children
    inherit that, and an ignored SIGINT left a cut group with no report at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_groups(groups: list[str], timeout: float) -> list[GroupResult]:
    """Run each group as a pytest process, all at once; wait for all (or the timeout)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, group in enumerate(groups):
            xml = Path(tmp) / f"group{i}.xml"
            args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
            args += shlex.split(group)
            log = open(Path(tmp) / f"group{i}.log", "w")
            procs.append(
                (
                    group,
                    xml,
                    log,
                    time.perf_counter(),
                    # its own process group: a timeout reaches the engine processes vLLM starts too
                    subprocess.Popen(
                        args,
                        cwd=ROOT,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                        preexec_fn=_interruptible,
                    ),
                )
            )
        deadline = time.perf_counter() + timeout
        done: dict[int, float] = {}  # group -> seconds when its process ended
        while len(done) < len(procs) and time.perf_counter() < deadline:
            for i, (_, _, _, t0, proc) in enumerate(procs):
                if i not in done and proc.poll() is not None:
                    done[i] = time.perf_counter() - t0
            time.sleep(0.2)
        results = []
        for i, (group, xml, log, t0, proc) in enumerate(procs):
            result = GroupResult(command=f"python -m pytest {group}")
            if i not in done:  # interrupted, pytest still reports the tests it finished
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                result.timed_out = True
            try:  # whatever the group left running (engine processes)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            result.returncode = proc.returncode
            result.seconds = round(done.get(i, time.perf_counter() - t0), 1)
            log.close()
            if xml.exists():
                read_junit(xml, result)
            elif not result.timed_out:  # pytest died before writing its report: say how
                tail = (Path(log.name).read_text().strip().splitlines() or [""])[-1]
                result.failures.append(
                    {"test": group, "message": f"no report (exit {result.returncode}): {tail}"[:300]}
                )
            results.append(result)
    return results


def main(argv=None) -> list[GroupResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", action="append", default=None, help="pytest arguments of one process (repeat)")
    p.add_argument("--timeout", type=float, default=560.0, help="seconds for all groups together")
    add_common_args(p)
    a = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_groups(a.group or list(DEFAULT_GROUPS), a.timeout)
    meta, _ = header(
        "GPU tests",
        date=a.date,
        machine=a.machine,
        model="the tests' fixtures (tiny Llama over SmolLM2's tokenizer, SmolLM2)",
        backend="vllm, paged, hf, mock",
        device=device,
    )
    meta["command"] = command_line("benchmarks.gpu_tests", sys.argv[1:] if argv is None else argv)
    rows = [asdict(r) for r in results]
    print(json.dumps(rows, indent=1))
    if not a.no_write:
        print("saved", save_json(meta, rows))
    return results


if __name__ == "__main__":
    main()
