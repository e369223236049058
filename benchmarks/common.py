"""Shared helpers: timing, environment facts, result recording."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_DIR = Path(__file__).resolve().parent / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------ timing
class Stat:
    """Median and range of repeated measurements (seconds, or any unit)."""

    def __init__(self, samples):
        self.samples = [float(s) for s in samples]
        if not self.samples:
            raise ValueError("no samples")
        self.median = statistics.median(self.samples)
        self.min = min(self.samples)
        self.max = max(self.samples)

    def to_dict(self):
        return {"median": self.median, "min": self.min, "max": self.max, "n": len(self.samples)}

    def __repr__(self):
        return f"Stat(median={self.median:.4g}, min={self.min:.4g}, max={self.max:.4g})"


def ratio_stat(num: Stat, den: Stat) -> dict:
    """``num.median / den.median``; the range is the min–max of the per-repetition ratios
    (repetitions are interleaved, so sample ``i`` of both ran back to back). With unequal
    sample counts the range is the extreme pairing."""

    def div(a, b):
        return a / b if b else (float("inf") if a else float("nan"))

    if len(num.samples) == len(den.samples):
        paired = [div(a, b) for a, b in zip(num.samples, den.samples)]
        lo, hi = min(paired), max(paired)
    else:
        lo, hi = div(num.min, den.max), div(num.max, den.min)
    return {"median": div(num.median, den.median), "min": lo, "max": hi}


def time_call(fn, *, sync=None, min_time=0.02, max_inner=1000) -> float:
    """Seconds per call of ``fn()``: runs it enough times in a row to last ``min_time``."""
    sync = sync or (lambda: None)
    inner = 1
    while True:
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time or inner >= max_inner:
            return dt / inner
        inner = min(max_inner, max(inner * 2, int(inner * min_time / max(dt, 1e-9)) + 1))


def interleaved(fns: dict, reps: int, **kw) -> dict[str, Stat]:
    """Time each of ``fns`` ``reps`` times, alternating between them each repetition so
    drift (thermal, other load) hits all of them alike."""
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            samples[k].append(time_call(fn, **kw))
    return {k: Stat(v) for k, v in samples.items()}


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def fmt_time(s: Stat, unit="ms") -> str:
    f = {"ms": 1e3, "us": 1e6, "s": 1.0}[unit]
    return f"{s.median * f:.3g} ({s.min * f:.3g}–{s.max * f:.3g})"


# ------------------------------------------------------------------ environment
def git_commit() -> str:
    """The commit checked out when this process started (runs take minutes; others
    commit meanwhile)."""
    return _COMMIT_AT_START


def _git_commit_now() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


_COMMIT_AT_START = _git_commit_now()


def set_threads(n: int | None) -> dict:
    """Limit torch and numba to ``n`` threads (None: leave the defaults); returns the
    thread counts in force, for the record. ``n`` is also exported as ``OMP_NUM_THREADS``,
    which keeps it when the LM runs on a GPU (see ``genlm_bytes_potential.threads``)."""
    import numba
    import torch

    if n:
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return thread_counts()


def thread_counts() -> dict:
    """torch's and numba's thread counts now."""
    import numba
    import torch

    return {"torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads()}


def add_common_args(p) -> None:
    p.add_argument("--date", default=None, help="date to record (default: today)")
    p.add_argument("--machine", default=None, help="machine description to record")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: their defaults)")
    p.add_argument("--no-write", action="store_true", help="print only; save no result (the pages are not regenerated)")


def command_line(module: str, argv) -> str:
    import shlex

    return f"python -m {module} " + shlex.join(list(argv))


def machine_desc(device: str = "cpu") -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        desc = f"{cores}-core CPU, {round(mem)} GiB"
    except (ValueError, OSError, AttributeError):
        desc = f"{cores}-core CPU"
    if device.startswith("cuda"):
        import torch

        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numba", "numpy", "genlm-bytes", "genlm-control", "genlm-backend", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def header(
    workload: str,
    *,
    date: str | None,
    machine: str | None,
    model: str,
    backend: str,
    device: str = "cpu",
    extra: str = "",
    threads: dict | None = None,
    threads_at_end: dict | None = None,
) -> tuple[dict, str]:
    meta = {
        "workload": workload,
        "date": date or _dt.date.today().isoformat(),
        "machine": machine or machine_desc(device),
        "model": model,
        "backend": backend,
        "device": device,
        "commit": git_commit(),
        "versions": versions(),
    }
    v = meta["versions"]
    try:
        meta["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        meta["loadavg_at_end"] = None
    md = (
        f"### {workload} — {meta['date']}\n\n"
        f"- machine: {meta['machine']}; device: {device}\n"
        f"- model: {model}; backend: {backend}\n"
        f"- git commit: `{meta['commit']}`; torch {v['torch']}, numba {v['numba']}, "
        f"genlm-bytes {v['genlm-bytes']}, genlm-control {v['genlm-control']}; "
        f"1-min load average at the end of the run (other jobs share this machine): {meta['loadavg_at_end']}\n"
    )
    if threads:
        meta.update(threads)
        md += f"- threads: torch {threads['torch_threads']}, numba {threads['numba_threads']}"
        if threads_at_end and threads_at_end != {k: threads[k] for k in threads_at_end}:
            # (a GPU run sets torch to one thread at its first LM call: genlm_bytes_potential.threads)
            meta["threads_at_end"] = threads_at_end
            md += f" at the start; torch {threads_at_end['torch_threads']}, numba {threads_at_end['numba_threads']} at the end"
        md += "\n"
    if extra:
        md += extra.rstrip() + "\n"
    return meta, md


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_json(
    meta: dict, results, name: str | None = None, out_dir: Path = RESULTS_DIR, *, key: str = "results"
) -> Path:
    """Save a run as ``{"meta": meta, key: results}`` in ``out_dir`` (named
    ``workload-device-timestamp.json``, spaces as dashes); when ``out_dir`` is ``benchmarks/results``, regenerate
    BENCHMARKS.md, benchmarks/HISTORY.md and the plots from all saved runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    device = re.sub(r"[^a-z0-9]+", "-", (meta.get("device") or "cpu").lower()).strip("-")
    workload = re.sub(r"[^a-z0-9_]+", "-", meta["workload"].lower()).strip("-")  # "GPU tests": gpu-tests
    name = name or f"{workload}-{device}-{stamp}.json"
    path = out_dir / name
    path.write_text(json.dumps({"meta": meta, key: results}, indent=1, default=float))
    if out_dir.resolve() == RESULTS_DIR:
        from benchmarks.report import write_pages

        write_pages()
    return path
