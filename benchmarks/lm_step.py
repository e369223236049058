"""One ``PagedTokenLM`` step: ``N`` new one-token contexts on a cached prefix.

    python -m benchmarks.lm_step [--model smollm2|tiny|PATH] [--device cpu|cuda]
                                 [--dtype float32|bfloat16] [--N 1 8 32 128] [--reps 30]
                                 [--variants eager compiled] [--profile]

A byte beam's usual LM call: every context extends one cached context by one token. The
prefix (``--prefix-bytes`` of the held-out text after BOS) is evaluated once; each
repetition then asks for ``N`` contexts ``prefix + (t,)`` with tokens ``t`` never asked
for before. Per variant of the forward (``eager``: ``compile=False``, with the fused
kernels of ``backends.kernels`` on CUDA; ``unfused``: the same without them; ``sdpa``: the
fused kernels, but attention by SDPA, not ``shared_keys_attention``; ``compiled``:
the decoder layer through ``torch.compile``; all with CUDA graphs on CUDA), per ``N`` and per
API (``sync``: ``batch_next_token_logprobs_sync``, ``async``: ``await
batch_next_token_logprobs`` as ``TokenModel`` calls it), medians and ranges over
``--reps`` repetitions (after warm-ups that capture the CUDA graphs) of:

* ``total_ms``: the call, until its log-probs are ready (on CUDA: synchronized);
* ``host_ms``: the host's own work in the call: the call's wall time (not synchronized)
  less the time spent inside the model's forward on the host (``PagedTokenLM._run``:
  the whole forward on the CPU; on CUDA a graph replay only launches it);
* ``hit_ms``: the same ``N`` contexts asked for again (answered from the cache);
* ``plan_ms``: the call with the forward pass replaced by nothing and log-prob rows one
  column wide (then the cache is cleared): the host's planning, packing and bookkeeping
  alone, as on an infinitely fast device.

Per variant, ``meta.variants`` holds ``first_call_s`` (the first call of each ``N``:
graph capture and, compiled, compilation), ``dynamo_graphs`` (graphs compiled by
``torch.compile`` for it) and ``max_abs_diff_vs_hf``: its log-probs of 16 contexts on the
prefix (8 of one new token, 8 of three) against the Hugging Face model's own forward. ``--profile`` adds, per variant, the kernels of one ``N =
32`` step (``--profile-N``) under ``torch.profiler``: their count and total device time,
for the graph replay and for the same forward launched kernel by kernel, and a table
(stderr) of the launched one by kernel. ``--variants ... autotuned`` adds the compiled
layer with inductor's ``max-autotune-no-cudagraphs`` mode (Triton matmul templates).

On the CPU ``host_ms`` also holds the copy of the returned log-prob rows (``N x V``
floats; one kernel on a GPU), and ``async`` times hold the hop to the worker thread that
runs CPU forwards (none on CUDA): there ``plan_ms`` of ``sync`` is the measure of the
host's own work; the profile counts top-level operators instead of kernels (a compiled
program's own C++ kernels are not among them: only the GPU profile compares variants).

Prints a summary table (stderr) and one JSON object (stdout: ``meta``, ``results``, a
row per variant, ``N`` and API); ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
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
    """The model and tokenizer of ``model`` (smollm2, tiny or a folder) and its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.models import default_model_dir

    path = {"smollm2": lambda: str(default_model_dir()), "tiny": _tiny_model_dir}.get(model, lambda: model)()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return hf, AutoTokenizer.from_pretrained(path), path


def first_calls(lm, prefix: tuple[int, ...], sizes: list[int]) -> dict:
    """Seconds of the first call of each ``N`` (graph capture, compilation) and the
    graphs ``torch.compile`` made meanwhile; the cache is cleared afterwards."""
    from torch._dynamo.utils import counters

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    graphs = counters["stats"]["unique_graphs"]
    lm.clear_cache()
    lm.batch_next_token_logprobs_sync([prefix])
    fresh = iter(range(lm.vocab_size - 1, 0, -1))
    seconds = {}
    for n in sizes:
        sync()
        t = time.perf_counter()
        lm.batch_next_token_logprobs_sync([prefix + (next(fresh),) for _ in range(n)])
        sync()
        seconds[n] = round(time.perf_counter() - t, 3)
    lm.clear_cache()
    return {"first_call_s": seconds, "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs}


def check_contexts(prefix: tuple[int, ...], vocab_size: int) -> list[tuple[int, ...]]:
    """16 contexts on the prefix: 8 of one new token, 8 of three (waves of one and of
    several new tokens)."""
    tokens = range(vocab_size // 2, vocab_size // 2 + 16)
    return [prefix + (t,) for t in tokens[:8]] + [prefix + (t, t + 1, t + 2) for t in tokens[8:]]


def reference_logprobs(model, contexts, V: int) -> torch.Tensor:
    """Next-token log-probs of each context by the Hugging Face model's own forward
    (no cache), float32 on the CPU."""
    with torch.no_grad():
        rows = [model(torch.tensor([c], device=model.device)).logits[0, -1, :V].float() for c in contexts]
    return torch.log_softmax(torch.stack(rows), dim=-1).cpu()


def profile_step(lm, prefix: tuple[int, ...], n: int) -> tuple[dict, str]:
    """Kernels (on the CPU: operators) of one step of ``n`` new contexts, as it runs
    (a CUDA graph replay on CUDA) and launched one by one (graphs off): count and total
    device microseconds of each, and a table of the launched one by kernel."""
    from torch.profiler import ProfilerActivity, profile

    cuda = lm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out, table = {}, ""
    fresh = iter(range(lm.vocab_size - 1, 0, -1))
    graphs = lm.cuda_graphs
    for mode in ("graph", "launched") if cuda else ("launched",):
        lm.cuda_graphs = graphs and mode == "graph"
        try:
            lm.clear_cache()
            lm.batch_next_token_logprobs_sync([prefix])
            lm.batch_next_token_logprobs_sync([prefix + (next(fresh),) for _ in range(n)])  # warm
            ctxs = [prefix + (next(fresh),) for _ in range(n)]
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                lm.batch_next_token_logprobs_sync(ctxs)
                if cuda:
                    torch.cuda.synchronize()
        finally:
            lm.cuda_graphs = graphs
        if cuda:
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset"))]
            sort = "self_device_time_total"
        else:  # operators at the top level of the call
            kernels = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
            sort = "self_cpu_time_total"
        out[mode] = {
            "kernels": len(kernels),
            "device_us": round(sum(e.time_range.elapsed_us() for e in kernels), 1),
        }
        if mode == "launched":
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    lm.clear_cache()
    return out, table


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
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["eager", "compiled"],
        help="forwards to measure side by side (default: both)",
    )
    p.add_argument("--profile", action="store_true", help="kernels of one step per variant (torch.profiler)")
    p.add_argument("--profile-N", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from genlm_bytes_potential.backends.paged import PagedTokenLM

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, tok, path = load(args.model, args.device, dtype)
    text = heldout_text(args.prefix_bytes).decode("utf-8", "ignore")
    results, variants, ref = [], {}, None
    for variant in args.variants:
        lm = PagedTokenLM(model, tok, **VARIANTS[variant])
        bos = lm.bos_token_id if lm.bos_token_id is not None else lm.eos_token_id
        prefix = tuple([bos] + tok.encode(text, add_special_tokens=False))
        info = variants[variant] = first_calls(lm, prefix, args.N)
        if ref is None:
            checks = check_contexts(prefix, lm.vocab_size)
            ref = reference_logprobs(model, checks, lm.vocab_size)
        got = lm.batch_next_token_logprobs_sync(checks).cpu()
        info["max_abs_diff_vs_hf"] = {
            "one_token": round((got[:8] - ref[:8]).abs().max().item(), 5),
            "three_tokens": round((got[8:] - ref[8:]).abs().max().item(), 5),
        }
        lm.clear_cache()
        for row in measure(lm, prefix, args.N, args.reps):
            results.append({"variant": variant, **row})
        info["compile"] = lm.compile  # False after a fall-back
        if args.profile:
            info["profile"], table = profile_step(lm, prefix, args.profile_N)
            print(f"# {variant}: one step of N = {args.profile_N}, launched kernel by kernel", file=sys.stderr)
            print(table, file=sys.stderr)
        del lm
    meta = {
        "workload": "lm_step",
        "model": path,
        "backend": f"PagedTokenLM({type(model).__name__})",
        "device": args.device,
        "dtype": dtype,
        "prefix_tokens": len(prefix),
        "reps": args.reps,
        "variants": variants,
        "machine": machine_desc(args.device),
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(summary(results, variants), file=sys.stderr)
    out = json.dumps({"meta": meta, "results": results}, indent=1)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


#: ``--variants``: the ``compile`` argument of ``PagedTokenLM`` for each (``autotuned``:
#: matmuls tuned as Triton templates too; minutes of compiling, not in the default)
#: forwards of ``PagedTokenLM`` by name: its keyword arguments
VARIANTS = {
    "eager": {"compile": False},
    "unfused": {"compile": False, "fused_kernels": False},
    "sdpa": {"compile": False, "attention_kernel": False},
    "compiled": {"compile": True},
    "autotuned": {"compile": "max-autotune-no-cudagraphs"},
}


def summary(results: list[dict], variants: dict) -> str:
    """The medians side by side: per N and API, total and host ms of each variant; then
    each variant's first calls, compiled graphs and profile."""
    names = list(variants)
    by = {(r["variant"], r["N"], r["api"]): r for r in results}
    lines = ["N     api    " + "".join(f"{v + ' total':>16}{v + ' host':>15}" for v in names)]
    for n, api in dict.fromkeys((r["N"], r["api"]) for r in results):
        cells = "".join(
            f"{by[v, n, api]['total_ms']['median']:16.3f}{by[v, n, api]['host_ms']['median']:15.3f}" for v in names
        )
        lines.append(f"{n:<6}{api:<7}{cells}")
    for v, info in variants.items():
        first = ", ".join(f"N={n}: {s:.2f} s" for n, s in info["first_call_s"].items())
        diff = info["max_abs_diff_vs_hf"]
        line = (
            f"{v}: compile={info['compile']}, dynamo graphs {info['dynamo_graphs']}, first calls {first}; "
            f"max |log-prob - HF| {diff['one_token']:.2g} (1 new token), {diff['three_tokens']:.2g} (3)"
        )
        for mode, k in info.get("profile", {}).items():
            line += f"; {mode}: {k['kernels']} kernels, {k['device_us']:.0f} us"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
