"""W1 over many documents: the held-out text cut into N documents, scored one at a time
(``ByteLM.score``) and together in lockstep (``ByteLM.batch_score``), side by side.

    python -m benchmarks.w1_batch --device cuda --dtype bfloat16     # SmolLM2, paged, N = 1 4 16 64
    python -m benchmarks.w1_batch --model mock --docs 1 4 --bytes 300

Per N: bytes/s of each way (all documents' bytes over the wall time of scoring them all;
the model and trie are loaded before the clock starts), their ratio, LM calls and contexts,
and the total log-prob of each. With an exact LM (the mock) the totals are equal to the
last digit; a bf16 forward pass rounds a context a little differently in another batch.
Repetitions alternate the two ways; the LM's caches are emptied before each run. K = 8,
the beam's defaults otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np

from benchmarks.common import add_common_args, command_line, header, md_table, save_json, set_threads
from benchmarks.lms import heldout_text, make_lm, reset

DOCS = (1, 4, 16, 64)
WAYS = ("one_by_one", "batch")


def documents(text: bytes, n: int) -> list[bytes]:
    """``text`` cut into ``n`` documents of about equal length (at byte positions: a
    document may start inside a UTF-8 character, which the beam reads as bytes)."""
    cuts = np.linspace(0, len(text), n + 1).astype(int)
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


async def score_docs(lm, docs: list[bytes], way: str, K: int, eos) -> dict:
    from genlm_bytes_potential.byte_lm import ByteLM

    blm = ByteLM(lm, K=K, eos_tokens=list(eos))  # the trie is cached: built before the clock
    t0 = time.perf_counter()
    if way == "batch":
        scores = await blm.batch_score(docs)
    else:
        scores = [await blm.score(d) for d in docs]
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "logprob": float(sum(s.logprob for s in scores)),
        "lm_calls": blm.model.stats.batch_calls,
        "lm_contexts": blm.model.stats.contexts,
    }


def run(lm, eos, text: bytes, docs_counts=DOCS, K: int = 8, reps: int = 2, log=print) -> list[dict]:
    """Every N, both ways, ``reps`` rounds alternating the order, after an untimed round
    of each (compilations, CUDA graphs)."""
    results = []
    for n in docs_counts:
        docs = documents(text, n)
        runs = {w: [] for w in WAYS}
        for rep in range(reps + 1):
            for way in WAYS if rep % 2 == 0 else WAYS[::-1]:
                reset(lm)
                r = asyncio.run(score_docs(lm, docs, way, K, eos))
                if rep:
                    runs[way].append(r)
                    log(f"  N={n:3d} {way:10s} {len(text) / r['seconds']:8.1f} B/s  log-prob {r['logprob']:.6f}")
        row = {"docs": n, "n_bytes": len(text), "K": K}
        for way, rs in runs.items():
            bps = [len(text) / r["seconds"] for r in rs]
            row[way] = {
                "bytes_per_s": statistics.median(bps),
                "bytes_per_s_min": min(bps),
                "bytes_per_s_max": max(bps),
                "logprob": rs[0]["logprob"],
                "logprob_all": [r["logprob"] for r in rs],
                "lm_calls": rs[0]["lm_calls"],
                "lm_contexts": rs[0]["lm_contexts"],
            }
        row["speedup"] = row["batch"]["bytes_per_s"] / row["one_by_one"]["bytes_per_s"]
        results.append(row)
    return results


def table(results: list[dict]) -> str:
    rows = [
        [
            r["docs"],
            f"{r['one_by_one']['bytes_per_s']:,.1f} ({r['one_by_one']['bytes_per_s_min']:,.1f}–"
            f"{r['one_by_one']['bytes_per_s_max']:,.1f})",
            f"{r['batch']['bytes_per_s']:,.1f} ({r['batch']['bytes_per_s_min']:,.1f}–{r['batch']['bytes_per_s_max']:,.1f})",
            f"**{r['speedup']:.2f}x**",
            f"{r['one_by_one']['lm_calls']} / {r['one_by_one']['lm_contexts']:,}",
            f"{r['batch']['lm_calls']} / {r['batch']['lm_contexts']:,}",
            f"{r['one_by_one']['logprob']:.6f} / {r['batch']['logprob']:.6f}",
        ]
        for r in results
    ]
    return md_table(
        [
            "documents",
            "one at a time B/s",
            "batch_score B/s",
            "batch / one",
            "LM calls / contexts (one)",
            "(batch)",
            "total log-prob one / batch",
        ],
        rows,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "mock"])
    p.add_argument("--backend", default="paged", choices=["hf", "paged"])
    p.add_argument("--device", default=None, help="model device (e.g. cuda)")
    p.add_argument("--dtype", default=None, help="model dtype (e.g. bfloat16)")
    p.add_argument("--docs", nargs="*", type=int, default=list(DOCS))
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--bytes", type=int, default=None, help="only the first N bytes of the text")
    p.add_argument("--reps", type=int, default=2)
    add_common_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    opts = {k: v for k, v in (("device", a.device), ("dtype", a.dtype)) if v}
    if a.model != "mock":
        opts["backend"] = a.backend
    lm, info = make_lm(a.model, **opts)
    text = heldout_text(a.bytes)
    results = run(lm, info["eos"], text, a.docs, a.K, a.reps)
    device = a.device or "cpu"
    meta, md = header(
        "W1 batch",
        date=a.date,
        machine=a.machine,
        model=info["model"],
        backend=info["backend"],
        device=device,
        threads=threads,
    )
    meta.update(
        command=command_line("benchmarks.w1_batch", argv if argv is not None else sys.argv[1:]),
        text="benchmarks/data/heldout.txt" + (f"[:{len(text)}]" if a.bytes else ""),
        reps=a.reps,
    )
    print(md + "\n" + table(results))
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
