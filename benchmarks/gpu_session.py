"""W1 scoring on a CUDA GPU: ours vs genlm-control's ByteLLM, side by side in one process.

    python -m benchmarks.gpu_session --bytes 400 --K 1 5 8 --out results.json

The default SmolLM2-135M (bf16 on the GPU, as the anchor's reference run in
shared/device/README.md) is loaded once. Rows:

* ours: ``ByteLM(HFTokenLM)`` (our HF backend: KV reuse along token prefixes, one padded
  forward per beam step);
* anchor: ``ByteLLM`` on genlm-backend's ``AsyncTransformer`` (its usual stack, timeout 0 —
  the faster of its two batching settings);
* anchor on our LM: ``ByteLLM`` on the same ``HFTokenLM`` (isolates the beam algorithm).

Text: the first ``--bytes`` bytes of ``benchmarks/data/heldout.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import torch

from benchmarks.lms import heldout_text, reset
from benchmarks.w1_score import score_anchor, score_ours


def load(dtype, device):
    from genlm.backend.llm import AsyncTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.backends.hf import HFTokenLM
    from genlm_bytes_potential.models import default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    convert_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ours_lm = HFTokenLM(model, tok)
    anchor_lm = AsyncTransformer(model, tok, timeout=0.0)
    return ours_lm, anchor_lm, convert_s


def eos_of(lm):
    return [bytes(lm.byte_vocab[lm.tokenizer.eos_token_id])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument("--K", type=int, nargs="+", default=[1, 5, 8])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_w1.json")
    args = p.parse_args()
    ours_lm, anchor_lm, convert_s = load(getattr(torch, args.dtype), args.device)
    text = heldout_text(args.bytes)
    cuda = args.device.startswith("cuda")
    eos = eos_of(ours_lm)
    rows = []

    # warm-up: CUDA kernels, numba JIT
    asyncio.run(score_ours(ours_lm, text[:16], 2, eos))
    asyncio.run(score_anchor(anchor_lm, text[:16], 2, eos))
    for K in args.K:
        for rep in range(args.reps):
            for name, fn, lm in (("ours", score_ours, ours_lm), ("anchor", score_anchor, anchor_lm),
                                 ("anchor_on_our_lm", score_anchor, ours_lm)):
                reset(lm)
                if cuda:
                    torch.cuda.synchronize()
                r = asyncio.run(fn(lm, text, K, eos))
                r.update(name=name, K=K, rep=rep, n_bytes=len(text), bytes_per_s=len(text) / r["seconds"],
                         bits_per_byte=-r["logprob"] / math.log(2) / len(text))
                rows.append(r)
                print(f"K={K} {name:18s} {r['bytes_per_s']:8.1f} B/s  {r['bits_per_byte']:.4f} bits/B", flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "dtype": args.dtype, "convert_seconds": convert_s,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
