import asyncio

import numpy as np
import pytest
import torch
from genlm.backend.llm.base import AsyncLM
from genlm.backend.tokenization import Token

from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.lm_state import TokenContext

VOCAB = [b"a", b"b", b"ab", b" ", b"\xc3", b"\xa9", b"a"]


def test_api_and_determinism():
    lm = MockTokenLM(VOCAB, seed=3, eos_token_id=3, bos_token_id=0)
    assert isinstance(lm, AsyncLM)
    assert lm.vocab_size == len(VOCAB) == len(lm.byte_vocab)
    assert all(isinstance(t, Token) and t.token_id == i for i, t in enumerate(lm.byte_vocab))
    assert [bytes(t) for t in lm.byte_vocab] == VOCAB
    assert lm.tokenizer is None and lm.eos_token_id == 3 and lm.bos_token_id == 0
    p = lm.logprobs_of([0, 1])
    assert p.dtype == np.float64 and p.shape == (len(VOCAB),)
    assert abs(np.logaddexp.reduce(p)) < 1e-12
    assert np.array_equal(p, MockTokenLM(VOCAB, seed=3).logprobs_of((0, 1)))
    assert not np.array_equal(p, lm.logprobs_of([1, 0]))
    assert not np.array_equal(p, MockTokenLM(VOCAB, seed=4).logprobs_of([0, 1]))
    assert not np.array_equal(lm.logprobs_of([]), lm.logprobs_of([0]))
    assert lm.batch_calls == 0 and lm.requests == []


def test_temperature():
    flat = MockTokenLM(VOCAB, temperature=100.0).logprobs_of([1])
    peak = MockTokenLM(VOCAB, temperature=0.05).logprobs_of([1])
    assert np.ptp(flat) < 0.1
    assert peak.max() > -1e-3


async def test_batch_counts_and_values():
    lm = MockTokenLM(VOCAB, seed=1)
    ctxs = [[], [0], [0, 2], [0]]
    out = await lm.batch_next_token_logprobs(ctxs)
    assert out.dtype == torch.float64 and out.shape == (4, len(VOCAB))
    for row, c in zip(out, ctxs):
        assert np.array_equal(row.numpy(), lm.logprobs_of(c))
    assert lm.batch_calls == 1
    assert lm.requests == [(), (0,), (0, 2), (0,)]
    one = await lm.next_token_logprobs([0, 2])
    assert torch.equal(one, out[2]) and lm.batch_calls == 2
    assert torch.equal(lm.next_token_logprobs_sync([0]), out[1])
    assert torch.equal(lm.batch_next_token_logprobs_sync([[0], []]), out[[1, 0]])
    assert lm.batch_calls == 4
    lm.reset_counters()
    assert lm.batch_calls == 0 and lm.requests == []


async def test_concurrent_and_errors():
    lm = MockTokenLM(VOCAB)
    outs = await asyncio.gather(*[lm.next_token_logprobs([i]) for i in range(3)])
    assert len(outs) == 3
    with pytest.raises(ValueError, match="out of range"):
        await lm.next_token_logprobs([len(VOCAB)])
    ctx = TokenContext((0, 1))
    await lm.next_token_logprobs(ctx)  # memoized: its extensions have their last token checked
    assert torch.equal(await lm.next_token_logprobs(ctx.extended(2)), torch.from_numpy(lm.logprobs_of([0, 1, 2])))
    with pytest.raises(ValueError, match=f"token id {len(VOCAB)} out of range"):
        await lm.next_token_logprobs(ctx.extended(len(VOCAB)))
    with pytest.raises(ValueError, match="token id -1 out of range"):
        await lm.next_token_logprobs(TokenContext((0, -1, 1)).extended(2))  # its prefix never checked
    with pytest.raises(ValueError):
        MockTokenLM([])
    with pytest.raises(ValueError, match="temperature"):
        MockTokenLM(VOCAB, temperature=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        MockTokenLM(VOCAB, eos_token_id=99)
    with pytest.raises(TypeError):
        MockTokenLM(["a"])
