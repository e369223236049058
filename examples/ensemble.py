"""An ensemble of two LMs with different tokenizers: the product of their byte potentials.

Token-level ensembles need a shared vocabulary; at the byte level any two models multiply.

    python examples/ensemble.py --model-a PATH_A --model-b PATH_B [--backend auto|vllm|paged|hf]

Each model defaults to the default SmolLM2 (then the product is that model's byte
distribution squared: sharper, and it shows two engines running side by side). Two vLLM
engines share one process: on a GPU the second one takes half the memory still free
(pass ``gpu_memory_utilization`` through ``load_lm`` to choose).
"""

import argparse
import asyncio

from genlm.control import SMC, BoolFSA, direct_token_sampler

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.models import load_lm
from genlm_bytes_potential.sampling import byte_posterior


async def main(args):
    a = ByteBeamPotential(load_lm(args.model_a, backend=args.backend), K=args.K, prompt=args.prompt)
    b = ByteBeamPotential(load_lm(args.model_b, backend=args.backend), K=args.K, prompt=args.prompt)
    print("tokenizer sizes:", len(a.lm.byte_vocab), len(b.lm.byte_vocab))
    # (a * b) is a product of experts; the regex keeps the example short and checkable
    sampler = direct_token_sampler(a * b * BoolFSA.from_regex(args.pattern))
    seqs = await SMC(sampler)(n_particles=args.particles, ess_threshold=0.5, max_tokens=args.max_bytes)
    for text, p in byte_posterior(seqs):
        print(f"{p:.3f}  {text.decode(errors='replace')!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-a"), p.add_argument("--model-b")
    p.add_argument("--backend", default="auto"), p.add_argument("--K", type=int, default=4)
    p.add_argument("--prompt", default="My favourite colour is "), p.add_argument("--pattern", default=r"[a-z]{3,8}\.")
    p.add_argument("--particles", type=int, default=6), p.add_argument("--max-bytes", type=int, default=10)
    asyncio.run(main(p.parse_args()))
