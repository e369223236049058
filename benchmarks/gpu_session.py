"""W1 scoring on a CUDA GPU: ours vs genlm-control's ByteLLM, side by side in one process.

    python -m benchmarks.gpu_session --bytes 400 --K 1 5 8

The run is saved to ``benchmarks/results/w1-<device>-<time>.json`` (``--no-write``: not saved),
which regenerates BENCHMARKS.md and benchmarks/HISTORY.md (``benchmarks.report``).

The default SmolLM2-135M (bf16 on the GPU, as the anchor's reference run in
shared/device/README.md) is loaded once. Rows (``--rows`` picks some):

* ``ours``: ``ByteLM(PagedTokenLM)`` (KV slot per token-trie node, CUDA graphs;
  LM calls prefetched 6 bytes ahead, the default);
* ``ours_la0``: the same without prefetching (``lookahead=0``);
* ``ours_hf``: ``ByteLM(HFTokenLM)`` (KV reuse along token prefixes, eager forward);
* ``anchor``: ``ByteLLM`` on genlm-backend's ``AsyncTransformer`` as shipped (batching
  timeout 0.02 s; the README's 8.9 B/s reference);
* ``anchor_t0``: the same with timeout 0 (the faster of its two batching settings);
* ``anchor_on_our_lm``: ``ByteLLM`` on our ``PagedTokenLM`` (isolates the beam algorithm).

Text: the first ``--bytes`` bytes of ``benchmarks/data/heldout.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import sys
import time

import torch

from benchmarks.common import command_line, header, save_json
from benchmarks.lms import heldout_text, reset
from benchmarks.w1_score import score_anchor, score_ours


def load(dtype, device):
    from genlm.backend.llm import AsyncTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.backends.hf import HFTokenLM
    from genlm_bytes_potential.backends.paged import PagedTokenLM
    from genlm_bytes_potential.collector import tune_collector
    from genlm_bytes_potential.models import default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    convert_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    lms = {
        "ours": PagedTokenLM(model, tok),
        "ours_hf": HFTokenLM(model, tok),
        "anchor": AsyncTransformer(model, tok),
        "anchor_t0": AsyncTransformer(model, tok, timeout=0.0),
    }
    lms["anchor_on_our_lm"] = lms["ours_la0"] = lms["ours"]
    tune_collector()  # as load_lm does
    return lms, convert_s


ROWS = {
    "ours": score_ours,
    "ours_la0": functools.partial(score_ours, lookahead=0),
    "ours_hf": score_ours,
    "anchor": score_anchor,
    "anchor_t0": score_anchor,
    "anchor_on_our_lm": score_anchor,
}


def eos_of(lm):
    return [bytes(lm.byte_vocab[lm.tokenizer.eos_token_id])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument("--K", type=int, nargs="+", default=[1, 5, 8])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--no-write", action="store_true", help="do not save to benchmarks/results")
    args = p.parse_args(argv)
    lms, convert_s = load(getattr(torch, args.dtype), args.device)
    text = heldout_text(args.bytes)
    cuda = args.device.startswith("cuda")
    eos = eos_of(lms["ours"])
    rows = []

    # warm-up: CUDA kernels, numba JIT, and our CUDA graphs (captured once per batch and
    # key-length bucket: a pass over the same text). Every LM cache is emptied before each
    # timed run.
    for name in args.rows:
        for K in args.K:
            asyncio.run(ROWS[name](lms[name], text if lms[name] is lms["ours"] else text[:32], K, eos))
            reset(lms[name])
    for K in args.K:
        for rep in range(args.reps):
            for name in args.rows:
                fn, lm = ROWS[name], lms[name]
                reset(lm)
                if cuda:
                    torch.cuda.synchronize()
                r = asyncio.run(fn(lm, text, K, eos))
                r.update(
                    name=name,
                    K=K,
                    rep=rep,
                    n_bytes=len(text),
                    bytes_per_s=len(text) / r["seconds"],
                    bits_per_byte=-r["logprob"] / math.log(2) / len(text),
                )
                rows.append(r)
                print(f"K={K} {name:18s} {r['bytes_per_s']:8.1f} B/s  {r['bits_per_byte']:.4f} bits/B", flush=True)
    meta, _ = header(
        "W1",
        date=None,
        machine=None,
        model=f"SmolLM2-135M-Instruct ({args.dtype})",
        backend="paged (PagedTokenLM) vs genlm-backend AsyncTransformer",
        device=args.device,
    )
    meta.update(
        command=command_line("benchmarks.gpu_session", sys.argv[1:] if argv is None else argv),
        torch=torch.__version__,
        dtype=args.dtype,
        convert_seconds=convert_s,
        peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    )
    if not args.no_write:
        print("saved", save_json(meta, rows, key="rows"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))
    return rows


if __name__ == "__main__":
    main()
