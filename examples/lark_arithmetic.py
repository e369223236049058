"""A Lark grammar (small arithmetic expressions) guiding byte-level SMC.

python examples/lark_arithmetic.py --particles 8
"""

import argparse
import asyncio
import math
import re

from genlm.control import SMC, BoolCFG, direct_token_sampler

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.models import load_lm
from genlm_bytes_potential.sampling import byte_posterior

GRAMMAR = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER ("*" NUMBER)*
NUMBER: /[0-9]{1,3}/
"""


def value(expr: str) -> int:
    """The value of an expression of the grammar: a sum of signed products of integers,
    which may have leading zeros (``07``: Python's ``eval`` refuses those)."""
    terms = re.findall(r"([+-]?)([0-9*]+)", expr)
    return sum((-1 if sign == "-" else 1) * math.prod(int(n) for n in term.split("*")) for sign, term in terms)


async def main(args):
    lm = load_lm(args.model, backend=args.backend)
    potential = ByteBeamPotential(lm, K=args.K, prompt="Here is an arithmetic expression: ")
    sampler = direct_token_sampler(potential * BoolCFG.from_lark(GRAMMAR))
    seqs = await SMC(sampler)(n_particles=args.particles, ess_threshold=0.5, max_tokens=args.max_bytes)
    for text, p in byte_posterior(seqs):
        print(f"{p:.3f}  {text.decode()}  = {value(text.decode())}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model"), p.add_argument("--backend", default="auto"), p.add_argument("--K", type=int, default=4)
    p.add_argument("--particles", type=int, default=8), p.add_argument("--max-bytes", type=int, default=16)
    asyncio.run(main(p.parse_args()))
