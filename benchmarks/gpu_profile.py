"""Where a byte step's time goes on a CUDA GPU: trie masses and their transfer, one LM
step of ``PagedTokenLM`` (``benchmarks.lm_step``), W1 scoring throughput, and a cProfile of
one scoring run.

    python -m benchmarks.gpu_profile --bytes 400 --K 5 8
    python -m benchmarks.gpu_profile --bytes 2113 --K 8 --sweep 4:64 6:128 10:256
    python -m benchmarks.gpu_profile --w2 32 128 --w2-bytes 32
    python -m benchmarks.gpu_profile --bytes 500 --K 8 --busy

Prints medians of 30 repetitions for the micro-measurements (ms) and bytes/s for W1
(after a warm-up pass over the same text, so CUDA graphs are captured). ``--sweep
LOOKAHEAD:MAX_PREFETCH ...`` instead times W1 at the last K for each prefetch setting
(bytes read ahead, most contexts per LM call): LM calls, contexts and bytes/s per setting.
``--w2 PARTICLES ...`` instead splits W2 runs (regex SMC in product mode, ``w2_split``):
our potential, the LM inside it, the grammar and genlm-control's own work, per SMC step.
``--busy`` instead scores the first ``--bytes`` bytes at the last K (a warm-up, a timed
pass, then a pass under torch.profiler, CUDA kernels only): the GPU's kernel time against
wall time, and the kernels that took most of it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time

import torch

from benchmarks import lm_step
from benchmarks.lms import heldout_text


def _median_ms(fn, reps=30) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2] * 1e3


class _Timers:
    """Wall-clock milliseconds spent in wrapped functions, by label (a nested function is
    also counted in its callers), and per group the time in which any of the group's
    functions ran (``running``: concurrent calls, e.g. two coroutines awaiting the same
    GPU step, count once). ``undo`` restores what was wrapped."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self._active: dict[str, tuple[int, float]] = {}  # group -> (calls running, since)
        self._undo: list[tuple] = []

    def wrap(self, owner, name: str, label: str, is_async: bool = False, groups: tuple[str, ...] = ()) -> None:
        fn = getattr(owner, name)

        def enter() -> float:
            t = time.perf_counter()
            for g in groups:
                n, since = self._active.get(g, (0, t))
                self._active[g] = (n + 1, since)
            return t

        def leave(t: float) -> None:
            now = time.perf_counter()
            self.spent[label] = self.spent.get(label, 0.0) + (now - t) * 1e3
            for g in groups:
                n, since = self._active[g]
                self._active[g] = (n - 1, since)
                if n == 1:
                    self.running[g] = self.running.get(g, 0.0) + (now - since) * 1e3
                    del self._active[g]

        if is_async:

            async def timed(*a, **k):
                t = enter()
                try:
                    return await fn(*a, **k)
                finally:
                    leave(t)
        else:

            def timed(*a, **k):
                t = enter()
                try:
                    return fn(*a, **k)
                finally:
                    leave(t)

        own = name in vars(owner)  # else found on its class (or a base): undone by deleting
        setattr(owner, name, timed)
        self._undo.append((owner, name, fn if own else None))

    def undo(self) -> None:
        for owner, name, fn in reversed(self._undo):
            if fn is None:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
        self._undo.clear()


def _split(blm, lm, text) -> dict[str, float]:
    """Wall-clock milliseconds of one scoring run, split by wrapping the main pieces
    (nested pieces are also counted in their callers): the LM calls (the paged backend's
    host work, the wait for the GPU, the store's and the trie's work around it), then a
    step's phases (:mod:`genlm_bytes_potential.beam`), drafts included. Adds the run's LM
    calls, forward passes and contexts asked for."""
    from genlm_bytes_potential import lm_state
    from genlm_bytes_potential.beam import draft, extend, prefetch

    model = blm.model
    timers = _Timers()
    wrap = timers.wrap
    wrap(lm_state.TokenModel, "_compute", "TokenModel._compute (LM call, trie batch into the store)", True)
    wrap(lm, "batch_next_token_logprobs", "  LM call (await)", True)
    wrap(lm, "_evaluate", "    evaluate (plan and queue the forward, gather rows)")
    wrap(lm, "_forward_wave", "      forward pass (pack, replay)")
    wrap(lm, "_cached_logprobs", "      log-prob gather")
    wrap(lm_state, "event_done", "  wait for the GPU (forward pass, masses, copy)", True)
    wrap(lm_state.MassStore, "allocate", "  store: allocate rows")
    wrap(model.trie, "masses", "  trie masses (queued)")
    wrap(model.trie, "path_nodes", "  nodes of the bytes ahead")
    wrap(lm_state.MassStore, "send_paths", "  store: queue the copy of paths")
    wrap(lm_state.MassStore, "keep_paths", "  store: keep the copied paths")
    wrap(lm_state, "to_host", "store gathers to the host")
    wrap(extend, "_ensure", "step: rows still valid", True)
    wrap(extend, "_read_and_prune", "step: read and prune", True)
    wrap(extend, "_fetch_fronts", "step: fetch the next step's masses")
    wrap(extend, "_prefetch", "step: prefetch", True)
    wrap(prefetch, "drafted_contexts", "  drafted contexts", True)
    wrap(draft, "draft", "    draft (stand-ins, gather, kernels, extensions)", True)
    wrap(prefetch, "speculative_contexts", "  ranked guesses")
    wrap(extend, "_assemble", "step: assemble", True)
    wrap(lm_state.TokenModel, "extend", "contexts extended (all phases)")
    wrap(lm_state.TokenModel, "log_mass", "mass gathers (all phases)")
    calls, forwards, contexts = model.stats.batch_calls, lm.forward_calls, model.stats.contexts
    t = time.perf_counter()
    try:
        asyncio.run(blm.score(text))
    finally:
        timers.undo()
    timers.spent["total"] = (time.perf_counter() - t) * 1e3
    timers.spent["LM calls (count)"] = model.stats.batch_calls - calls
    timers.spent["forward passes (count)"] = lm.forward_calls - forwards
    timers.spent["contexts asked for (count)"] = model.stats.contexts - contexts
    return timers.spent


def w2_split(lm, eos, particles: int, max_bytes: int = 32, K: int = 4, seed: int = 0) -> dict[str, float]:
    """One W2 run (regex SMC, product mode, as ``benchmarks.w2_smc``) split by wall-clock
    milliseconds: while any of our potential's calls runs (and the LM's calls inside
    them), while any of the grammar's runs, and the rest (genlm-control's sampler and
    resampling, the product's own work). Concurrent calls count once: the sampler may
    await two of ours at once, or the grammar's while ours awaits the GPU. Adds ``bytes``
    (all particles) and ``steps`` (the longest particle's bytes: SMC steps)."""
    from benchmarks import w2_smc
    from genlm_bytes_potential import potential, tokens

    timers = _Timers()
    for method in ("batch_logw_next", "batch_prefix", "batch_complete"):
        timers.wrap(potential.ByteBeamPotential, method, f"ours: {method}", True, groups=("ours", "potentials"))
        timers.wrap(tokens.ByteTokenView, method, f"grammar: {method}", True, groups=("grammar", "potentials"))
    timers.wrap(lm, "batch_next_token_logprobs", "LM", True, groups=("LM",))
    try:
        r = asyncio.run(w2_smc.smc_once("ours", lm, "regex", particles, max_bytes, K, eos, seed, "product"))
    finally:
        timers.undo()
    total, running = r["seconds"] * 1e3, timers.running
    return {
        "total": total,
        "ours": running.get("ours", 0.0),
        "  LM calls inside ours": running.get("LM", 0.0),
        "grammar": running.get("grammar", 0.0),
        "rest (sampler, resampling, product)": total - running.get("potentials", 0.0),
        "bytes": r["bytes"],
        "steps": r["longest"],
    }


def _sweep(lm, eos, text: bytes, K: int, settings: list[str]) -> None:
    """W1 at ``K`` per prefetch setting (a warm-up pass, then one timed pass from an empty cache)."""
    from genlm_bytes_potential.byte_lm import ByteLM

    for setting in settings:
        lookahead, max_prefetch = (int(x) for x in setting.split(":"))
        blm = ByteLM(lm, K=K, eos_tokens=eos, lookahead=lookahead)
        blm.model.max_prefetch = max_prefetch
        asyncio.run(blm.score(text))
        lm.clear_cache()
        calls, contexts, forwards = blm.model.stats.batch_calls, blm.model.stats.contexts, lm.forward_calls
        t = time.perf_counter()
        score = asyncio.run(blm.score(text))
        dt = time.perf_counter() - t
        print(
            f"W1 K={K} lookahead={lookahead} max_prefetch={max_prefetch}: {len(text) / dt:.1f} B/s, "
            f"{blm.model.stats.batch_calls - calls} LM calls, {blm.model.stats.contexts - contexts} contexts, "
            f"{lm.forward_calls - forwards} forward passes, {score.bits_per_byte:.4f} bits/byte"
        )
        lm.clear_cache()


def _print_w2(lm, eos, particles: list[int], max_bytes: int, reps: int = 2) -> None:
    """``w2_split`` per particle count (after an untimed warm-up run), in ms per SMC step."""
    w2_split(lm, eos, 2, 4)
    for n in particles:
        for rep in range(reps):
            r = w2_split(lm, eos, n, max_bytes, seed=rep)
            steps = max(1, r.pop("steps"))
            nbytes = r.pop("bytes")
            print(
                f"W2 regex product, {n} particles, run {rep}: {nbytes / r['total'] * 1e3:.1f} B/s, {steps} steps; ms per step:"
            )
            for name, ms in r.items():
                print(f"  {name}: {ms / steps:.3f}")


def _print_busy(blm, lm, text: bytes, top: int = 25) -> None:
    """W1 once without the profiler (B/s), then under torch.profiler (CUDA activity only):
    how much of the wall time the GPU spends in kernels, and the ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    asyncio.run(blm.score(text))  # warm-up: CUDA graphs of every bucket
    lm.clear_cache()
    t = time.perf_counter()
    s = asyncio.run(blm.score(text))
    dt = time.perf_counter() - t
    print(f"W1 unprofiled: {len(text) / dt:.1f} B/s, log-prob {s.logprob:.10f}")
    lm.clear_cache()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        asyncio.run(blm.score(text))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    kernels = prof.key_averages()
    busy = sum(device_us(e) for e in kernels) / 1e3
    print(f"profiled: wall {dt * 1e3:.0f} ms, GPU kernels {busy:.0f} ms ({busy / (dt * 1e3):.0%} of the wall time)")
    for e in sorted(kernels, key=device_us, reverse=True)[:top]:
        print(f"  {device_us(e) / 1e3:8.1f} ms  {e.count:7d}x  {e.key[:110]}")


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.backends.paged import PagedTokenLM
    from genlm_bytes_potential.byte_lm import ByteLM
    from genlm_bytes_potential.collector import tune_collector
    from genlm_bytes_potential.models import default_model_dir
    from genlm_bytes_potential.transfer import to_host

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument("--K", type=int, nargs="+", default=[5, 8])
    p.add_argument("--sweep", nargs="+", default=None, metavar="LOOKAHEAD:MAX_PREFETCH")
    p.add_argument("--w2", type=int, nargs="+", default=None, metavar="PARTICLES")
    p.add_argument("--w2-bytes", type=int, default=32)
    p.add_argument("--busy", action="store_true", help="the GPU's kernel time in W1 (torch.profiler)")
    args = p.parse_args()
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    lm = PagedTokenLM(model, tok)
    tune_collector()  # as load_lm does
    eos = [bytes(lm.byte_vocab[tok.eos_token_id])]
    text = heldout_text(args.bytes)
    if args.sweep:
        return _sweep(lm, eos, text, args.K[-1], args.sweep)
    if args.w2:
        return _print_w2(lm, eos, args.w2, args.w2_bytes)
    if args.busy:
        return _print_busy(ByteLM(lm, K=args.K[-1], eos_tokens=eos), lm, text)
    trie = ByteLM(lm, eos_tokens=eos).model.trie
    lp = torch.log_softmax(torch.randn(128, lm.vocab_size, device="cuda"), -1)
    for B in (1, 8, 128):
        compute = _median_ms(lambda: trie.masses(lp[:B], True))
        pageable = _median_ms(lambda: trie.masses(lp[:B], True)[0].cpu().numpy())
        pinned = _median_ms(lambda: to_host(trie.masses(lp[:B], True)[0]))
        print(
            f"trie masses, B={B}: {compute:.2f} ms on the GPU; with the copy to the host: "
            f"pageable {pageable:.2f} ms, pinned {pinned:.2f} ms"
        )
    prefix = tuple([tok.bos_token_id] + tok.encode(text[:300].decode("utf-8", "ignore"), add_special_tokens=False))
    for r in lm_step.measure(lm, prefix, [1, 8, 32, 128], reps=30):  # see benchmarks/lm_step.py
        print(
            f"LM one-token step, N={r['N']} ({r['api']}): {r['total_ms']['median']:.2f} ms, of which host "
            f"{r['host_ms']['median']:.2f} ms; cached again: {r['hit_ms']['median']:.2f} ms"
        )
    lm.clear_cache()
    for K in args.K:
        blm = ByteLM(lm, K=K, eos_tokens=eos)
        asyncio.run(blm.score(text))
        lm.clear_cache()
        t = time.perf_counter()
        asyncio.run(blm.score(text))
        print(f"W1 K={K}: {len(text) / (time.perf_counter() - t):.1f} B/s")
    lm.clear_cache()
    print(f"wall-clock split of one K={args.K[-1]} scoring (µs per byte):")
    for name, value in _split(blm, lm, text).items():
        print(f"  {name}: {value}" if name.endswith("(count)") else f"  {name}: {1e3 * value / len(text):.1f}")
    lm.clear_cache()
    calls, forwards = blm.model.stats.batch_calls, lm.forward_calls
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(blm.score(text))
    prof.disable()
    print(
        f"profiled K={args.K[-1]}: {blm.model.stats.batch_calls - calls} trie/LM batches, "
        f"{lm.forward_calls - forwards} forward passes for {len(text)} bytes"
    )
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(35)
        print(out.getvalue())


if __name__ == "__main__":
    main()
