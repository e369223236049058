"""HFTokenLM: exact log-probs, one padded forward per batch, prefix KV reuse, LRU cap."""

import asyncio

import pytest
import torch
from conftest import TINY_EXTRA_ROWS, build_tiny_llama
from genlm.backend.llm.base import AsyncLM
from tiny_models import BACKEND_CONTEXTS, hf_reference, loop_ticks_during, normalization_tolerance

from genlm_bytes_potential.backends.hf import HFTokenLM

CTXS = BACKEND_CONTEXTS


@pytest.fixture
def lm(tiny_llama):
    model, tok = tiny_llama
    return HFTokenLM(model, tok)


async def test_matches_uncached_forward(lm, tiny_llama):
    model, tok = tiny_llama
    assert isinstance(lm, AsyncLM)
    V = len(tok)
    assert lm.vocab_size == V == len(lm.byte_vocab)
    assert model.config.vocab_size == V + TINY_EXTRA_ROWS  # the padded rows exist
    out = await lm.batch_next_token_logprobs(CTXS)
    assert out.shape == (len(CTXS), V) and out.dtype == torch.float32
    for row, ctx in zip(out, CTXS):
        assert torch.allclose(row, hf_reference(model, ctx, V), atol=1e-4, rtol=0)
        assert abs(torch.logsumexp(row.double(), 0).item()) <= normalization_tolerance(row.dtype)
    # every row is one forward pass, each context computed once
    assert lm.forward_calls == 1 and lm.batch_calls == 1
    assert lm.forward_tokens == sum(map(len, CTXS))


async def test_batch_equals_single(tiny_llama):
    model, tok = tiny_llama
    batched = await HFTokenLM(model, tok).batch_next_token_logprobs(CTXS)
    single_lm = HFTokenLM(model, tok)
    for row, ctx in zip(batched, CTXS):
        one = await single_lm.next_token_logprobs(ctx)
        assert torch.allclose(row, one, atol=1e-4, rtol=0)
        assert torch.allclose(single_lm.next_token_logprobs_sync(ctx), one, atol=1e-4, rtol=0)


async def test_one_token_extension_costs_one_token(lm, tiny_llama):
    model, tok = tiny_llama
    V = len(tok)
    ctx = list(range(100, 160))
    await lm.next_token_logprobs(ctx)
    assert lm.forward_tokens == 60
    # extend one context by one token: one token of compute
    out = await lm.next_token_logprobs(ctx + [5])
    assert lm.forward_tokens == 61
    assert torch.allclose(out, hf_reference(model, ctx + [5], V), atol=1e-4, rtol=0)
    # a batch of one-token extensions with different cached prefix lengths
    batch = [ctx + [5, 6], ctx + [7], ctx + [5, 8]]
    outs = await lm.batch_next_token_logprobs(batch)
    assert lm.forward_tokens == 61 + 3 and lm.forward_calls == 3
    for row, c in zip(outs, batch):
        assert torch.allclose(row, hf_reference(model, c, V), atol=1e-4, rtol=0)
    # an exact repeat is a cache hit: no compute at all
    again = await lm.next_token_logprobs(ctx + [7])
    assert lm.forward_tokens == 64 and lm.cache_hits == 1
    assert torch.equal(again, outs[1])


async def test_concurrent_calls_share_one_forward(lm, tiny_llama):
    results = await asyncio.gather(
        lm.batch_next_token_logprobs(CTXS[:2]),
        *[lm.next_token_logprobs(c) for c in CTXS[2:]],
    )
    assert lm.batch_calls == 1 and lm.forward_calls == 1
    assert results[0].shape == (2, lm.vocab_size)
    fresh = await HFTokenLM(*tiny_llama).batch_next_token_logprobs(CTXS)
    got = torch.cat([results[0], torch.stack(results[1:])])
    assert torch.allclose(got, fresh, atol=1e-4, rtol=0)


async def test_event_loop_not_blocked(lm):
    assert await loop_ticks_during(lm.batch_next_token_logprobs([[i] * 200 for i in range(1, 17)])) > 1


async def test_lru_byte_cap(tiny_llama):
    model, tok = tiny_llama
    V = len(tok)
    probe = HFTokenLM(model, tok)
    await probe.next_token_logprobs(list(range(1, 41)))
    entry = probe.cache.nbytes  # KV of 40 tokens + one log-prob row
    lm = HFTokenLM(model, tok, cache_bytes=int(3.5 * entry))
    ctxs = [[k] + list(range(1, 40)) for k in range(500, 508)]
    for c in ctxs:
        await lm.next_token_logprobs(c)
        assert lm.cache.nbytes <= lm.cache_bytes
    assert lm.cache.evictions >= 5
    # the most recent context is still cached: extending it costs one token ...
    before = lm.forward_tokens
    out = await lm.next_token_logprobs(ctxs[-1] + [3])
    assert lm.forward_tokens == before + 1
    assert torch.allclose(out, hf_reference(model, ctxs[-1] + [3], V), atol=1e-4, rtol=0)
    # ... the oldest was evicted and is recomputed in full, still exactly
    before = lm.forward_tokens
    out = await lm.next_token_logprobs(ctxs[0] + [3])
    assert lm.forward_tokens == before + 41
    assert torch.allclose(out, hf_reference(model, ctxs[0] + [3], V), atol=1e-4, rtol=0)
    assert lm.cache.nbytes <= lm.cache_bytes
    lm.clear_cache()
    assert lm.cache.nbytes == 0


async def test_fewer_model_rows_than_tokens(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    V = len(tok)
    short = V - 52
    path = build_tiny_llama(tmp_path / "short", tok, short, seed=1)
    lm = HFTokenLM.from_name(str(path))
    out = await lm.next_token_logprobs([1, 2, 3])
    assert out.shape == (V,)
    assert torch.isneginf(out[short:]).all()
    assert abs(torch.logsumexp(out.double(), 0).item()) <= normalization_tolerance(out.dtype)
    ref = torch.log_softmax(lm.model(torch.tensor([[1, 2, 3]])).logits[0, -1].float(), -1)
    assert torch.allclose(out[:short], ref, atol=1e-4, rtol=0)


async def test_chunked_forwards(tiny_llama):
    model, tok = tiny_llama
    lm = HFTokenLM(model, tok, max_batch_size=2, max_batch_tokens=100)
    out = await lm.batch_next_token_logprobs(CTXS)
    assert lm.forward_calls >= 3 and lm.batch_calls == 1
    ref = await HFTokenLM(model, tok).batch_next_token_logprobs(CTXS)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)


async def test_errors(lm):
    with pytest.raises(ValueError, match="empty context"):
        await lm.next_token_logprobs([])
    with pytest.raises(ValueError, match="out of range"):
        await lm.batch_next_token_logprobs([[1], [lm.vocab_size]])
    with pytest.raises(ValueError, match="LoRA"):
        await lm.next_token_logprobs([1], lora_name="x")
    assert (await lm.batch_next_token_logprobs([])).shape == (0, lm.vocab_size)
    # a failed call does not poison the next one
    assert (await lm.next_token_logprobs([1])).shape == (lm.vocab_size,)
