"""Bits per byte of a text file under the byte beam, for several beam widths.

python examples/score_file.py README.md --K 1 4 8
"""

import argparse
import asyncio
from pathlib import Path

from genlm_bytes_potential.byte_lm import ByteLM
from genlm_bytes_potential.models import load_lm


async def main(args):
    data = Path(args.file).read_bytes()[: args.max_bytes]
    lm = load_lm(args.model, backend=args.backend)
    for K in args.K:
        score = await ByteLM(lm, K=K).score(data)
        print(f"K={K:<3} {score.n_bytes} bytes  {score.bits_per_byte:.4f} bits/byte  (heals: {score.heals})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file"), p.add_argument("--model"), p.add_argument("--backend", default="auto")
    p.add_argument("--K", type=int, nargs="+", default=[1, 4, 8]), p.add_argument("--max-bytes", type=int, default=2000)
    asyncio.run(main(p.parse_args()))
