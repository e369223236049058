"""Fidelity: how far the beam's bits/byte are from a large-K reference.

For a few texts (prose, code, non-ASCII), scores each with ``ByteLM(lm, K).score`` for
several beam widths and with ``canonical=True``, and reports bits/byte and the excess over
the reference (the largest K, full beam): ``bpb(K) - bpb(K_ref)``. Negative excess is
possible: a pruned beam's normalized probability can exceed the exact one (see
``genlm_bytes_potential.beam``). All runs share one LM, so the HF backend's prefix cache
serves contexts that several K evaluate; the reference runs first.

    python -m benchmarks.fidelity [--K 1 2 4 8 16] [--ref 32] [--bytes 300] [--texts prose code nonascii]

The defaults take ~10 min on 2 idle cores (the reference dominates: ~0.3 s/byte at K=32,
~0.8 s/byte at K=64 on the HF backend).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from benchmarks.common import DATA_DIR, add_common_args, command_line, header, md_table, save_json, set_threads

CODE = '''def byte_posterior(sequences) -> list[tuple[bytes, float]]:
    """Completed byte strings of an SMC run with their posterior probabilities."""
    mass: dict[bytes, float] = {}
    for ctx, lw in zip(sequences.contexts, sequences.log_normalized_weights):
        if np.isfinite(lw) and ctx and isinstance(ctx[-1], EndOfSequence):
            key = bytes(ctx[:-1])
            mass[key] = mass.get(key, 0.0) + math.exp(lw)
    total = sum(mass.values())
    return sorted(((k, v / total) for k, v in mass.items()), key=lambda kv: -kv[1])
'''

NONASCII = (
    "Le café de la gare ouvre à six heures ; on y sert des crêpes et du thé. "
    "Die Straße war nass, und die Bäume rauschten über den Köpfen der Fußgänger. "
    "東京の朝は静かで、駅のホームには人が少なかった。"
    "Москва — столица России. Ελληνικά: καλημέρα! Emoji: 🚀✨ — fin."
)


def texts(n_bytes: int) -> dict[str, bytes]:
    prose = (DATA_DIR / "heldout.txt").read_bytes()
    out = {"prose": prose, "code": CODE.encode(), "nonascii": NONASCII.encode()}
    cut = {}
    for name, data in out.items():
        data = data[:n_bytes]
        while data and (data[-1] & 0xC0) == 0x80:  # do not end inside a character
            data = data[:-1]
        if data and data[-1] >= 0xC0:
            data = data[:-1]
        cut[name] = data
    return cut


async def score(lm, data: bytes, K, canonical: bool):
    from genlm_bytes_potential.byte_lm import ByteLM

    blm = ByteLM(lm, K=K, canonical=canonical)
    t = time.perf_counter()
    s = await blm.score(data)
    return {
        "bpb": s.bits_per_byte,
        "logprob": s.logprob,
        "heals": s.heals,
        "lm_contexts": blm.model.stats.contexts,
        "seconds": time.perf_counter() - t,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--K", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--ref", type=int, default=32, help="reference beam width")
    p.add_argument("--canonical-K", type=int, nargs="*", default=[8], help="K values also run with canonical=True")
    p.add_argument("--bytes", type=int, default=300, help="bytes per text (cut at a character boundary)")
    p.add_argument("--texts", nargs="+", default=["prose", "code", "nonascii"])
    p.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M)")
    p.add_argument("--backend", default="hf")
    add_common_args(p)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)

    from genlm_bytes_potential.models import load_lm

    lm = load_lm(args.model, backend=args.backend)
    data = {k: v for k, v in texts(args.bytes).items() if k in args.texts}
    configs = (
        [(args.ref, False)] + [(K, False) for K in sorted(args.K, reverse=True)] + [(K, True) for K in args.canonical_K]
    )
    results = []
    t0 = time.perf_counter()
    for name, text in data.items():
        for K, canonical in configs:
            r = asyncio.run(score(lm, text, K, canonical))
            r.update(text=name, n_bytes=len(text), K=K, canonical=canonical)
            results.append(r)
            print(
                f"{name:9s} K={K:<3d}{' canonical' if canonical else '          '} {r['bpb']:.6f} bits/byte  heals={r['heals']}  contexts={r['lm_contexts']}  {r['seconds']:.1f}s",
                flush=True,
            )
    wall = time.perf_counter() - t0

    ref = {r["text"]: r["bpb"] for r in results if r["K"] == args.ref and not r["canonical"]}
    names = list(data)
    rows = []
    for K, canonical in configs:
        row = [f"{K}{' canonical' if canonical else ''}" + (" (ref)" if (K, canonical) == (args.ref, False) else "")]
        for name in names:
            r = next(x for x in results if x["text"] == name and x["K"] == K and x["canonical"] == canonical)
            excess = r["bpb"] - ref[name]
            heal = f", {r['heals']} heals" if r["heals"] else ""
            row.append(f"{r['bpb']:.5f} ({excess:+.1e}{heal})")
        mean = sum(
            abs(
                next(x for x in results if x["text"] == n and x["K"] == K and x["canonical"] == canonical)["bpb"]
                - ref[n]
            )
            for n in names
        ) / len(names)
        ok = (" ✅" if mean <= 1e-4 else " ❌") if (K, canonical) == (8, False) else ""
        row.append(f"{mean:.1e}{ok}")
        rows.append(row)

    model_name = args.model or "SmolLM2-135M-Instruct (default, fp32 from Q4_1 GGUF)"
    meta, md = header(
        "Fidelity",
        date=args.date,
        machine=args.machine,
        model=model_name,
        backend=args.backend,
        threads=threads,
        extra=(
            f"- command: `{command_line('benchmarks.fidelity', sys.argv[1:] if argv is None else argv)}`; wall {wall / 60:.1f} min\n"
            f"- texts: "
            + ", ".join(f"{n} ({len(t)} bytes)" for n, t in data.items())
            + "; scored from BOS with `ByteLM(lm, K, canonical=...).score(text)` (healing on: a byte no candidate reads costs the healed estimate)\n"
            f"- cells: bits/byte (excess over K={args.ref} in bits/byte); target ≤ 1e-4 excess at K = 8"
        ),
    )
    table = md_table(["K"] + names + ["mean abs. excess"], rows)
    text = md + "\n" + table
    print(text)
    meta["command"] = command_line("benchmarks.fidelity", sys.argv[1:] if argv is None else argv)
    if not args.no_write:
        save_json(meta, results, name=None)


if __name__ == "__main__":
    main()
