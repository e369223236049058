"""W4: the LM-call floor. How much of our time is the LM itself?

    python -m benchmarks.w4_floor                  # SmolLM2: W1 scoring (K=8) + W2 SMC
    python -m benchmarks.w4_floor --quick

Runs one of our workloads with the LM wrapped in a recorder (every
``batch_next_token_logprobs`` call and its contexts, in order), then replays exactly those
calls, batched the same way, on the same LM with emptied caches and no beam work. The
floor is the replay's wall time; ``ours / floor`` is our total overhead factor (1.0 = the
beam, trie and potential cost nothing). Repetitions alternate run and replay.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from benchmarks.common import Stat, add_common_args, command_line, header, md_table, ratio_stat, save_json, set_threads
from benchmarks.lms import heldout_text, make_lm, reset


async def replay(lm, calls) -> float:
    inner = lm.inner
    t0 = time.perf_counter()
    for kind, contexts, _ in calls:
        if kind == "batch":
            await inner.batch_next_token_logprobs([list(c) for c in contexts])
        else:
            await inner.next_token_logprobs(list(contexts[0]))
    return time.perf_counter() - t0


def _w1(lm, eos, text, K):
    from benchmarks.w1_score import score_ours

    return asyncio.run(score_ours(lm, text, K, eos))["seconds"]


def _w2(lm, eos, task, n, max_bytes, K, seed, mode):
    from benchmarks.w2_smc import smc_once

    return asyncio.run(smc_once("ours", lm, task, n, max_bytes, K, eos, seed, mode))["seconds"]


def measure(lm, label, workload, reps, log=print) -> dict:
    ours, floor, summary = [], [], None
    workload()  # warm-up (JIT), untimed
    for _ in range(reps):
        reset(lm)
        ours.append(workload())
        calls = list(lm.calls)
        summary = lm.summary()
        reset(lm)
        floor.append(asyncio.run(replay(lm, calls)))
    so, sf = Stat(ours), Stat(floor)
    r = {
        "workload": label,
        "ours_s": so.to_dict(),
        "floor_s": sf.to_dict(),
        "overhead": ratio_stat(so, sf),
        "calls": summary,
    }
    log(
        f"  {label}: ours {so.median:.2f}s  floor {sf.median:.2f}s  ours/floor "
        f"{r['overhead']['median']:.2f}  ({summary['batch_calls']} batch calls, "
        f"{summary['contexts']} contexts, mean batch {summary['mean_batch']:.1f})"
    )
    return r


def run(
    lm,
    eos,
    *,
    text: bytes,
    Ks=(8,),
    smc=(("regex", 32),),
    max_bytes=24,
    smc_K=4,
    reps=3,
    seed=0,
    mode="critic",
    log=print,
) -> list[dict]:
    results = []
    for K in Ks:
        results.append(measure(lm, f"W1 score {len(text)} B, K={K}", lambda K=K: _w1(lm, eos, text, K), reps, log))
    for task, n in smc:
        results.append(
            measure(
                lm,
                f"W2 SMC {task}, {n} particles, {max_bytes} B, K={smc_K}",
                lambda task=task, n=n: _w2(lm, eos, task, n, max_bytes, smc_K, seed, mode),
                reps,
                log,
            )
        )
    return results


def render(meta, results) -> str:
    _, md = header(
        "W4 LM-call floor",
        date=meta["date"],
        machine=meta["machine"],
        threads=meta.get("threads_rec"),
        model=meta["model"],
        backend=meta["backend"],
        device="cpu",
        extra=(
            f"- command: `{meta['command']}`; {meta['reps']} repetitions "
            "(run, then replay of its recorded LM calls on emptied caches)\n"
            "- floor = replaying exactly our LM batches with no beam work; "
            "overhead = ours / floor (1.00 = free beam)"
        ),
    )
    rows = []
    for r in results:
        o, f, c = r["ours_s"], r["floor_s"], r["calls"]
        rows.append(
            [
                r["workload"],
                f"{o['median']:.2f} ({o['min']:.2f}–{o['max']:.2f})",
                f"{f['median']:.2f} ({f['min']:.2f}–{f['max']:.2f})",
                f"{r['overhead']['median']:.2f}× ({r['overhead']['min']:.2f}–{r['overhead']['max']:.2f})",
                f"{c['batch_calls']} / {c['contexts']} / {c['mean_batch']:.1f}",
            ]
        )
    md += "\n" + md_table(
        ["workload", "ours s", "LM floor s", "ours / floor", "LM batch calls / contexts / mean batch"], rows
    )
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="512 bytes, SMC 8 particles, 1 rep")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "mock"])
    p.add_argument("--mock-vocab", default="model", choices=["model", "tiny"])
    p.add_argument("--K", nargs="*", type=int, default=[8])
    p.add_argument("--bytes", type=int, default=None)
    p.add_argument("--particles", nargs="*", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=24)
    p.add_argument("--smc-K", type=int, default=4)
    p.add_argument("--mode", default="critic", choices=["critic", "product"])
    p.add_argument("--reps", type=int, default=None)
    add_common_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    reps = a.reps or (1 if a.quick else 3)
    text = heldout_text(a.bytes or (512 if a.quick else None))
    particles = a.particles or ([8] if a.quick else [32])
    lm, info = make_lm(a.model, vocab=a.mock_vocab)
    results = run(
        lm,
        info["eos"],
        text=text,
        Ks=tuple(a.K),
        smc=tuple(("regex", n) for n in particles),
        max_bytes=a.max_bytes,
        smc_K=a.smc_K,
        reps=reps,
        mode=a.mode,
    )
    meta, _ = header(
        "W4", date=a.date, machine=a.machine, model=info["model"], backend=info["backend"], threads=threads
    )
    meta["threads_rec"] = threads
    meta.update(command=command_line("benchmarks.w4_floor", argv if argv is not None else sys.argv[1:]), reps=reps)
    md = render(meta, results)
    print(md)
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
