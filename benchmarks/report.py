"""BENCHMARKS.md (the current result of each workload) and benchmarks/HISTORY.md (every run),
regenerated from the saved results ``benchmarks/results/*.json``, with the plots beside them.

    python -m benchmarks.report            # after adding or removing result files

Every benchmark script calls :func:`write_pages` after saving its result, so the pages follow
the results; nothing in them is edited by hand. "Current" is the newest run of each group:
workload x device (CPU, or the GPU's name) x model kind (SmolLM2, mock, tiny) x backend;
a run replaces the earlier runs of its group whose cells (K values, grammar x particles, ...)
it covers, so a partial re-run stands beside the full run.

Result files come in two layouts: ``{"meta", "results"}`` (``common.save_json``: W1-W4,
fidelity, memory, CLI start-up) and ``{"meta", "rows"}`` (``gpu_session``: one row per system,
K and repetition).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT, md_table

BENCH_MD = ROOT / "BENCHMARKS.md"
HISTORY_MD = Path(__file__).resolve().parent / "HISTORY.md"
#: HISTORY.md below this line is prose kept as it is (the generator rewrites only what is above it)
NOTES_MARKER = "<!-- Notes: everything below this line is kept by `python -m benchmarks.report`; write by hand. -->"

WORKLOADS = {
    "W1": "W1 — byte-level scoring (bits/byte, bytes/s)",
    "W1 batch": "W1 batch — many documents: scored one at a time vs `batch_score` (lockstep)",
    "W2": "W2 — byte-level SMC under a grammar",
    "W3": "W3 — trie masses",
    "W4": "W4 — LM-call floor",
    "Fidelity": "Fidelity — beam width vs a large-K reference",
    "Memory": "Memory — RSS over a long SMC run",
    "CLI": "CLI start-up — `--help` and argument errors",
    "lm_step": "LM step — N new one-token contexts on a cached prefix (PagedTokenLM)",
    "vLLM": "vLLM backend vs PagedTokenLM — the same jobs in one process",
    "GPU tests": "GPU tests — the backend tests on a CUDA machine (vLLM, paged graphs and compiled layer)",
}

# The targets each workload is read against (ours vs the anchor unless stated).
TARGETS = {
    ("W1", "gpu"): "≥ 30× ByteLLM as shipped (SmolLM2)",
    ("W1", "cpu"): "≥ 5× ByteLLM as shipped (SmolLM2)",
    ("W1 batch", "gpu"): "#14's W1 bar, 5,000 B/s (set for one text)",
    ("W2", "gpu"): "≥ 10× ByteLLM at 32 particles",
    ("W2", "cpu"): "≥ 10× ByteLLM at 32 particles",
    ("W3", "gpu"): "≥ 3× genlm-bytes in every cell",
    ("W3", "cpu"): "≥ 3× genlm-bytes in every cell",
    ("W4", "cpu"): "ours / LM floor near 1 (the beam's own cost)",
    ("Fidelity", "cpu"): "≤ 1e-4 bits/byte above K = 64 at K = 8",
    ("CLI", "cpu"): "< 2 s",
    ("lm_step", "gpu"): "≤ 0.8 ms for N = 32",
    ("vLLM", "gpu"): "vLLM ≥ 0.7× paged on SmolLM2, ≥ 0.9× on the 8B shape",
    ("GPU tests", "gpu"): "every test passes",
}


@dataclass
class Run:
    """One result file, read into what the pages show."""

    path: Path
    workload: str
    stamp: str  # sortable: YYYYMMDDTHHMMSS
    date: str
    device: str  # "cpu" or the GPU's name
    machine: str
    model: str
    backend: str
    commit: str
    command: str
    note: str  # what the command line does not say (meta "note"), or ""
    headline: str  # one line: the numbers that matter, beside the anchor
    table: str  # a small markdown table
    series: dict = field(default_factory=dict)  # for the plots: {label: [(x, y, lo, hi)]}
    xlabel: str = ""
    ylabel: str = ""
    cells: frozenset = frozenset()  # what the run measured (K values, grammar x particles, ...)

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def model_kind(self) -> str:
        m = self.model.lower()
        return "mock" if "mock" in m else "tiny" if "tiny" in m else "SmolLM2" if "smollm2" in m else (m or "-")

    @property
    def backend_kind(self) -> str:
        return self.backend.split()[0] if self.backend else "-"

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.workload, self.device, self.model_kind, self.backend_kind)

    @property
    def target(self) -> str:
        if self.workload in ("W1", "W2") and self.model_kind != "SmolLM2":
            return "none (a mock LM measures the machinery only)"
        return TARGETS.get((self.workload, "gpu" if self.is_gpu else "cpu"), "–")


# ------------------------------------------------------------------ formatting
def _f(x, nd=1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _rng(d: dict, nd=1, unit="") -> str:
    """``median (min–max)`` of a stat dict."""
    return f"{d['median']:,.{nd}f}{unit} ({d['min']:,.{nd}f}–{d['max']:,.{nd}f})"


def _ratio(d: dict | None) -> str:
    if not d:
        return "–"
    if d["min"] == d["max"]:
        return f"**{d['median']:.2f}×**"
    return f"**{d['median']:.2f}×** ({d['min']:.2f}–{d['max']:.2f})"


def _stamp(path: Path) -> str:
    m = re.search(r"(\d{8})T(\d{2,6})", path.name)
    return f"{m.group(1)}T{m.group(2).ljust(6, '0')}" if m else "00000000T000000"


def _date_of(stamp: str) -> str:
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"


# ------------------------------------------------------------------ readers
def _w1(meta, results):
    rows, series = [], {"ours": [], "anchor": []}
    for r in results:
        o, a = r["ours"], r["anchor"]
        rows.append(
            [
                r["K"],
                _bps(o),
                _bps(a),
                _ratio(r.get("speedup")),
                _f(o.get("bits_per_byte"), 4),
                _f(a.get("bits_per_byte"), 4),
            ]
        )
        for side, x in (("ours", o), ("anchor", a)):
            if "bytes_per_s" in x:
                series[side].append((r["K"], x["bytes_per_s"], x["bytes_per_s_min"], x["bytes_per_s_max"]))
    table = md_table(["K", "ours B/s", "ByteLLM B/s", "ours / ByteLLM", "ours bits/B", "ByteLLM bits/B"], rows)
    n = results[0]["n_bytes"] if results else 0
    head = "; ".join(f"K={r['K']}: {_ratio(r.get('speedup'))}" for r in results if r.get("speedup"))
    return f"{n} B; ours / ByteLLM {head}", table, series


def _bps(x: dict) -> str:
    if "bytes_per_s" not in x:
        return "failed"
    return f"{x['bytes_per_s']:,.1f} ({x['bytes_per_s_min']:,.1f}–{x['bytes_per_s_max']:,.1f})"


_GPU_SESSION_ROWS = {
    "ours": "ours",
    "ours_la0": "ours, no prefetch",
    "ours_hf": "ours on HFTokenLM",
    "anchor": "ByteLLM as shipped",
    "anchor_t0": "ByteLLM, timeout 0",
    "anchor_on_our_lm": "ByteLLM on our PagedTokenLM",
}


def _w1_rows(meta, rows):
    """gpu_session layout: per K, each system's median B/s (min–max) over repetitions, and
    ours / ByteLLM as shipped on the medians and per repetition."""
    names = [n for n in _GPU_SESSION_ROWS if any(r["name"] == n for r in rows)]
    table_rows, heads, series = [], [], {_GPU_SESSION_ROWS[n]: [] for n in names}
    for K in sorted({r["K"] for r in rows}):
        by = {n: [r for r in rows if r["K"] == K and r["name"] == n] for n in names}
        cells = []
        for n in names:
            v = [r["bytes_per_s"] for r in by[n]]
            if v:
                med = statistics.median(v)
                cells.append(f"{med:,.1f} ({min(v):,.1f}–{max(v):,.1f})" if len(v) > 1 else f"{med:,.1f}")
                series[_GPU_SESSION_ROWS[n]].append((K, med, min(v), max(v)))
            else:
                cells.append("–")
        ratio = None
        if by.get("ours") and by.get("anchor"):
            reps = {r["rep"]: r["bytes_per_s"] for r in by["anchor"]}
            per = [r["bytes_per_s"] / reps[r["rep"]] for r in by["ours"] if r["rep"] in reps]
            med = statistics.median(x["bytes_per_s"] for x in by["ours"]) / statistics.median(
                x["bytes_per_s"] for x in by["anchor"]
            )
            ratio = {"median": med, "min": min(per), "max": max(per)}
            heads.append(f"K={K}: {_ratio(ratio)}")
        bits = [r["bits_per_byte"] for r in by.get("ours", [])[:1]] + [
            r["bits_per_byte"] for r in by.get("anchor", [])[:1]
        ]
        table_rows.append([K, *cells, _ratio(ratio), " / ".join(f"{b:.4f}" for b in bits) or "–"])
    table = md_table(
        ["K", *(f"{_GPU_SESSION_ROWS[n]} B/s" for n in names), "ours / ByteLLM as shipped", "bits/B ours / ByteLLM"],
        table_rows,
    )
    n = rows[0]["n_bytes"] if rows else 0
    return f"{n} B, {meta.get('dtype', '?')}; ours / ByteLLM as shipped {'; '.join(heads)}", table, series


def _w1_batch(meta, results):
    from benchmarks.w1_batch import table

    head = "; ".join(
        f"{r['docs']} docs: {r['batch']['bytes_per_s']:,.0f} B/s, {r['speedup']:.2f}× one at a time" for r in results
    )
    n = results[0]["n_bytes"] if results else 0
    return f"{n} B, K={results[0]['K'] if results else '?'}; {head}", table(results), {}


def _w2(meta, results):
    rows, heads, free_heads, series = [], [], [], {}

    def cell(x):
        if not isinstance(x, dict):
            return "–"
        if "bytes_per_s" not in x:
            return "skipped" if any(str(e).startswith("skipped") for e in x.get("errors", [])) else "failed"
        return f"{_rng(x['bytes_per_s'])}; ESS {x['ess']:.1f}; valid {x['valid']:.0f}"

    ceiling = any("free" in r for r in results)  # w2_smc's free target: genlm-control alone
    for r in results:
        rows.append(
            [
                r["task"],
                r["particles"],
                cell(r.get("ours")),
                cell(r.get("anchor")),
                cell(r.get("token")),
                _ratio(r.get("vs_anchor")),
                _ratio(r.get("vs_token")),
            ]
            + ([cell(r.get("free")), _ratio(r.get("vs_free"))] if ceiling else [])
        )
        if r.get("vs_anchor"):
            heads.append(f"{r['task']} N={r['particles']}: {_ratio(r['vs_anchor'])}")
        if r.get("vs_free"):
            free_heads.append(f"{r['task']} N={r['particles']}: {_ratio(r['vs_free'])}")
        for side, label in (("ours", "ours"), ("anchor", "ByteLLM"), ("token", "PromptedLLM (tokens)")):
            x = r.get(side)
            if isinstance(x, dict) and "bytes_per_s" in x:
                b = x["bytes_per_s"]
                series.setdefault(f"{label}, {r['task']}", []).append((r["particles"], b["median"], b["min"], b["max"]))
    table = md_table(
        [
            "grammar",
            "particles",
            "ours B/s",
            "ByteLLM B/s",
            "PromptedLLM (tokens) B/s",
            "ours / ByteLLM",
            "ours / tokens",
        ]
        + (["free target (genlm-control alone) B/s", "ours / free"] if ceiling else []),
        rows,
    )
    parts = [f"ours / ByteLLM {'; '.join(heads) or '–'}"] if heads or not free_heads else []
    if free_heads:
        parts.append(f"ours / free target (genlm-control alone) {'; '.join(free_heads)}")
    head = "; ".join(parts)
    return head, table, series


def _w3(meta, results):
    rows, series = [], {}
    labels = meta.get("labels", {})
    for v in dict.fromkeys(r["vocab"] for r in results):
        rs = [r for r in results if r["vocab"] == v]
        sp = [r["speedup"]["median"] for r in rs]
        rows.append(
            [
                labels.get(v, v),
                " ".join(str(r["B"]) for r in rs),
                f"{rs[0]['ours']['median'] * 1e3:.3g} / {rs[-1]['ours']['median'] * 1e3:.3g}",
                f"{rs[0]['anchor']['median'] * 1e3:.3g} / {rs[-1]['anchor']['median'] * 1e3:.3g}",
                f"**{min(sp):.1f}–{max(sp):.1f}×**",
            ]
        )
        series[f"{v} ours"] = [
            (r["B"], r["ours"]["median"] * 1e3, r["ours"]["min"] * 1e3, r["ours"]["max"] * 1e3) for r in rs
        ]
        series[f"{v} genlm-bytes"] = [
            (r["B"], r["anchor"]["median"] * 1e3, r["anchor"]["min"] * 1e3, r["anchor"]["max"] * 1e3) for r in rs
        ]
    all_sp = [r["speedup"]["median"] for r in results]
    table = md_table(
        [
            "vocabulary",
            "batches B",
            "ours ms (smallest / largest B)",
            "genlm-bytes ms (smallest / largest B)",
            "speedup range",
        ],
        rows,
    )
    return f"ours / genlm-bytes **{min(all_sp):.1f}–{max(all_sp):.1f}×** over all cells", table, series


def _w4(meta, results):
    rows = [
        [
            r["workload"],
            _rng(r["ours_s"], 2, " s"),
            _rng(r["floor_s"], 2, " s"),
            _ratio(r["overhead"]),
            f"{r['calls']['batch_calls']} / {r['calls']['contexts']}",
        ]
        for r in results
    ]
    table = md_table(["workload", "ours", "LM floor (replayed calls)", "ours / floor", "LM calls / contexts"], rows)
    return "ours / LM floor " + "; ".join(f"{r['workload']}: {_ratio(r['overhead'])}" for r in results), table, {}


def _fidelity(meta, results):
    texts = list(dict.fromkeys(r["text"] for r in results))
    ref = {
        t: next(
            (
                r["bpb"]
                for r in results
                if r["text"] == t and r["K"] == max(x["K"] for x in results) and not r["canonical"]
            ),
            None,
        )
        for t in texts
    }
    keys = sorted({(r["K"], r["canonical"]) for r in results})
    rows = []
    for K, canon in keys:
        cells = []
        for t in texts:
            r = next((x for x in results if x["text"] == t and x["K"] == K and x["canonical"] == canon), None)
            cells.append("–" if r is None else f"{r['bpb']:.4f} ({r['bpb'] - ref[t]:+.1e})")
        rows.append([f"{K}{' canonical' if canon else ''}", *cells])
    table = md_table(["K", *(f"{t} bits/B (vs largest K)" for t in texts)], rows)
    k8 = [r["bpb"] - ref[r["text"]] for r in results if r["K"] == 8 and not r["canonical"]]
    head = f"K = 8 excess over the largest K: {min(k8):+.1e} to {max(k8):+.1e} bits/B" if k8 else "–"
    return head, table, {}


def _memory(meta, results):
    curve = results.get("curve", [])
    rss = [c[2] for c in curve]
    head = (
        f"{results['bytes']:,} B in {results['seconds']:.0f} s; RSS {rss[1] if len(rss) > 1 else rss[0]:,.0f} → "
        f"{rss[-1]:,.0f} MiB (max {max(rss):,.0f})"
        if rss
        else "–"
    )
    rows = [[f"{c[0]:,}", f"{c[1]:.1f}", f"{c[2]:,.0f}"] for c in curve[1 :: max(1, len(curve) // 5)]]
    return head, md_table(["bytes", "seconds", "RSS MiB"], rows), {}


def _cli(meta, results):
    rows = [[f"`{r['command']}`", _rng(r["seconds"], 2, " s")] for r in results]
    head = "; ".join(f"{r['name']}: {r['seconds']['median']:.2f} s" for r in results)
    return head, md_table(["command", "wall time, median (min–max)"], rows), {}


def _lm_step(meta, results):
    """One row per (variant of the forward, N, API); runs before variants existed have none."""
    rows = [
        [
            r.get("variant", "–"),
            r["N"],
            r["api"],
            _rng(r["total_ms"], 3),
            _rng(r["host_ms"], 3),
            _rng(r.get("plan_ms", {}), 3) if "plan_ms" in r else "–",
        ]
        for r in results
    ]
    sync = [r for r in results if r["api"] == "sync"]
    head = "; ".join(
        f"{r['variant'] + ' ' if 'variant' in r else ''}N={r['N']}: {r['total_ms']['median']:.2f} ms "
        f"(host {r['host_ms']['median']:.2f})"
        for r in sync
    )
    return head, md_table(["variant", "N", "API", "total ms", "host ms", "plan ms (forward stubbed)"], rows), {}


def _vllm(meta, results):
    """Per model and job: median B/s of each backend (W0: contexts/s, the LM alone), the
    vLLM / paged ratio of the medians, and where a byte's time went on the vLLM engine in
    the first repetition (ms per byte)."""
    backends = meta.get("backends") or sorted({r["backend"] for r in results})
    cells: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results:
        cells.setdefault((r["model"], r["job"]), {}).setdefault(r["backend"], []).append(r)
    rows, heads = [], []
    for (model, job), by in cells.items():
        speed = {b: statistics.median(x["bytes_per_s"] for x in by[b]) for b in backends if b in by}
        ratio = speed["vllm"] / speed["paged"] if {"vllm", "paged"} <= speed.keys() else None
        split = by.get("vllm", [{}])[0].get("per_byte_ms") or {}
        rows.append(
            [model, job, *(_f(speed.get(b)) for b in backends), f"{ratio:.2f}" if ratio else "–"]
            + [_f(split.get(k), 3) for k in ("engine_step", "submit", "rest")]
        )
        if ratio and not job.startswith("W0"):
            heads.append(f"{model} {job}: {ratio:.2f}×")
    header = [
        "model",
        "job",
        *(f"{b} B/s" for b in backends),
        "vllm / paged",
        "vllm ms/B (rep 0): step",
        "submit",
        "rest",
    ]
    return "vLLM / paged: " + "; ".join(heads), md_table(header, rows), {}


def _gpu_tests(meta, results):
    """Per pytest process: counts, seconds, and each failure's test and first line."""
    rows = [
        [
            f"`{r['command']}`",
            r["passed"],
            r["failed"],
            r["skipped"],
            f"{r['seconds']:.0f}" + (" (timed out)" if r["timed_out"] else ""),
            "<br>".join(f"`{f['test']}`: {f['message']}" for f in r["failures"]) or "–",
        ]
        for r in results
    ]
    total = {k: sum(r[k] for r in results) for k in ("passed", "failed", "skipped")}
    head = f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped"
    if any(r["timed_out"] for r in results):
        head += " (a group timed out)"
    return head, md_table(["pytest", "passed", "failed", "skipped", "seconds", "failures"], rows), {}


READERS = {
    "W1": _w1,
    "W1 batch": _w1_batch,
    "W2": _w2,
    "W3": _w3,
    "W4": _w4,
    "Fidelity": _fidelity,
    "Memory": _memory,
    "CLI": _cli,
    "lm_step": _lm_step,
    "vLLM": _vllm,
    "GPU tests": _gpu_tests,
}
AXES = {"W1": ("beam width K", "bytes / s"), "W2": ("particles", "bytes / s"), "W3": ("batch B", "ms per call")}


def read_run(path: Path) -> Run:
    d = json.loads(path.read_text())
    meta = d.get("meta", {})
    stamp = _stamp(path)
    if "rows" in d:  # gpu_session
        workload = "W1"
    else:
        workload = meta.get("workload") or path.name.split("-")[0].upper()
        workload = {"w1": "W1", "w2": "W2", "w3": "W3", "w4": "W4"}.get(workload.lower(), workload)
    try:
        if "rows" in d:
            headline, table, series = _w1_rows(meta, d["rows"])
        else:
            headline, table, series = READERS[workload](meta, d["results"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a layout no reader knows: shown, not fatal
        headline, table, series = f"not read: {type(exc).__name__} {exc} (add a reader in benchmarks/report.py)", "", {}
    device = meta.get("device") or "cpu"
    if device.startswith("cuda"):  # common.machine_desc ends with ", GPU <name>"
        gpu = re.search(r"GPU (.+)$", meta.get("machine") or "")
        device = gpu.group(1) if gpu else device
    xlabel, ylabel = AXES.get(workload, ("", ""))
    return Run(
        path=path,
        workload=workload,
        stamp=stamp,
        date=meta.get("date") or _date_of(stamp),
        device=device,
        machine=meta.get("machine") or device,
        model=meta.get("model") or "",
        backend=meta.get("backend") or "",
        commit=meta.get("commit") or "not recorded",
        command=meta.get("command") or "not recorded",
        note=meta.get("note") or "",
        headline=headline,
        table=table,
        series=series,
        xlabel=xlabel,
        ylabel=ylabel,
        cells=_cells(workload, d),
    )


def _cells(workload: str, data: dict) -> frozenset:
    if "rows" in data:
        return frozenset((r["name"], r["K"]) for r in data["rows"])
    res = data["results"]
    key = {
        "W1": lambda r: r["K"],
        "W1 batch": lambda r: (r["docs"], r["K"]),
        # a run beside the free target (w2_smc's ceiling) does not replace the runs beside the anchor
        "W2": lambda r: (r["task"], r["particles"], r.get("free") is not None),
        "W3": lambda r: (r["vocab"], r["B"]),
        "W4": lambda r: r["workload"],
        "Fidelity": lambda r: (r["text"], r["K"], r["canonical"]),
        "CLI": lambda r: r["name"],
        "lm_step": lambda r: (r.get("variant"), r["N"], r["api"]),
        "vLLM": lambda r: (r["model"], r["job"], r["backend"], r["rep"]),
        "GPU tests": lambda r: r["command"],
    }.get(workload)
    return frozenset(key(r) for r in res) if key and isinstance(res, list) else frozenset({"all"})


def load_runs(results_dir: Path = RESULTS_DIR) -> list[Run]:
    return sorted((read_run(p) for p in results_dir.glob("*.json")), key=lambda r: (r.stamp, r.path.name))


def current(runs: list[Run]) -> list[Run]:
    """The current runs, in workload order: in each group (workload, device, model kind), a run
    replaces the earlier ones whose cells it covers, so a partial re-run stands beside the
    full run it does not replace."""
    kept: list[Run] = []
    for r in runs:  # oldest first
        kept = [k for k in kept if not (k.group == r.group and k.cells <= r.cells)] + [r]
    order = list(WORKLOADS)
    return sorted(
        kept,
        key=lambda r: (
            order.index(r.workload) if r.workload in order else len(order),
            r.device != "cpu",
            r.device,
            r.model_kind,
            r.stamp,
        ),
    )


# ------------------------------------------------------------------ pages
def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def render_current(runs: list[Run], plots: dict[str, Path], out: Path = BENCH_MD) -> str:
    cur = current(runs)
    lines = [
        "# Benchmarks — current results",
        "",
        "Ours (`genlm_bytes_potential`) against the anchor (genlm-control 0.4.1 `ByteLLM` on genlm-bytes 0.2.0),"
        " same process, same inputs; B/s are medians (min–max) over repetitions; ratios are ours / anchor "
        "(higher = ours faster). The newest run of each workload, device and model; every earlier run is in "
        "[benchmarks/HISTORY.md](benchmarks/HISTORY.md), with the runs saved by no script (`--no-write`) in its notes. Generated by `python -m benchmarks.report` from "
        "`benchmarks/results/*.json` (each benchmark script regenerates it): do not edit by hand. How to run: "
        "[benchmarks/README.md](benchmarks/README.md).",
        "",
        md_table(
            ["workload", "device", "model, backend", "result", "target", "date, commit"],
            [
                [
                    r.workload,
                    r.machine,
                    f"{r.model_kind}, {r.backend_kind}",
                    r.headline,
                    r.target,
                    f"{r.date}, `{r.commit}`",
                ]
                for r in cur
            ],
        ).rstrip(),
        "",
    ]
    if plots:
        lines += [" ".join(f"![{wl}]({_rel(p, out.parent)})" for wl, p in plots.items()), ""]
    for wl in dict.fromkeys([*WORKLOADS, *(r.workload for r in cur)]):
        title = WORKLOADS.get(wl, wl)
        group = [r for r in cur if r.workload == wl]
        if not group:
            continue
        lines += [f"## {title}", ""]
        for r in group:
            lines += [
                f"**{r.machine}** · {r.model or '-'} · {r.backend or '-'} · {r.date} · commit `{r.commit}` · "
                f"target: {r.target} · [{r.path.name}]({_rel(r.path, out.parent)})",
                "",
                f"`{r.command}`" + (f" ({r.note})" if r.note else ""),
                "",
                r.table.rstrip(),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def render_history(runs: list[Run], out: Path = HISTORY_MD) -> str:
    """The generated run list, then the hand-written notes kept from ``out``."""
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES_MARKER) + len(NOTES_MARKER) :].strip("\n") if NOTES_MARKER in old else ""
    lines = [
        "# Benchmark history",
        "",
        "Every saved run, oldest first, generated by `python -m benchmarks.report` from "
        "`benchmarks/results/*.json`; the current results are in [BENCHMARKS.md](../BENCHMARKS.md). "
        "Runs made with `--no-write` saved no file and appear only in the notes at the end.",
        "",
        md_table(
            ["date", "workload", "device", "model / backend", "result", "commit", "file"],
            [
                [
                    r.date,
                    r.workload,
                    r.machine,
                    f"{r.model or '-'} / {r.backend or '-'}",
                    r.headline,
                    f"`{r.commit}`",
                    f"[{r.path.name}]({_rel(r.path, out.parent)})",
                ]
                for r in runs
            ],
        ).rstrip(),
        "",
    ]
    for r in runs:
        lines += [
            f"## {r.workload} — {r.date}, {r.machine}, {r.model_kind} ({r.path.name})",
            "",
            f"`{r.command}` at `{r.commit}`" + (f" ({r.note})" if r.note else ""),
            "",
            r.table.rstrip(),
            "",
        ]
    lines += [NOTES_MARKER, "", notes]
    return "\n".join(lines).rstrip() + "\n"


def write_pages(
    results_dir: Path = RESULTS_DIR,
    bench_md: Path = BENCH_MD,
    history_md: Path = HISTORY_MD,
    plot_dir: Path | None = None,
    plots: bool = True,
) -> list[Path]:
    """Regenerate BENCHMARKS.md, HISTORY.md and the plots of the current runs; returns the paths written."""
    runs = load_runs(results_dir)
    written = []
    pngs: dict[str, Path] = {}
    if plots:
        try:
            from benchmarks.plots import plot_current
        except ImportError:  # matplotlib is in the bench extra only
            plot_current = None
        if plot_current is not None:
            pngs = plot_current(current(runs), plot_dir or bench_md.parent)
            written += list(pngs.values())
    bench_md.write_text(render_current(runs, pngs, bench_md))
    history_md.write_text(render_history(runs, history_md))
    return [bench_md, history_md, *written]


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-plots", action="store_true", help="pages only (no matplotlib needed)")
    a = p.parse_args(argv)
    for path in write_pages(plots=not a.no_plots):
        print("wrote", _rel(path, ROOT))


if __name__ == "__main__":
    main()
