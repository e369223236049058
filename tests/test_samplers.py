"""genlm-control's samplers drive the potential unchanged (tiny GPT-2, real tokenizer)."""

import json
import re

import lark
import numpy as np
import pytest
import torch
from genlm.control import AWRS, SMC, BoolCFG, BoolFSA, JsonSchema, direct_token_sampler, eager_token_sampler
from genlm.control.constant import EndOfSequence
from tiny_models import tiny_gpt2_lm

from genlm_bytes_potential import ByteBeamPotential, as_byte_tokens

ARITH = r"""
start: expr
expr: NUMBER | expr "+" expr | "(" expr ")"
NUMBER: /[0-9]/
"""


@pytest.fixture(autouse=True)
def seeded():
    """genlm-control's samplers draw from torch's global RNG and resample with numpy's:
    seeded, each run samples the same particles (unseeded, a run where no particle
    finishes within ``max_tokens`` fails now and then)."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def potential():
    return ByteBeamPotential(tiny_gpt2_lm(), K=4, prompt="Answer: ")


def posterior_texts(sequences):
    out = []
    for ctx, w in zip(sequences.contexts, sequences.log_weights):
        if np.isfinite(w) and ctx and isinstance(ctx[-1], EndOfSequence):
            out.append(b"".join(ctx[:-1]))
    return out


async def test_regex_smc_every_sample_matches(potential):
    fsa = BoolFSA.from_regex(r"[0-9]{2}(,[0-9]{2})?")
    smc = SMC(direct_token_sampler(potential * fsa))
    seqs = await smc(n_particles=6, ess_threshold=0.5, max_tokens=6)
    texts = posterior_texts(seqs)
    assert texts
    assert all(re.fullmatch(rb"[0-9]{2}(,[0-9]{2})?", t) for t in texts), texts


async def test_awrs_smc_with_regex_critic(potential):
    # (AWRS treats mass below 1e-5 of the row as zero, so the grammar must leave the
    # random tiny model some mass at every step; the length boundary appends EOS)
    fsa = BoolFSA.from_regex(r"[a-z]{3}")
    seqs = await SMC(AWRS(potential, as_byte_tokens(fsa), seed=0))(n_particles=4, ess_threshold=0.5, max_tokens=4)
    texts = posterior_texts(seqs)
    assert texts and all(re.fullmatch(rb"[a-z]{3}", t) for t in texts), texts


async def test_json_schema_samples_validate(potential):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    # The random tiny model would wander in JSON's optional whitespace and long numbers
    # forever: a regex keeps the run short (genlm-control's JSON potential is slow).
    short = BoolFSA.from_regex(r'\{"n":-?[0-9]{1,2}\}')
    smc = SMC(direct_token_sampler(potential * JsonSchema(schema) * short))
    seqs = await smc(n_particles=3, ess_threshold=0.5, max_tokens=11)
    texts = posterior_texts(seqs)
    assert texts
    for t in texts:
        jsonschema.validate(json.loads(t), schema)


async def test_lark_cfg_samples_parse(potential):
    parser = lark.Lark(ARITH)
    smc = SMC(direct_token_sampler(potential * BoolCFG.from_lark(ARITH)))
    seqs = await smc(n_particles=4, ess_threshold=0.5, max_tokens=6)
    texts = posterior_texts(seqs)
    assert texts
    for t in texts:
        parser.parse(t.decode())


async def test_eager_sampler_over_byte_tokens(potential):
    fsa = BoolFSA.from_regex(r"[ab]{3}")
    seqs = await SMC(eager_token_sampler(potential, fsa))(n_particles=3, ess_threshold=0.5, max_tokens=4)
    texts = [
        b"".join(c[:-1])
        for c, w in zip(seqs.contexts, seqs.log_weights)
        if np.isfinite(w) and isinstance(c[-1], EndOfSequence)
    ]
    assert texts and all(re.fullmatch(rb"[ab]{3}", t) for t in texts), texts
