"""Which key layout the paged backend's forward passes take when W1 scores a text, and how far
the contexts the beam asks for are from the text's canonical tokenization.

    python -m benchmarks.paged_layouts --bytes 600              # SmolLM2 (fp32, this CPU)
    python -m benchmarks.paged_layouts --model tiny --bytes 300

A batch of one-token rows attends over the union of its rows' slot paths (the tree layout,
``PagedTokenLM._pack_tree``) when that union is at most half the keys of a row of keys per
context (``_pack``). Per layout this counts the forward passes, their rows, longest context
and the keys attention reads (the union; or rows x keys), against what a row of keys per
context would read. Then, for the contexts the beam asks for (a second run without
prefetching, counted by ``benchmarks.speculation``), the tokens each has past its longest
common prefix with the canonical tokenization (the tokenizer's encoding of the text): a K=8
beam keeps tokenizations that part from each other early, which is why a layout of one
shared prefix rarely applied (``benchmarks/HISTORY.md``, session 16). Prints only; saves
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

import numpy as np

from benchmarks import speculation
from benchmarks.lms import heldout_text, make_lm

#: tokens past the common prefix with the canonical tokenization, grouped
TAIL_BUCKETS = ((0, 0), (1, 4), (5, 16), (17, 64), (65, None))


def count_layouts(lm) -> list[dict]:
    """Wrap ``lm``'s two packers; returns the list each forward pass then appends to:
    its layout, rows, longest context, keys attention reads, and the keys of a row per
    context (both as padded for the pass)."""
    from genlm_bytes_potential.backends.paged import _key_bucket

    passes: list[dict] = []
    pack_tree, pack = lm._pack_tree, lm._pack

    def record(layout: str, contexts, keys: int, B_pad: int) -> None:
        S = max(map(len, contexts))
        S_pad = _key_bucket(S) if lm.cuda_graphs else S
        passes.append({"layout": layout, "rows": len(contexts), "longest": S, "keys": keys, "row_keys": B_pad * S_pad})

    def tree(contexts, nodes, lens, paths, slots, union, B_pad, U_pad):
        record("tree", contexts, U_pad, B_pad)
        return pack_tree(contexts, nodes, lens, paths, slots, union, B_pad, U_pad)

    def rows(contexts, starts, nodes, lens, N, B_pad, S_pad, paths=None):
        record("rows", contexts, B_pad * S_pad, B_pad)
        return pack(contexts, starts, nodes, lens, N, B_pad, S_pad, paths)

    lm._pack_tree, lm._pack = tree, rows
    return passes


def canonical_tails(asked, canonical: list[int]) -> Counter:
    """Per context (its first token, BOS or EOS, left out): tokens past its longest common
    prefix with ``canonical``, counted by ``TAIL_BUCKETS``."""
    out: Counter = Counter()
    for ctx in asked:
        body = ctx[1:]
        k = 0
        while k < min(len(body), len(canonical)) and body[k] == canonical[k]:
            k += 1
        tail = len(body) - k
        out[next(b for b in TAIL_BUCKETS if tail >= b[0] and (b[1] is None or tail <= b[1]))] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from genlm_bytes_potential.byte_lm import ByteLM

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--bytes", type=int, default=600)
    p.add_argument("--K", type=int, default=8)
    args = p.parse_args(argv)
    lm, info = make_lm(args.model, backend="paged")
    text = heldout_text(args.bytes)
    passes = count_layouts(lm.inner)  # (make_lm's recorder passes calls on to the paged LM)
    score = asyncio.run(ByteLM(lm, K=args.K, eos_tokens=info["eos"]).score(text))
    print(f"W1 K={args.K}, {len(text)} B of the held-out text, {info['model']} (paged): log-prob {score.logprob:.6f}")
    print(
        "| layout | forward passes | rows (mean) | longest context (mean) | keys read (mean) | a row per context (mean) |"
    )
    print("|---|---|---|---|---|---|")
    for layout in ("tree", "rows"):
        sel = [r for r in passes if r["layout"] == layout]
        if sel:
            mean = {k: np.mean([r[k] for r in sel]) for k in ("rows", "longest", "keys", "row_keys")}
            print(
                f"| {layout} | {len(sel)} | {mean['rows']:.1f} | {mean['longest']:.1f} | {mean['keys']:.0f} "
                f"| {mean['row_keys']:.0f} |"
            )
    lm.clear_cache()  # the contexts a run without prefetching asks for (speculation's count)
    asked = asyncio.run(speculation.count(speculation.MemoLM(lm), text, args.K, info["eos"], 0, 0))["contexts"]
    canonical = lm.tokenizer.encode(text.decode("utf-8", "ignore"), add_special_tokens=False)
    if b"".join(bytes(getattr(lm.byte_vocab[t], "byte_string", lm.byte_vocab[t])) for t in canonical) != text:
        print("the tokenizer's encoding does not spell the text's bytes: no canonical comparison")
        return
    tails = canonical_tails(asked, canonical)
    print(f"{len(asked)} contexts asked for; tokens past the common prefix with the canonical tokenization:")
    print("| tokens past | contexts | share |")
    print("|---|---|---|")
    for lo, hi in TAIL_BUCKETS:
        n = tails[(lo, hi)]
        print(f"| {lo}{'' if hi == lo else '+' if hi is None else f'-{hi}'} | {n} | {n / max(1, len(asked)):.2f} |")


if __name__ == "__main__":
    main()
