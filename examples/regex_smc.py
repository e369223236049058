"""Regex-constrained byte-level SMC: every posterior sample matches the pattern.

python examples/regex_smc.py --pattern '[A-Z][a-z]+ [0-9]{4}' --particles 8
"""

import argparse
import asyncio

from genlm.control import SMC, BoolFSA, direct_token_sampler

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.models import load_lm
from genlm_bytes_potential.sampling import byte_posterior


async def main(args):
    lm = load_lm(args.model, backend=args.backend)
    potential = ByteBeamPotential(lm, K=args.K, prompt=args.prompt)
    sampler = direct_token_sampler(potential * BoolFSA.from_regex(args.pattern))
    seqs = await SMC(sampler)(n_particles=args.particles, ess_threshold=0.5, max_tokens=args.max_bytes)
    for text, p in byte_posterior(seqs):
        print(f"{p:.3f}  {text.decode(errors='replace')!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model"), p.add_argument("--backend", default="auto"), p.add_argument("--K", type=int, default=4)
    p.add_argument("--prompt", default="The city and the year it was founded: ")
    p.add_argument("--pattern", default=r"[A-Z][a-z]+, [0-9]{3,4}")
    p.add_argument("--particles", type=int, default=8), p.add_argument("--max-bytes", type=int, default=24)
    asyncio.run(main(p.parse_args()))
