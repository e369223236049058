"""Plots from the saved results (``benchmarks/results/*.json``), PNGs next to BENCHMARKS.md.

``python -m benchmarks.report`` draws the plots of the current results with :func:`plot_current`
(``bench_w1.png``, ``bench_w2.png``, ``bench_w3.png``: one panel per current run). This module's
command line plots one result file per workload in more detail:

    python -m benchmarks.plots              # latest result of each workload (CPU)
    python -m benchmarks.plots --device cuda

* ``bench_w1_bytes_per_s.png``: W1 bytes/s vs K, ours and anchor;
* ``bench_w1_bits_per_byte.png``: W1 bits/byte vs K;
* ``bench_w2_smc.png``: W2 bytes/s vs particles, per grammar and system;
* ``bench_w3_trie.png``: W3 time per call vs batch, per vocabulary, ours and anchor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT


def latest(
    workload: str, device: str = "cpu", results_dir: Path = RESULTS_DIR, model_filter: str | None = None
) -> dict | None:
    """The newest saved result of a workload (by file name: the timestamp)."""
    files = sorted(results_dir.glob(f"{workload.lower()}-{device}-*.json"))
    for f in reversed(files):
        d = json.loads(f.read_text())
        if model_filter is None or model_filter in d["meta"].get("model", ""):
            return d
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errbar(ax, xs, med, lo, hi, **kw):
    ax.errorbar(
        xs, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]], capsize=3, marker="o", **kw
    )


def plot_w1(d: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    res = d["results"]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for side, label in (("ours", "ours (ByteLM)"), ("anchor", "anchor (ByteLLM)")):
        pts = [(r["K"], r[side]) for r in res if "bytes_per_s" in r[side]]
        if pts:
            _errbar(
                ax,
                [k for k, _ in pts],
                [x["bytes_per_s"] for _, x in pts],
                [x["bytes_per_s_min"] for _, x in pts],
                [x["bytes_per_s_max"] for _, x in pts],
                label=label,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("beam width K")
    ax.set_ylabel("bytes / s")
    ax.set_title(f"W1 scoring — {d['meta']['model'][:40]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "bench_w1_bytes_per_s.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for side, label in (("ours", "ours"), ("anchor", "anchor")):
        pts = [(r["K"], r[side]["bits_per_byte"]) for r in res if "bits_per_byte" in r[side]]
        if pts:
            ax.plot([k for k, _ in pts], [b for _, b in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("beam width K")
    ax.set_ylabel("bits / byte")
    ax.set_title(f"W1 bits/byte — {d['meta']['model'][:40]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "bench_w1_bits_per_byte.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_w2(d: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    res = d["results"]
    tasks = sorted({r["task"] for r in res})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in res if r["task"] == task]
        for s, label in (("ours", "ours"), ("anchor", "ByteLLM"), ("token", "PromptedLLM (tokens)")):
            pts = [
                (r["particles"], r[s]["bytes_per_s"])
                for r in rows
                if isinstance(r.get(s), dict) and "bytes_per_s" in r[s]
            ]
            if pts:
                _errbar(
                    ax,
                    [n for n, _ in pts],
                    [b["median"] for _, b in pts],
                    [b["min"] for _, b in pts],
                    [b["max"] for _, b in pts],
                    label=label,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles")
        ax.set_ylabel("bytes / s")
        ax.set_title(f"W2 SMC, {task} — {d['meta']['model'][:36]}", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bench_w2_smc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_w3(d: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    res = d["results"]
    vocabs = list(dict.fromkeys(r["vocab"] for r in res))
    fig, axes = plt.subplots(1, len(vocabs), figsize=(3.6 * len(vocabs), 3.4), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], vocabs):
        rows = [r for r in res if r["vocab"] == v]
        for side, label in (("ours", "ours (f64)"), ("anchor", "genlm-bytes (f32)")):
            _errbar(
                ax,
                [r["B"] for r in rows],
                [r[side]["median"] * 1e3 for r in rows],
                [r[side]["min"] * 1e3 for r in rows],
                [r[side]["max"] * 1e3 for r in rows],
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B")
        ax.set_title(f"{v} (V={rows[0]['V']:,})", fontsize=9)
    axes[0][0].set_ylabel("ms per masses call")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"W3 trie masses, {d['meta']['device']}, {d['meta']['machine']}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"bench_w3_trie{'' if d['meta']['device'] == 'cpu' else '_' + d['meta']['device']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_current(runs, out_dir: Path = ROOT) -> dict[str, Path]:
    """One PNG per workload with series (W1, W2, W3): a panel per run of ``runs`` (the current
    ``benchmarks.report.Run`` of each device and model), each series with its min–max bars."""
    plt = _plt()
    out = {}
    for wl in ("W1", "W2", "W3"):
        group = [r for r in runs if r.workload == wl and any(r.series.values())]
        if not group:
            continue
        ncols = min(3, len(group))
        nrows = -(-len(group) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
        for ax in axes.flat[len(group) :]:
            ax.set_visible(False)
        for ax, r in zip(axes.flat, group):
            for label, pts in r.series.items():
                if pts:
                    xs, med, lo, hi = zip(*sorted(pts))
                    _errbar(ax, xs, med, lo, hi, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(r.xlabel)
            ax.set_ylabel(r.ylabel)
            ax.set_title(f"{wl}, {r.machine[:30]}, {r.model_kind}, {r.backend_kind}\n{r.date} `{r.commit}`", fontsize=8)
            ax.legend(fontsize=6)
        fig.tight_layout()
        out[wl] = out_dir / f"bench_{wl.lower()}.png"
        fig.savefig(out[wl], dpi=110)
        plt.close(fig)
    return out


def make_all(
    device="cpu",
    results_dir: Path = RESULTS_DIR,
    out_dir: Path = ROOT,
    w1_model: str | None = None,
    files: dict | None = None,
) -> list[Path]:
    """Plot the latest result of each workload, or ``files[workload]`` (a JSON path)."""
    paths = []
    files = files or {}
    for wl, fn in (("w1", plot_w1), ("w2", plot_w2), ("w3", plot_w3)):
        if files.get(wl):
            d = json.loads(Path(files[wl]).read_text())
        else:
            d = latest(wl, device, results_dir, model_filter=w1_model if wl != "w3" else None)
        if d is not None:
            paths += fn(d, out_dir)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="only results whose model contains this")
    for wl in ("w1", "w2", "w3"):
        p.add_argument(f"--{wl}", default=None, help=f"plot this {wl.upper()} results JSON")
    a = p.parse_args(argv)
    files = {"w1": a.w1, "w2": a.w2, "w3": a.w3}
    for path in make_all(a.device, w1_model=a.model, files=files):
        print("wrote", path)


if __name__ == "__main__":
    main()
