"""W1: byte-level scoring of a held-out text, ours vs genlm-control's ByteLLM.

    python -m benchmarks.w1_score                      # SmolLM2-135M, K in 1,2,4,8,16
    python -m benchmarks.w1_score --quick              # 512 bytes, K in 1,4,16
    python -m benchmarks.w1_score --model mock         # free LM: beam overhead only

Text: ``benchmarks/data/heldout.txt`` (~2 KB of prose, Python, non-ASCII). Both sides get
the same LM object (caches emptied before each run) and the same EOS byte strings:

* ours:   ``await ByteLM(lm, K=K, eos_tokens=eos).score(text)`` (healing on, as the anchor);
* anchor: ``await ByteLLM(lm, BeamParams(K=K, eos_byte_strings=eos)).prefix(bytes of text)``.

Reported: bytes/s over the scoring (setup excluded: our ByteLM and the anchor's initial beam,
trie included, are built before the clock starts; ours still pays its first LM call), bits
per byte, LM calls. Repetitions alternate ours/anchor.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
import warnings

from benchmarks.common import (
    Stat,
    add_common_args,
    command_line,
    fmt_ratio,
    header,
    md_table,
    ratio_stat,
    save_json,
    set_threads,
    thread_counts,
)
from benchmarks.lms import heldout_text, make_lm, reset

KS = (1, 2, 4, 8, 16)
QUICK_KS = (1, 4, 16)


async def score_ours(lm, text: bytes, K: int, eos, max_prefetch: int | None = None, **opts) -> dict:
    """``ByteLM(lm, K, **opts).score(text)``, timed; ``max_prefetch`` replaces the model's."""
    from genlm_bytes_potential.byte_lm import ByteLM

    blm = ByteLM(lm, K=K, eos_tokens=list(eos), **opts)  # builds the trie (untimed)
    if max_prefetch is not None:
        blm.model.max_prefetch = max_prefetch
    c0, t0 = time.process_time(), time.perf_counter()
    s = await blm.score(text)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu_seconds": cpu, "logprob": float(s.logprob), "heals": int(getattr(s, "heals", 0))}


async def score_anchor(lm, text: bytes, K: int, eos) -> dict:
    from genlm.bytes import BeamParams, ByteBeamState
    from genlm.control import ByteLLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bl = ByteLLM(lm, BeamParams(K=K, eos_byte_strings=list(eos)), cache_size=4)
        # Initial beam (trie build + first LM call) before the clock, as ByteLLM would.
        bl._initial_beam = await ByteBeamState.initial(lm, bl.beam_params)
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            logp = await bl.prefix([bytes([b]) for b in text])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            return {"seconds": dt, "cpu_seconds": cpu, "logprob": float(logp)}
        finally:
            await bl.cleanup()


def _one(kind, lm, text, K, eos, log):
    reset(lm)
    fn = score_ours if kind == "ours" else score_anchor
    try:
        r = asyncio.run(fn(lm, text, K, eos))
    except Exception as e:  # noqa: BLE001 - a failing side is a result, not a crash
        log(f"  {kind} K={K} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    r.update(lm.summary())
    r["bytes_per_s"] = len(text) / r["seconds"]
    r["bits_per_byte"] = -r["logprob"] / math.log(2) / len(text)
    log(
        f"  {kind:6s} K={K:2d}: {r['bytes_per_s']:8.1f} B/s  {r['bits_per_byte']:.4f} bits/B  "
        f"LM calls {r['batch_calls'] + r['single_calls']} ({r['contexts']} contexts)"
    )
    return r


def warm_up(lm, eos, text: bytes, log=print) -> None:
    """One short untimed run per side (JIT compilation, first-call allocations)."""
    for kind in ("ours", "anchor"):
        _one(kind, lm, text[:16], 2, eos, lambda *_: None)


def run(lm, eos, text: bytes, Ks=KS, reps=3, log=print, warm=True) -> list[dict]:
    if warm:
        warm_up(lm, eos, text, log)
    runs = {(K, k): [] for K in Ks for k in ("ours", "anchor")}
    for rep in range(reps):
        for K in Ks:
            order = ("ours", "anchor") if rep % 2 == 0 else ("anchor", "ours")
            for kind in order:
                runs[(K, kind)].append(_one(kind, lm, text, K, eos, log))
    results = []
    for K in Ks:
        row = {"K": K, "n_bytes": len(text)}
        stats = {}
        for kind in ("ours", "anchor"):
            ok = [r for r in runs[(K, kind)] if "error" not in r]
            errs = [r["error"] for r in runs[(K, kind)] if "error" in r]
            if ok:
                stats[kind] = Stat([r["seconds"] for r in ok])
                row[kind] = {
                    "seconds": stats[kind].to_dict(),
                    "bytes_per_s": len(text) / stats[kind].median,
                    "bytes_per_s_min": len(text) / stats[kind].max,
                    "bytes_per_s_max": len(text) / stats[kind].min,
                    "cpu_seconds": Stat([r["cpu_seconds"] for r in ok]).to_dict(),
                    "bits_per_byte": ok[0]["bits_per_byte"],
                    "bits_per_byte_all": [r["bits_per_byte"] for r in ok],
                    "lm_calls": ok[0]["batch_calls"] + ok[0]["single_calls"],
                    "lm_contexts": ok[0]["contexts"],
                    "lm_seconds": Stat([r["lm_seconds_inside_calls"] for r in ok]).median,
                    "errors": errs,
                }
            else:
                row[kind] = {"errors": errs}
        if "ours" in stats and "anchor" in stats:
            row["speedup"] = ratio_stat(stats["anchor"], stats["ours"])
            cpu = {k: Stat([r["cpu_seconds"] for r in runs[(K, k)] if "error" not in r]) for k in ("ours", "anchor")}
            row["cpu_speedup"] = ratio_stat(cpu["anchor"], cpu["ours"])
        results.append(row)
    return results


def render(meta, results, reps) -> str:
    _, md = header(
        "W1 scoring",
        date=meta["date"],
        machine=meta["machine"],
        threads=meta.get("threads_rec"),
        threads_at_end=meta.get("threads_at_end"),
        model=meta["model"],
        backend=meta["backend"],
        device="cpu",
        extra=(
            f"- command: `{meta['command']}`; text: {meta['text']} "
            f"({results[0]['n_bytes']} bytes); {reps} repetitions, "
            "alternating ours/anchor; LM caches emptied before each run\n"
            "- bytes/s: median (min–max); speedup = anchor time / our time "
            "(range: per-repetition pairs); CPU-time speedup: process CPU "
            "seconds, all threads (OpenMP spin-waits count too); bits/byte: "
            "first repetition (deterministic)"
        ),
    )
    rows = []
    for r in results:
        o, a = r["ours"], r["anchor"]

        def bps(x):
            if "bytes_per_s" not in x:
                return "failed: " + "; ".join(x["errors"])[:80]
            return f"{x['bytes_per_s']:.1f} ({x['bytes_per_s_min']:.1f}–{x['bytes_per_s_max']:.1f})"

        def bits(x):
            return f"{x['bits_per_byte']:.4f}" if "bits_per_byte" in x else "–"

        def calls(x):
            return f"{x['lm_calls']} / {x['lm_contexts']}" if "lm_calls" in x else "–"

        rows.append(
            [
                r["K"],
                bps(o),
                bps(a),
                fmt_ratio(r["speedup"]) if "speedup" in r else "–",
                fmt_ratio(r["cpu_speedup"]) if "cpu_speedup" in r else "–",
                bits(o),
                bits(a),
                calls(o),
                calls(a),
            ]
        )
    md += "\n" + md_table(
        [
            "K",
            "ours B/s",
            "anchor B/s",
            "speedup (wall)",
            "speedup (CPU time)",
            "ours bits/B",
            "anchor bits/B",
            "ours LM calls / contexts",
            "anchor LM calls / contexts",
        ],
        rows,
    )
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="512 bytes, K in 1,4,16, 1 rep")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "mock"])
    p.add_argument("--mock-vocab", default="model", choices=["model", "tiny"])
    p.add_argument("--K", nargs="*", type=int, default=None)
    p.add_argument("--bytes", type=int, default=None, help="score only the first N bytes")
    p.add_argument("--reps", type=int, default=None)
    add_common_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    Ks = tuple(a.K or (QUICK_KS if a.quick else KS))
    reps = a.reps or (1 if a.quick else 3)
    text = heldout_text(a.bytes or (512 if a.quick else None))
    lm, info = make_lm(a.model, vocab=a.mock_vocab)
    results = run(lm, info["eos"], text, Ks=Ks, reps=reps)
    meta, _ = header(
        "W1", date=a.date, machine=a.machine, model=info["model"], backend=info["backend"], threads=threads
    )
    meta["threads_rec"] = threads
    meta["threads_at_end"] = thread_counts()
    meta.update(
        command=command_line("benchmarks.w1_score", argv if argv is not None else sys.argv[1:]),
        text="benchmarks/data/heldout.txt" + (f"[:{len(text)}]" if a.bytes or a.quick else ""),
        eos=[e.decode("utf-8", "replace") for e in info["eos"]],
        reps=reps,
    )
    md = render(meta, results, reps)
    print(md)
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
