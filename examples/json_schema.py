"""JSON-schema-constrained generation at the byte level, from an instruction prompt.

python examples/json_schema.py --particles 8
"""

import argparse
import asyncio
import json

from genlm.control import SMC, JsonSchema, direct_token_sampler

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.models import load_lm
from genlm_bytes_potential.sampling import byte_posterior

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def main(args):
    lm = load_lm(args.model, backend=args.backend)
    schema = json.loads(args.schema) if args.schema else SCHEMA
    instruction = f"Answer with JSON matching this schema: {json.dumps(schema)}"
    if getattr(getattr(lm, "tokenizer", None), "chat_template", None):  # a chat model: a chat prompt
        potential = ByteBeamPotential(lm, K=args.K, prompt_tokens=[{"role": "user", "content": instruction}])
    else:
        potential = ByteBeamPotential(lm, K=args.K, prompt=instruction + "\n")
    sampler = direct_token_sampler(potential * JsonSchema(schema))
    seqs = await SMC(sampler)(n_particles=args.particles, ess_threshold=0.5, max_tokens=args.max_bytes)
    for text, p in byte_posterior(seqs):
        print(f"{p:.3f}  {text.decode(errors='replace')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model"), p.add_argument("--backend", default="auto"), p.add_argument("--K", type=int, default=4)
    p.add_argument("--schema", help="a JSON schema (default: a person with a name and an age)")
    p.add_argument("--particles", type=int, default=8), p.add_argument("--max-bytes", type=int, default=48)
    asyncio.run(main(p.parse_args()))
