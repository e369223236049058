import asyncio
import math

import numpy as np
import pytest
from genlm.control import EOS as CONTROL_EOS
from genlm.control import BoolCFG, BoolFSA, JsonSchema
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import EOS_BYTES, texts, vocabularies

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.potential import BeamCache
from genlm_bytes_potential.tokens import byte_ints, byte_value


def mock(vocab, seed=0, temperature=1.0):
    eos = vocab.index(EOS_BYTES) if EOS_BYTES in vocab else None
    return MockTokenLM(vocab, seed=seed, temperature=temperature, eos_token_id=eos)


@settings(max_examples=25, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    contexts=st.lists(texts(4), min_size=1, max_size=4),
    K=st.sampled_from([None, 1, 2]),
    threshold=st.sampled_from([0.0, 0.1]),
    prompt=st.sampled_from([b"", b"ab", b"c<e>a"]),
)
async def test_contract_holds_exactly(vocab, seed, contexts, K, threshold, prompt):
    pot = ByteBeamPotential(mock(vocab, seed), K=K, prune_threshold=threshold, prompt=prompt)
    ctxs = [list(c) for c in contexts]
    finite = [c for c in ctxs if np.isfinite(await pot.prefix(c))]
    for c in finite:
        w = (await pot.logw_next(c)).weights
        assert abs(np.exp(w).sum() - 1) <= 1e-9
        await pot.assert_logw_next_consistency(c, rtol=1e-6, atol=1e-9)
    for c in ctxs:  # zero-probability contexts included
        await pot.assert_autoreg_fact(c, rtol=1e-6, atol=1e-9)
    await pot.assert_batch_consistency(ctxs, rtol=1e-6, atol=1e-9)


async def test_zero_probability_context_is_minus_inf_not_an_error():
    pot = ByteBeamPotential(mock([b"a", b"b", EOS_BYTES]), K=2)
    ctx = list(b"az")
    assert await pot.prefix(ctx) == -math.inf
    assert await pot.complete(ctx) == -math.inf
    assert np.all((await pot.logw_next(ctx)).weights == -np.inf)
    assert np.all((await pot.logw_next(ctx + [97])).weights == -np.inf)
    await pot.assert_autoreg_fact(ctx, rtol=1e-6)
    await pot.assert_batch_consistency([ctx, list(b"ab"), []], rtol=1e-6)


async def test_one_lm_call_per_byte_step_across_contexts():
    lm = mock([b"a", b"b", b"ab", b"ba", b"aa", b"b", EOS_BYTES], seed=5)
    pot = ByteBeamPotential(lm, K=4, lookahead=0)  # requests = the contexts the beams need
    await pot.prefix([])  # the root beam
    lm.reset_counters()
    contexts = [list(b"abab"), list(b"babb"), list(b"aaba"), list(b"bbab"), list(b"ab")]
    await pot.batch_logw_next(contexts)
    assert lm.batch_calls == 4  # the longest context has 4 bytes
    assert len(lm.requests) > 4  # many contexts per call
    assert len(lm.requests) == len(set(lm.requests))  # shared prefixes are not recomputed
    lm.reset_counters()
    await pot.batch_logw_next([c + [97] for c in contexts])  # one more byte each, from cache
    assert lm.batch_calls == 1


async def test_concurrent_eos_weights_share_one_batch():
    """A sampler ending its particles at max_tokens asks each one's logw_eos at once."""
    lm = mock([b"a", b"b", b"ab", b"ba", b"aa", b"b", EOS_BYTES], seed=5)
    pot = ByteBeamPotential(lm, K=4, lookahead=0)
    contexts = [list(b"abab"), list(b"babb"), list(b"aaba"), list(b"bbab")]
    await pot.batch_logw_next([c[:-1] for c in contexts])  # their beams up to the last byte
    lm.reset_counters()
    eos = await asyncio.gather(*(pot.logw_eos(c) for c in contexts))
    assert lm.batch_calls == 1  # one step for all four, not four
    fresh = ByteBeamPotential(mock([b"a", b"b", b"ab", b"ba", b"aa", b"b", EOS_BYTES], seed=5), K=4, lookahead=0)
    for c, e in zip(contexts, eos):
        assert e == (await fresh.logw_next(c))[CONTROL_EOS]


async def test_lookahead_gives_the_same_potential():
    vocab = [b"a", b"b", b"ab", b"ba", b"aa", b"bab", EOS_BYTES]
    contexts = [list(b"abababba"), list(b"babbaab"), list(b"a")]
    got = []
    for lookahead in (0, 4):
        pot = ByteBeamPotential(mock(vocab, seed=7), K=3, prompt=b"ba", lookahead=lookahead)
        got.append((await pot.batch_prefix(contexts), (await pot.batch_logw_next(contexts)).weights))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


async def test_cache_shares_prefixes_and_evicts():
    lm = mock([b"a", b"b", b"ab", EOS_BYTES], seed=2)
    small = ByteBeamPotential(lm, K=3, cache_size=3)
    big = ByteBeamPotential(lm, K=3)
    ctxs = [list(b"abba"), list(b"abab"), list(b"bbb"), list(b"ab"), list(b"abba")]
    for c in ctxs:
        assert await small.prefix(c) == await big.prefix(c)
        assert len(small.cache) <= 3
    np.testing.assert_array_equal(await small.batch_prefix(ctxs), await big.batch_prefix(ctxs))


def test_beam_cache_lookup_finds_deepest_prefix():
    cache = BeamCache(max_beams=10)
    cache.put(b"ab", "AB")
    cache.put(b"abcd", "ABCD")
    assert cache.lookup(b"abcd") == (4, "ABCD")
    assert cache.lookup(b"abcde") == (4, "ABCD")
    assert cache.lookup(b"abcxyz") == (2, "AB")
    assert cache.lookup(b"zz") == (0, None)


async def test_spawn_and_cleanup():
    pot = ByteBeamPotential(mock([b"a", b"b", EOS_BYTES]), K=2, prompt="ab")
    want = await pot.batch_prefix([list(b"ab"), list(b"b")])
    other = pot.spawn()
    assert len(other.cache) == 0 and other.prompt == b"ab"
    assert other.model._vocab is pot.model._vocab and other.model.trie is pot.model.trie  # read once
    np.testing.assert_array_equal(await other.batch_prefix([list(b"ab"), list(b"b")]), want)
    await pot.cleanup()
    assert len(pot.cache) == 0
    np.testing.assert_array_equal(await pot.batch_prefix([list(b"ab"), list(b"b")]), want)


@pytest.mark.parametrize(
    "context, err, match",
    [
        ([97, 256], ValueError, "256"),
        ([97, "a"], TypeError, "'a'"),
        ([97, CONTROL_EOS, 97], ValueError, "EOS at position 1"),
        ([True], TypeError, "True"),
        ([98, 97, False], TypeError, "False"),
        ([b"ab", b""], ValueError, "b'ab'"),  # two bytes in two tokens, not one each
        ((b"a", b""), ValueError, "b''"),
    ],
)
async def test_bad_contexts_name_the_item(context, err, match):
    pot = ByteBeamPotential(mock([b"a", b"b", EOS_BYTES]), K=2)
    with pytest.raises(err, match=match):
        await pot.prefix(context)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from(["int", "bytes", "bytearray"]))), st.booleans())
def test_contexts_of_any_byte_tokens_read_as_their_bytes(items, as_tuple):
    """Ints, one-byte ``bytes`` and ``bytearray`` tokens, mixed, in a list or a tuple."""
    make = {"int": int, "bytes": lambda v: bytes([v]), "bytearray": lambda v: bytearray([v])}
    context = [make[kind](v) for v, kind in items]
    key = ByteBeamPotential._key(tuple(context) if as_tuple else context)
    assert key == bytes(v for v, _ in items)


_ODD_ITEMS = [True, False, 256, -1, b"", b"ab", "a", 2.0, CONTROL_EOS]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.integers(0, 255).map(lambda v: ("byte", v)), st.sampled_from(range(len(_ODD_ITEMS))))),
    st.sampled_from(["int", "bytes", "mixed"]),
)
def test_grammar_views_read_byte_tokens_as_ints_and_leave_other_items(items, kind):
    """``byte_ints`` (what a grammar over ints reads through its view) agrees with the
    item-by-item rule: byte tokens as ints, anything else (bools, EOS, other values) kept."""
    make = {"int": int, "bytes": lambda v: bytes([v]), "mixed": lambda v: bytes([v]) if v % 2 else v}[kind]
    context = [make(x[1]) if isinstance(x, tuple) else _ODD_ITEMS[x] for x in items]
    want = [x if x is CONTROL_EOS or byte_value(x) is None else byte_value(x) for x in context]
    got = byte_ints(context)
    assert got == want and [type(x) for x in got] == [type(x) for x in want]


def test_bad_parameters_name_the_value():
    lm = mock([b"a", b"b", EOS_BYTES])
    with pytest.raises(ValueError, match="K=0"):
        ByteBeamPotential(lm, K=0)
    with pytest.raises(ValueError, match="-1"):
        ByteBeamPotential(lm, prune_threshold=-1)
    with pytest.raises(ValueError, match="cache_size=0"):
        ByteBeamPotential(lm, cache_size=0)
    with pytest.raises(TypeError, match="prompt"):
        ByteBeamPotential(lm, prompt=3)


async def test_plain_products_with_byte_grammars():
    pot = ByteBeamPotential(mock([b"a", b"b", b"{", b"}", b'"', b":", b"1", b"ab", EOS_BYTES]), K=4)
    for grammar, ctx in (
        (BoolFSA.from_regex(r"(ab)+"), b"ab"),
        (BoolCFG.from_lark('start: "a" start "b" | "ab"'), b"aabb"),
        (JsonSchema({"type": "object"}), b'{"a":1}'),
    ):
        product = pot * grammar
        assert product.token_type == pot.token_type
        w = (await product.logw_next(list(ctx[:1]))).weights
        assert np.isfinite(w).any()
        assert np.isfinite(await product.complete(list(ctx)))
        await product.assert_autoreg_fact(list(ctx), rtol=1e-6)


async def test_int_view_agrees():
    pot = ByteBeamPotential(mock([b"a", b"b", b"ab", EOS_BYTES], seed=3), K=3)
    view = pot.int_view()
    assert pot.vocab[97] == b"a" and view.vocab[97] == 97
    assert await view.prefix([97, 98]) == await pot.prefix([b"a", b"b"])
    np.testing.assert_array_equal((await view.logw_next([97])).weights, (await pot.logw_next([b"a"])).weights)
    await view.assert_contract([[97], [97, 98]], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    K=st.sampled_from([None, 1, 3]),
    prompt=st.sampled_from([b"", b"ab"]),
    walk=st.lists(st.lists(st.integers(0, 2**16), min_size=1, max_size=4), min_size=1, max_size=6),
)
async def test_sampling_on_full_rows_reads_no_mass_from_the_table(vocab, seed, K, prompt, walk):
    """On a store of full rows (as on a GPU; here a torch table on the CPU), reading the
    prompt and then particles that grow by one byte a step, as a sampler's do, read no
    mass from the table: each new row brings its root front (and the first row the
    prompt's path) to the host, and the fronts of the candidates kept are copied while
    the LM runs. Their weights are those of host weight rows (to 1e-9)."""
    from spies import record_read_copies

    from genlm_bytes_potential.lm_state import MassStore

    pot = ByteBeamPotential(mock(vocab, seed), K=K, prompt=prompt, heal=False)
    pot.model.store = MassStore(pot.model.trie, 2**30, full_rows=True)
    read_copies = record_read_copies(pot.model.store)
    host = ByteBeamPotential(mock(vocab, seed), K=K, prompt=prompt, heal=False)
    contexts = [[] for _ in walk[0]]
    for choices in walk:
        w = (await pot.batch_logw_next(contexts)).weights
        np.testing.assert_allclose(w, (await host.batch_logw_next(contexts)).weights, rtol=1e-9, atol=1e-9)
        for i, c in enumerate(contexts):
            possible = np.flatnonzero(np.isfinite(w[i, :256]))
            if len(possible):
                c.append(bytes([possible[choices[i % len(choices)] % len(possible)]]))
    assert read_copies == []
    assert pot.model.store.copies <= 2 * pot.model.stats.batch_calls + len(walk) + len(prompt)


async def test_cache_bytes_bound_reuses_mass_rows_and_keeps_results():
    """``cache_bytes`` bounds the model's mass store: with room for 3 rows, rows are
    reused and recomputed, and every value equals an unbounded potential's."""
    lm = mock([b"a", b"b", b"ab", b"ba", EOS_BYTES], seed=4)
    pot = ByteBeamPotential(lm, K=3)
    row = pot.model.store.row_bytes
    small = ByteBeamPotential(lm, K=3, cache_bytes=3 * row)
    ctxs = [list(b"abab"), list(b"baba"), list(b"aabb"), list(b"bbaa")]
    for c in ctxs:
        assert await small.prefix(c) == await pot.prefix(c)
        assert (await small.logw_next(c)).weights.tolist() == (await pot.logw_next(c)).weights.tolist()
    assert small.model.store.max_rows == 3 and len(small.model.store) <= 3 + 2 * 3
    assert small.model.stats.contexts > pot.model.stats.contexts  # rows were recomputed
    with pytest.raises(ValueError, match="cache_bytes=0"):
        ByteBeamPotential(lm, cache_bytes=0)
