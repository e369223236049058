"""One ``PagedTokenLM`` step: ``N`` new one-token contexts on a cached prefix.

    python -m benchmarks.lm_step [--model smollm2|tiny|PATH] [--device cpu|cuda]
                                 [--dtype float32|bfloat16] [--N 1 8 32 128] [--reps 30]

A byte beam's usual LM call: every context extends one cached context by one token. The
prefix (``--prefix-bytes`` of the held-out text after BOS) is evaluated once; each
repetition then asks for ``N`` contexts ``prefix + (t,)`` with tokens ``t`` never asked
for before. Per ``N`` and per API (``sync``: ``batch_next_token_logprobs_sync``,
``async``: ``await batch_next_token_logprobs`` as ``TokenModel`` calls it), medians and
ranges over ``--reps`` repetitions (after warm-ups that capture the CUDA graphs) of:

* ``total_ms``: the call, until its log-probs are ready (on CUDA: synchronized);
* ``host_ms``: the host's own work in the call: the call's wall time (not synchronized)
  less the time spent inside the model's forward on the host (``PagedTokenLM._run``:
  the whole forward on the CPU; on CUDA a graph replay only launches it);
* ``hit_ms``: the same ``N`` contexts asked for again (answered from the cache);
* ``plan_ms``: the call with the forward pass replaced by nothing and log-prob rows one
  column wide (then the cache is cleared): the host's planning, packing and bookkeeping
  alone, as on an infinitely fast device.

On the CPU ``host_ms`` also holds the copy of the returned log-prob rows (``N x V``
floats; one kernel on a GPU), and ``async`` times hold the hop to the worker thread that
runs CPU forwards (none on CUDA): there ``plan_ms`` of ``sync`` is the measure of the
host's own work.

Prints one JSON object (``meta``, ``results``); ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from benchmarks.common import git_commit, machine_desc, versions
from benchmarks.lms import _tiny_model_dir, heldout_text


def _stat_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median": round(statistics.median(ms), 4), "min": round(min(ms), 4), "max": round(max(ms), 4)}


class _ForwardClock:
    """Seconds spent inside ``lm._run`` (the forward pass, when it runs on the host),
    while in a ``with`` block."""

    def __init__(self, lm):
        self.lm = lm
        self.spent = 0.0

    def __enter__(self):
        run = self.lm._run

        def timed(*args):
            t = time.perf_counter()
            try:
                return run(*args)
            finally:
                self.spent += time.perf_counter() - t

        self.lm._run = timed
        return self

    def __exit__(self, *exc):
        del self.lm._run  # the class's method again


class _NoForward:
    """In a ``with`` block, ``lm``'s forward pass does nothing and its log-prob rows are
    one column wide; on leaving, the cache (whose rows were never written) is cleared."""

    def __init__(self, lm):
        self.lm = lm

    def __enter__(self):
        lm = self.lm
        self.saved = lm.cuda_graphs, lm.logprob_rows
        lm._run = lambda *args: None
        lm.cuda_graphs, lm.logprob_rows = False, lm.logprob_rows[:, :1]

    def __exit__(self, *exc):
        lm = self.lm
        del lm._run
        lm.cuda_graphs, lm.logprob_rows = self.saved
        lm.clear_cache()


def load(model: str, device: str, dtype: str):
    from genlm_bytes_potential.backends.paged import PagedTokenLM
    from genlm_bytes_potential.models import default_model_dir

    path = {"smollm2": lambda: str(default_model_dir()), "tiny": _tiny_model_dir}.get(model, lambda: model)()
    return PagedTokenLM.from_name(path, dtype=getattr(torch, dtype), device=device), path


def measure(lm, prefix: tuple[int, ...], sizes: list[int], reps: int, warmup: int = 3) -> list[dict]:
    """Per ``N`` in ``sizes`` and per API, the times of one step (see the module
    docstring) over ``reps`` repetitions after ``warmup`` ones."""
    fresh_needed = 2 * (warmup + reps) * sum(sizes)
    if fresh_needed > lm.vocab_size - 1000:
        raise ValueError(
            f"{fresh_needed} one-token contexts need more than the {lm.vocab_size - 1000} "
            f"token ids >= 1000 of the vocabulary; lower reps or sizes"
        )
    cuda = lm.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def contexts(n):
        return [prefix + (next(fresh),) for _ in range(n)]

    async def timed_async(ctxs):
        return await lm.batch_next_token_logprobs(ctxs)

    loop = asyncio.new_event_loop()
    calls = {
        "sync": lm.batch_next_token_logprobs_sync,
        "async": lambda ctxs: loop.run_until_complete(timed_async(ctxs)),
    }
    results = []
    lm.clear_cache()
    lm.batch_next_token_logprobs_sync([prefix])
    fresh = iter(range(1000, lm.vocab_size))  # next-token ids never asked for after the prefix
    with _ForwardClock(lm) as clock:
        for n in sizes:
            for api, call in calls.items():
                total, host, hit = [], [], []
                for rep in range(warmup + reps):
                    ctxs = contexts(n)
                    sync()
                    forward0 = clock.spent
                    t0 = time.perf_counter()
                    call(ctxs)
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    call(ctxs)
                    sync()
                    t3 = time.perf_counter()
                    if rep >= warmup:
                        total.append(t2 - t0)
                        host.append(t1 - t0 - (clock.spent - forward0))
                        hit.append(t3 - t2)
                results.append(
                    {
                        "N": n,
                        "api": api,
                        "total_ms": _stat_ms(total),
                        "host_ms": _stat_ms(host),
                        "hit_ms": _stat_ms(hit),
                    }
                )
    lm.clear_cache()
    lm.batch_next_token_logprobs_sync([prefix])
    fresh = iter(range(1000, lm.vocab_size))
    with _NoForward(lm):
        for row in results:
            call, plan = calls[row["api"]], []
            for _ in range(warmup + reps):
                ctxs = contexts(row["N"])
                t0 = time.perf_counter()
                call(ctxs)
                plan.append(time.perf_counter() - t0)
            row["plan_ms"] = _stat_ms(plan[warmup:])
    loop.close()
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default model), tiny, or a model folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--N", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--prefix-bytes", type=int, default=300)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    lm, path = load(args.model, args.device, dtype)
    text = heldout_text(args.prefix_bytes).decode("utf-8", "ignore")
    bos = lm.bos_token_id if lm.bos_token_id is not None else lm.eos_token_id
    prefix = tuple([bos] + lm.tokenizer.encode(text, add_special_tokens=False))
    results = measure(lm, prefix, args.N, args.reps)
    meta = {
        "workload": "lm_step",
        "model": path,
        "backend": repr(lm),
        "device": args.device,
        "dtype": dtype,
        "prefix_tokens": len(prefix),
        "reps": args.reps,
        "machine": machine_desc(args.device),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = json.dumps({"meta": meta, "results": results}, indent=1)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
