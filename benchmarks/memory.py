"""Memory over a long SMC run: resident set size (RSS) against bytes generated.

Runs genlm-control's ``SMC(direct_token_sampler(potential))`` (no EOS, so every particle
generates ``--bytes-per-particle`` bytes) on ``MockTokenLM`` and samples the process RSS
(``/proc/self/statm``) as bytes accumulate. The beam cache is bounded by ``cache_size``
beams and ``cache_bytes`` of trie masses; the curve should flatten once the cache is full.

Vocabularies: ``small`` (~200 random words over 9 letters: the beam machinery only) or
``smollm2`` (SmolLM2's 49,152 tokens, 149,592 trie nodes: a mass row is 1.2 MB, so the
cache cap is what bounds memory). ``MockTokenLM`` keeps its own LRU of 4,096 log-prob
vectors (V float64 each: 1.6 GB at V = 49,152) and a list of every request (cleared here
every step, as a real backend keeps none); both are reported, not hidden.

    python -m benchmarks.memory [--vocab small|smollm2] [--particles 50] [--bytes-per-particle 2000] [--cache-bytes MiB]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time

import numpy as np

from benchmarks.common import add_common_args, command_line, header, md_table, save_json, set_threads


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def make_lm(vocab: str, seed: int, temperature: float | None):
    from genlm_bytes_potential.backends import MockTokenLM

    if vocab == "small":
        rng = np.random.default_rng(seed)
        words = {bytes(rng.choice(list(b"abcdefgh "), rng.integers(1, 5))) for _ in range(300)}
        return MockTokenLM(
            sorted({bytes([c]) for c in b"abcdefgh "} | words), seed=seed, temperature=temperature or 0.7
        )
    from genlm_bytes_potential.models import load_lm

    # peaked like a real LM (~7 extensions per step at K=8); flat mocks make ~5x more
    return load_lm(None, backend="mock", seed=seed, temperature=temperature or 0.2)


async def run(args) -> dict:
    from genlm.control import SMC, direct_token_sampler

    from genlm_bytes_potential import ByteBeamPotential

    lm = make_lm(args.vocab, args.seed, args.temperature)
    progress = {"bytes": 0, "calls": 0}

    class Counted(ByteBeamPotential):
        async def batch_logw_next(self, contexts):
            progress["bytes"] += len(contexts)
            progress["calls"] += 1
            lm.reset_counters()  # the mock's request log is a test aid, not a backend cost
            return await super().batch_logw_next(contexts)

    pot = Counted(lm, K=args.K, eos_tokens=[], cache_size=args.cache_size, cache_bytes=args.cache_bytes * 2**20)
    gc.collect()
    curve = [(0, 0.0, rss_mib(), 0, 0.0)]
    t0 = time.perf_counter()
    done = False

    async def sample():
        last = -1
        while not done:
            await asyncio.sleep(0.05)
            b = progress["bytes"]
            if b // args.every != last // args.every or last < 0:
                last = b
                curve.append((b, time.perf_counter() - t0, rss_mib(), len(pot.cache), pot.model.store.nbytes / 2**20))

    sampler = asyncio.ensure_future(sample())
    smc = SMC(direct_token_sampler(pot))
    seqs = await smc(n_particles=args.particles, ess_threshold=0.5, max_tokens=args.bytes_per_particle)
    done = True
    await sampler
    curve.append(
        (progress["bytes"], time.perf_counter() - t0, rss_mib(), len(pot.cache), pot.model.store.nbytes / 2**20)
    )
    mock_cache = lm.memo_nbytes / 2**20
    return {
        "curve": curve,
        "bytes": progress["bytes"],
        "calls": progress["calls"],
        "seconds": time.perf_counter() - t0,
        "n_nodes": pot.model.trie.n_nodes,
        "vocab_size": lm.vocab_size,
        "mock_cache_mib": mock_cache,
        "particles_len": [len(c) for c in seqs.contexts],
        "evictions": getattr(pot.cache, "evictions", None),
    }


def lm_temp(args) -> float:
    return args.temperature or (0.7 if args.vocab == "small" else 0.2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", choices=["small", "smollm2"], default="small")
    p.add_argument("--particles", type=int, default=50)
    p.add_argument("--bytes-per-particle", type=int, default=2000)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--cache-size", type=int, default=4096)
    p.add_argument(
        "--cache-bytes", type=int, default=2048, help="beam cache cap in MiB (default: the potential's 2 GiB)"
    )
    p.add_argument("--every", type=int, default=10_000, help="record RSS every this many bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="mock temperature (default 0.7 small, 0.2 smollm2)")
    add_common_args(p)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    r = asyncio.run(run(args))
    curve = r["curve"]
    base = curve[0][2]
    rows = [[f"{b:,}", f"{t:.0f}", f"{m:,.0f}", f"{m - base:+,.0f}", c, f"{nb:,.0f}"] for b, t, m, c, nb in curve]
    extra = (
        f"- command: `{command_line('benchmarks.memory', sys.argv[1:] if argv is None else argv)}`\n"
        f"- SMC(direct_token_sampler(ByteBeamPotential(MockTokenLM, K={args.K}, eos_tokens=[], cache_size={args.cache_size}, "
        f"cache_bytes={args.cache_bytes} MiB))), {args.particles} particles x {args.bytes_per_particle} bytes, ESS threshold 0.5, mock temperature {lm_temp(args)}; "
        f"vocabulary {args.vocab} (V = {r['vocab_size']:,}, {r['n_nodes']:,} trie nodes)\n"
        f"- {r['bytes']:,} bytes in {r['seconds']:.0f} s ({r['calls']:,} batch calls); RSS {base:,.0f} → {curve[-1][2]:,.0f} MiB "
        f"(max {max(c[2] for c in curve):,.0f}); the mock's own log-prob memo holds {r['mock_cache_mib']:,.0f} MiB of that"
    )
    meta, md = header(
        "Memory",
        date=args.date,
        machine=args.machine,
        model=f"MockTokenLM ({args.vocab})",
        backend="mock",
        threads=threads,
        extra=extra,
    )
    text = md + "\n" + md_table(["bytes generated", "s", "RSS MiB", "Δ MiB", "cached beams", "cache masses MiB"], rows)
    print(text)
    meta["command"] = command_line("benchmarks.memory", sys.argv[1:] if argv is None else argv)
    if not args.no_write:
        save_json(meta, {k: v for k, v in r.items() if k != "particles_len"})


if __name__ == "__main__":
    main()
