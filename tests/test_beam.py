import math

import numpy as np
import pytest
import torch
from brute import complete_prob, log, prefix_prob
from hypothesis import given, settings
from hypothesis import strategies as st
from spies import count_new_context_calls, record_read_copies
from strategies import EOS_BYTES, texts, vocabularies

from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.beam import BeamParams, advance, initial_beam, next_byte_logprobs, prefill
from genlm_bytes_potential.byte_lm import ByteDist, ByteLM
from genlm_bytes_potential.lm_state import LMState, TokenModel


def make_model(vocab, seed, temperature=1.0, **kw):
    lm = MockTokenLM(
        vocab, seed=seed, temperature=temperature, eos_token_id=vocab.index(EOS_BYTES) if EOS_BYTES in vocab else None
    )
    return lm, TokenModel(lm, **kw)


async def read(beam, data):
    for b in data:
        (beam,) = await advance([beam], [b])
    return beam


@settings(max_examples=40, deadline=None)
@given(vocab=vocabularies(), seed=st.integers(0, 1000), data=texts(5), temperature=st.sampled_from([0.5, 1.0, 3.0]))
async def test_unbounded_beam_is_the_exact_marginal(vocab, seed, data, temperature):
    lm, model = make_model(vocab, seed, temperature)
    beam = await initial_beam(model, BeamParams(K=None))
    ctx = beam.states[0].tokens
    eos = {EOS_BYTES}
    for i in range(len(data) + 1):
        logq = beam.next_logprobs()
        assert abs(np.exp(logq).sum() - 1) <= 1e-9
        want = log(prefix_prob(lm, ctx, data[:i], eos))
        assert beam.logp == pytest.approx(want, rel=1e-6, abs=1e-9)
        want_eos = log(complete_prob(lm, ctx, data[:i], eos)) - want
        assert logq[256] == pytest.approx(want_eos, rel=1e-6, abs=1e-9)
        if i < len(data):
            (beam,) = await advance([beam], [data[i]])


@settings(max_examples=30, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    data=texts(6),
    K=st.integers(1, 3),
    threshold=st.sampled_from([0.0, 0.05, 0.3]),
)
async def test_pruned_beam_normalizes_and_factorizes(vocab, seed, data, K, threshold):
    lm, model = make_model(vocab, seed)
    beam = await initial_beam(model, BeamParams(K=K, prune_threshold=threshold, heal=False))
    total = 0.0
    for b in data:
        logq = beam.next_logprobs()
        if beam.is_empty:
            assert np.all(logq == -np.inf)
        else:
            assert abs(np.exp(logq).sum() - 1) <= 1e-9
        total += logq[b]
        (beam,) = await advance([beam], [b])
        assert beam.logp == pytest.approx(total, abs=1e-12) or beam.logp == total == -math.inf
        if K is not None:  # K, plus at most the candidate kept for full support
            assert len([n for n in beam.nodes if n != model.trie.root]) <= K + 1


async def test_one_batch_call_per_step_for_many_candidates():
    vocab = [b"a", b"b", b"ab", b"ba", b"aa", b"a", b"bab", EOS_BYTES]
    lm, model = make_model(vocab, 3)
    beams = [await initial_beam(model, BeamParams(K=None)) for _ in range(3)]
    beams = [await read(b, d) for b, d in zip(beams, [b"ab", b"ba", b"aa"])]
    lm.reset_counters()
    steps = await advance(beams, [ord("a"), ord("b"), ord("a")])
    # several candidates in several beams needed the LM; one batch call served them all
    assert len(lm.requests) >= 4
    assert lm.batch_calls == 1
    assert all(s.stats.lm_calls >= 1 for s in steps)


async def test_a_beam_asked_twice_in_a_batch_is_computed_once():
    vocab = [b"a", b"b", b"ab", b"ba", EOS_BYTES]
    _, model = make_model(vocab, 1)
    beams = [await read(await initial_beam(model, BeamParams(K=None)), d) for d in (b"ab", b"b")]
    got = await next_byte_logprobs([beams[0], beams[1], beams[0]])
    assert len(beams[0]._dist) == len(beams[1]._dist) == 1
    np.testing.assert_array_equal(got[0], got[2])
    np.testing.assert_array_equal(got[:2], await next_byte_logprobs(beams))


async def test_prefill_reads_eos_tokens_as_text_generation_does_not():
    vocab = [b"a", b"b", EOS_BYTES]
    lm, model = make_model(vocab, 0)
    gen = await initial_beam(model, BeamParams(K=None))
    gen = await read(gen, b"a<")  # '<' exists only inside the EOS token
    assert gen.logp == -math.inf
    pre = await initial_beam(model, BeamParams(K=None), with_eos=False)
    pre = await prefill(pre, b"a<e>b")
    assert np.isfinite(pre.logp) and pre.with_eos
    assert np.exp(pre.next_logprobs()).sum() == pytest.approx(1, abs=1e-9)
    assert np.isfinite(pre.next_logprobs()[256])  # EOS possible after the prompt


async def test_healing_recovers_where_k1_empties():
    vocab = [b"a", b"ab", b"bc", EOS_BYTES]  # "abc" = a|bc only; K=1 may keep "ab"
    lm, model = make_model(vocab, 0)
    for seed in range(200):
        lm, model = make_model(vocab, seed)
        plain = await read(await initial_beam(model, BeamParams(K=1, heal=False)), b"abc")
        if plain.is_empty:
            break
    else:
        pytest.fail("no seed makes K=1 keep the wrong tokenization")
    assert plain.logp == -math.inf
    healed = await read(await initial_beam(model, BeamParams(K=1)), b"abc")
    assert not healed.is_empty and np.isfinite(healed.logp) and healed.stats.heals == 1
    exact = await read(await initial_beam(model, BeamParams(K=None)), b"abc")
    # the healed candidate is one tokenization: its weight is at most the exact marginal
    assert healed.log_total <= exact.log_total + 1e-9
    # backing off 0 bytes cannot reach "a|bc"
    stuck = await read(await initial_beam(model, BeamParams(K=1, heal_max_backoff=0)), b"abc")
    assert stuck.is_empty


async def test_heal_max_splits_is_respected():
    vocab = [b"x", b"xab", b"a", b"bc", EOS_BYTES]  # "xabc" = x|a|bc: healing commits x, then a
    for seed in range(300):
        lm, model = make_model(vocab, seed)
        plain = await read(await initial_beam(model, BeamParams(K=1, heal=False)), b"xabc")
        if plain.is_empty:
            break
    else:
        pytest.fail("no seed makes K=1 keep x|ab")
    one = await read(await initial_beam(model, BeamParams(K=1, heal_max_splits=1)), b"xabc")
    assert not one.is_empty and one.stats.heals == 1
    zero = await read(await initial_beam(model, BeamParams(K=1, heal_max_splits=0)), b"xabc")
    assert zero.is_empty


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(K=0), ValueError, "K=0"),
        (dict(K=2.5), TypeError, "K=2.5"),
        (dict(K=True), TypeError, "K=True"),
        (dict(prune_threshold=-0.1), ValueError, "-0.1"),
        (dict(prune_threshold=1.0), ValueError, "1.0"),
        (dict(heal_max_backoff=-1), ValueError, "heal_max_backoff=-1"),
    ],
)
def test_beam_params_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        BeamParams(**kwargs)


async def test_bad_bytes_raise_and_zero_probability_is_minus_inf():
    lm, model = make_model([b"a", b"b", EOS_BYTES], 0)
    beam = await initial_beam(model, BeamParams(K=2))
    with pytest.raises(ValueError, match="256"):
        await advance([beam], [256])
    with pytest.raises(ValueError, match="-1"):
        await advance([beam], [-1])
    with pytest.raises(TypeError, match="'a'"):
        await advance([beam], ["a"])
    (zero,) = await advance([beam], [ord("z")])
    assert zero.logp == -math.inf and zero.is_empty
    (still,) = await advance([zero], [ord("a")])
    assert still.logp == -math.inf and np.all(still.next_logprobs() == -np.inf)


async def test_max_context_length_truncates_the_lm_view_only():
    lm, model = make_model([b"a", b"b", EOS_BYTES], 0, max_context_length=2)
    state = LMState((1, 0, 1, 0))
    assert model.model_input(state) == (1, 0)
    assert state.tokens == (1, 0, 1, 0)
    # a context starting with the start token (here EOS, id 2) keeps it
    assert model.model_input(LMState((2, 0, 1, 0))) == (2, 0)
    with pytest.raises(ValueError, match="max_context_length=0"):
        TokenModel(lm, max_context_length=0)


async def test_extensions_are_remembered_and_the_memo_is_bounded(monkeypatch):
    """``TokenModel.extend`` returns the object it made for the same (state, token), equal
    to ``LMState.extend``'s; the memo is cleared when full, and then makes equal new ones.
    A scoring run through it gives the values of one without it."""
    from genlm_bytes_potential import lm_state

    lm, model = make_model([b"a", b"b", b"ab", b"ba"], seed=3)
    s = model.initial_state([0])
    a = model.extend(s, 2)
    assert model.extend(s, 2) is a and a == s.extend(2) and a.tokens == (0, 2)
    assert model.extend(s, 3) is not a and model.extend(a, 1).tokens == (0, 2, 1)
    monkeypatch.setattr(lm_state, "_EXTENSIONS_KEPT", 3)
    model.extend(s, 1)  # the fourth: the memo was full
    assert len(model._extensions) == 1
    again = model.extend(s, 2)
    assert again is not a and again == a
    monkeypatch.setattr(lm_state, "_EXTENSIONS_KEPT", 100)
    monkeypatch.setattr(lm_state, "_EXTENSION_TOKENS_KEPT", 7)  # two of 2 tokens, one of 3: 7
    long = model.extend(again, 0)
    assert len(model._extensions) == 3 and model.extend(again, 0) is long
    model.extend(long, 1)  # 4 more tokens: past the bound
    assert len(model._extensions) == 1
    data = b"abbaab"
    plain = ByteLM(MockTokenLM([b"a", b"b", b"ab", b"ba"], seed=3), K=2, lookahead=3)
    monkeypatch.setattr(plain.model, "extend", lambda state, token: state.extend(token))
    assert (await ByteLM(lm, K=2, lookahead=3).score(data)).logprob == (await plain.score(data)).logprob


async def test_no_bos_no_eos_tokenizer():
    lm = MockTokenLM([b"a", b"b"], seed=0)
    model = TokenModel(lm)
    assert model.initial_state().tokens == ()
    assert model.initial_state([1]).tokens == (1,)
    beam = await read(await initial_beam(model, BeamParams(K=2)), b"ab")
    assert np.isfinite(beam.logp)


async def test_byte_lm_helpers():
    vocab = [b"a", b"b", b"ab", b" ", EOS_BYTES]
    lm = MockTokenLM(vocab, seed=4, eos_token_id=4)
    blm = ByteLM(lm, K=4)
    score = await blm.score(b"ab ba")
    assert score.n_bytes == 5 and score.bits_per_byte == pytest.approx(-score.logprob / math.log(2) / 5)
    dist = await blm.next_byte(b"ab")
    assert isinstance(dist, ByteDist)
    top = dist.top(3)
    assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
    assert "b'" in str(dist) or "<EOS>" in str(dist)
    greedy = await blm.generate(b"a", max_bytes=10, greedy=True)
    assert greedy == await blm.generate(b"a", max_bytes=10, greedy=True)
    sampled = await blm.generate(b"a", max_bytes=10, seed=1, stop_at_eos=False)
    assert len(sampled) == 10 and set(sampled) <= set(b"ab ")
    assert (await blm.score(sampled, prompt=b"a")).logprob > -math.inf


@settings(max_examples=30, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    docs=st.lists(st.one_of(texts(7), texts(3).map(lambda t: t + b"z" + t)), max_size=5),
    prompt=st.sampled_from([b"", b"ab"]),
    K=st.sampled_from([1, 3]),
)
async def test_batch_score_is_each_texts_score(vocab, seed, docs, prompt, K):
    """Texts scored in lockstep get, one by one, what ``score`` gives each alone: the same
    log-prob to the last digit (an exact LM), the same heals and the same impossible byte
    (``z`` is in no token); ``on_byte`` counts the bytes read, all texts together."""
    lm = MockTokenLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES))
    counts = []
    together = await ByteLM(lm, K=K).batch_score(docs, prompt=prompt, on_byte=counts.append)
    alone = []
    for d in docs:  # each text read alone, byte by byte
        blm = ByteLM(MockTokenLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES)), K=K)
        beam = start = await blm.beam(prompt)
        for i, b in enumerate(d):
            (beam,) = await advance([beam], [b], ahead=[d[i + 1 :]])
            if beam.logp == -math.inf:
                alone.append((-math.inf, len(d), beam.stats.heals, i))
                break
        else:
            alone.append((beam.logp - start.logp, len(d), beam.stats.heals, None))
    assert [(s.logprob, s.n_bytes, s.heals, s.impossible_at) for s in together] == alone
    assert [(s.logprob, s.impossible_at) for s in together] == [
        (s.logprob, s.impossible_at) for s in [await ByteLM(lm, K=K).score(d, prompt) for d in docs]
    ]
    read = [n if at is None else at + 1 for _, n, _, at in alone]
    assert counts == sorted(set(counts)) and counts[-1:] == ([sum(read)] if any(read) else [])


async def test_batch_score_makes_one_lm_call_a_step():
    """Lockstep: each step's extensions, over all texts, are one LM call (without
    prefetching, a text alone calls at nearly every byte too)."""
    vocab = [b"a", b"b", b"ab", b" ", EOS_BYTES]
    docs = [b"ab ba ab", b"ba ab", b"a b", b""]
    lm = MockTokenLM(vocab, seed=4, eos_token_id=4)
    scores = await ByteLM(lm, K=4, lookahead=0).batch_score(docs)
    assert lm.batch_calls <= 1 + max(map(len, docs)) and all(s.logprob > -math.inf for s in scores)
    assert scores[-1].logprob == 0.0 and scores[-1].n_bytes == 0


@settings(max_examples=40, deadline=None)
@given(vocab=vocabularies(), seed=st.integers(0, 1000), data=texts(8), K=st.sampled_from([None, 1, 3]))
async def test_lookahead_changes_no_value(vocab, seed, data, K):
    """Prefetching only adds contexts to LM calls: every conditional is the same."""
    params = BeamParams(K=K, heal=False)
    beams = []
    for lookahead in (0, 4):
        lm, model = make_model(vocab, seed, lookahead=lookahead, max_prefetch=16)
        assert model.lookahead == lookahead
        beam = await initial_beam(model, params)
        logps = []
        for i, b in enumerate(data):
            (beam,) = await advance([beam], [b], ahead=[data[i + 1 :]])
            logps.append(beam.logp)
        beams.append((logps, lm))
    assert beams[0][0] == beams[1][0]
    assert len(beams[1][1].requests) >= len(beams[0][1].requests)


@settings(max_examples=40, deadline=None)
@given(vocab=vocabularies(), seed=st.integers(0, 1000), data=texts(8), K=st.sampled_from([None, 1, 3]))
async def test_a_draft_changes_no_value(vocab, seed, data, K):
    """Drafting what to prefetch (a known text as a ``bytes`` object behind the bytes
    ahead) only adds contexts to LM calls: every conditional is the same, read from a
    prompt (``prefill``) or byte by byte."""
    params = BeamParams(K=K, heal=False)
    runs = []
    for window in (0, 3):
        lm, model = make_model(vocab, seed, lookahead=4, max_prefetch=16, draft_window=window)
        beam = await initial_beam(model, params, ahead=data)
        view = memoryview(data)
        logps = []
        for i, b in enumerate(data):
            (beam,) = await advance([beam], [b], ahead=[view[i + 1 :]])
            logps.append(beam.logp)
        prompted = await prefill(await initial_beam(model, params, with_eos=False, ahead=data), data)
        runs.append((logps, prompted.logp))
    assert runs[0] == runs[1]


class _ContextFreeLM(MockTokenLM):
    """The mock with one next-token distribution after every context (its seed only)."""

    def _words(self, ctx):
        return np.asarray([self.seed], np.int64)


_WORDS = [b"the", b" the", b"cat", b" cat", b"sat", b" sat", b"on", b" on", b"mat", b" mat", b"th", b"he", b"at"]
_WORD_VOCAB = _WORDS + [b"e", b"c", b"a", b"t", b"s", b"o", b"n", b"m", b" ", b" m", EOS_BYTES]


@pytest.mark.parametrize("seed", [1, 5, 9])
async def test_a_draft_prefetches_what_the_beam_reads_in_fewer_calls(seed):
    """Scoring a long text where proxies predict the rows (a context-free LM: on the random
    mock a proxy's row says nothing of another context's, and drafts guess no better than
    ranked guesses), a draft's prefetches (a window of 16 bytes) leave at least a fifth
    fewer LM calls with new contexts than ranked guesses do; the score is the same."""
    data = b"the cat sat on the mat " * 5
    runs = {}
    for window in (0, 16):
        lm = _ContextFreeLM(_WORD_VOCAB, seed=seed, eos_token_id=len(_WORD_VOCAB) - 1)
        calls = count_new_context_calls(lm)
        logprob = (await ByteLM(lm, K=8, draft_window=window).score(data)).logprob
        runs[window] = (calls[0], logprob)
    assert runs[16][1] == runs[0][1]
    assert runs[16][0] <= 0.8 * runs[0][0]


@pytest.mark.parametrize("n_docs", [2, 4])
async def test_texts_read_in_lockstep_draft_up_to_four_beams(n_docs):
    """``batch_score`` of up to ``MAX_DRAFTING_BEAMS`` texts drafts for each: at least a
    fifth fewer LM calls with new contexts than ranked guesses (where proxies predict the
    rows, as above), the same scores."""
    docs = [(b"the cat sat on the mat " * 3)[k:] for k in range(n_docs)]
    runs = {}
    for window in (0, 16):
        lm = _ContextFreeLM(_WORD_VOCAB, seed=3, eos_token_id=len(_WORD_VOCAB) - 1)
        calls = count_new_context_calls(lm)
        scores = await ByteLM(lm, K=8, draft_window=window).batch_score(docs)
        runs[window] = (calls[0], [s.logprob for s in scores])
    assert runs[16][1] == runs[0][1]
    assert runs[16][0] <= 0.8 * runs[0][0]


@settings(max_examples=40, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    data=texts(9).filter(lambda d: len(d) >= 2),
    K=st.sampled_from([1, 2, 4]),
    window=st.integers(1, 6),
    threshold=st.sampled_from([0.0, 0.05]),
)
async def test_a_draft_makes_what_the_beam_makes_when_proxies_are_exact(vocab, seed, data, K, window, threshold):
    """Under an LM whose distribution ignores the context, a proxy's row is the row of
    every context ending where it does: a draft from byte ``i`` then makes exactly the
    contexts the beam makes reading ``data[i:i + window]``, in the beam's order."""
    from genlm_bytes_potential.beam.draft import draft

    lm = _ContextFreeLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES))
    model = TokenModel(lm)
    root = model.trie.root
    beams = [await initial_beam(model, BeamParams(K=K, prune_threshold=threshold, heal=False), ahead=data)]
    made = []  # per step, the contexts it made (its candidates at the root) and where they end
    for i, b in enumerate(data):
        (beam,) = await advance([beams[-1]], [b], ahead=[data[i + 1 :]])
        beams.append(beam)
        made.append({s: i + 1 for s, n in zip(beam.states, beam.nodes.tolist()) if n == root})
    for i in range(len(data)):
        end = min(len(data), i + window)
        drafted = await draft(beams[i], data, i, end)
        assert drafted is not None
        want = {s: p for step in made[i:end] for s, p in step.items()}
        assert list(drafted.items()) == list(want.items())


def test_proxy_plan_spells_each_prefix_along_one_tokenization():
    """Per position a proxy context spelling the text up to there: the tokenizer's
    encoding up to its last boundary, then greedy longest match; without a tokenizer the
    encoding is greedy longest match too."""
    from genlm_bytes_potential.beam.draft import proxy_plan

    vocab = [b"a", b"b", b"ab", b"ba", b"aba", b" "]
    text = b"abab ba"

    class Tokenizer:  # a tokenization that greedy longest match would not give
        def encode(self, s, add_special_tokens=False):
            return [0, 3, 1, 5, 3]  # a|ba|b| |ba

    for tokenizer, spine in ((None, [4, 1, 5, 3]), (Tokenizer(), [0, 3, 1, 5, 3])):
        got, plan = proxy_plan(vocab, tokenizer, text)
        assert got == spine and len(plan) == len(text) + 1
        for p, (j, tail) in enumerate(plan):
            ends = np.cumsum([0] + [len(vocab[t]) for t in spine])
            assert ends[j] <= p and (j == len(spine) or ends[j + 1] > p)  # the spine's tokens ending by p
            assert b"".join(vocab[t] for t in (*spine[:j], *tail)) == text[:p]
    spine, plan = proxy_plan(vocab, Tokenizer(), text[:6])  # an encoding of other bytes: greedy instead
    assert spine == [4, 1, 5, 1] and plan[-1] == (4, ()) and plan[2] == (0, (2,))


@settings(max_examples=40, deadline=None)
@given(vocab=vocabularies(), seed=st.integers(0, 1000), data=texts(3).filter(len))
async def test_lookahead_prefetches_every_context_an_unpruned_read_asks_for(vocab, seed, data):
    """Without pruning, the first step asks for every context that reading the rest
    (up to ``lookahead`` bytes, ``depth`` tokens) will ask for: later steps call nothing new."""
    lm, model = make_model(vocab, seed, lookahead=8, max_prefetch=10**6)
    beam = await initial_beam(model, BeamParams(K=None, heal=False))
    (beam,) = await advance([beam], [data[0]], ahead=[data[1:]])
    prefetched = set(lm.requests)
    lm.reset_counters()
    for i in range(1, len(data)):
        (beam,) = await advance([beam], [data[i]], ahead=[data[i + 1 :]])
    assert set(lm.requests) <= prefetched


@settings(max_examples=60, deadline=None)
@given(
    vocab=vocabularies(),
    data=texts(6).filter(len),
    depth=st.integers(1, 3),
    picks=st.lists(st.integers(0, 99), max_size=4),
)
def test_speculated_contexts_are_enumerated_breadth_first(vocab, data, depth, picks):
    """``spelled_contexts`` (a numba kernel) lists the contexts of the written-down enumeration: each
    candidate's partial token continued by ``data[:end]`` (level 1), then, breadth first,
    every context of level < depth extended by each token the data spells from its end."""
    from genlm_bytes_potential.beam.prefetch import spelled_contexts

    trie = make_model(vocab, 0)[1].trie
    prefixes = sorted({t[:k] for t in vocab for k in range(len(t))})
    nodes = np.array([trie.node_of(prefixes[p % len(prefixes)]) for p in picks] + [trie.root], np.int64)
    found = []
    for i, node in enumerate(nodes.tolist()):
        for end in range(1, len(data) + 1):
            leaves = trie.leaves_spelling(trie.prefix_of[node] + data[:end])
            if leaves is None:
                break
            found += [(-1 - i, leaf, 1, end) for leaf in leaves]
    k = 0
    while k < len(found):
        _, _, lev, start = found[k]
        for end in range(start + 1, len(data) + 1) if lev < depth else ():
            leaves = trie.leaves_spelling(data[start:end])
            if leaves is None:
                break
            found += [(k, leaf, lev + 1, end) for leaf in leaves]
        k += 1
    got = spelled_contexts(trie, nodes, data, depth)
    assert list(zip(*(a.tolist() for a in got))) == found


@settings(max_examples=40, deadline=None)
@given(
    vocab=vocabularies(), seed=st.integers(0, 1000), data=texts(8), K=st.sampled_from([None, 1, 3]), heal=st.booleans()
)
async def test_a_store_that_reuses_rows_gives_the_same_values(vocab, seed, data, K, heal):
    """Masses live in the model's store; with room for one row, rows are reused at every
    step and recomputed when read again: the same log-probs, heals and weights bit for bit,
    and beams read after their rows were reused recompute them."""
    runs = []
    for mass_bytes in (2**30, 1):
        lm, model = make_model(vocab, seed, mass_bytes=mass_bytes)
        beam = await initial_beam(model, BeamParams(K=K, heal=heal))
        logps, beams = [], []
        for i, b in enumerate(data):
            (beam,) = await advance([beam], [b], ahead=[data[i + 1 :]])
            logps.append(beam.logp)
            beams.append(beam)
        runs.append((logps, beam, await next_byte_logprobs(beams), model))
    (full_logps, full, full_next, _), (small_logps, small, small_next, small_model) = runs
    assert small_logps == full_logps and small.stats.heals == full.stats.heals
    assert list(small.weights) == list(full.weights)
    np.testing.assert_array_equal(small_next, full_next)
    assert small_model.store.max_rows == 1


async def test_a_beam_holds_no_masses():
    """A beam holds its candidates' arrays and contexts only; its masses are rows of the
    model's store, shared by all beams (issue: <= 200 KB per cached beam at K=8)."""
    vocab = [bytes([c]) for c in range(256)] + [b"ab", b"abc", b"bc", EOS_BYTES]
    lm, model = make_model(vocab, 0)
    beam = await read(await initial_beam(model, BeamParams(K=8)), b"abcabcab")
    assert 0 < beam.nbytes < min(200_000, len(beam) * model.store.row_bytes)  # less than a mass row a candidate
    assert model.store.nbytes == len(model.store) * model.store.row_bytes


async def test_lookahead_is_off_for_lms_without_a_logprob_cache():
    class NoCache(MockTokenLM):
        has_logprobs = None

    model = TokenModel(NoCache([b"a", b"b", b"ab"]), lookahead=4)
    assert model.lookahead == 0
    with pytest.raises(ValueError, match="lookahead=-1"):
        TokenModel(MockTokenLM([b"a"]), lookahead=-1)
    with pytest.raises(ValueError, match="max_prefetch=1.5"):
        TokenModel(MockTokenLM([b"a"]), max_prefetch=1.5)


@settings(max_examples=60, deadline=None)
@given(
    n_beams=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    spread=st.sampled_from([1.0, 50.0, 800.0, 2000.0]),
    zeros=st.sampled_from([0.0, 0.3]),
)
def test_next_byte_sums_match_log_space(n_beams, seed, spread, zeros):
    """``_outcome_logprobs`` sums candidates in linear space per beam; weights far apart
    (past float64's range) and zero masses must give the log-space result: each (beam,
    outcome) is ``log sum_c exp(w_c + log M_c(child) - log M_c(node))`` less the normalizer."""
    from genlm_bytes_potential.beam.core import N_OUTCOMES, _outcome_logprobs

    rng = np.random.default_rng(seed)
    n_cand = rng.integers(1, 6, n_beams)
    bid = np.repeat(np.arange(n_beams), n_cand)
    weights = -spread * rng.random(len(bid))
    node_mass = np.exp(-rng.random(len(bid)) * 5)
    outcomes = [np.sort(rng.choice(N_OUTCOMES, rng.integers(1, 20), replace=False)) for _ in bid]
    owner = np.repeat(np.arange(len(bid)), [len(o) for o in outcomes])
    label = np.concatenate(outcomes)
    label[label == 256] = 257  # outcome 256 is the EOS edge, label 257
    child_mass = np.exp(-rng.random(len(owner)) * 700) * (rng.random(len(owner)) >= zeros)
    norm = rng.normal(size=n_beams)
    got = _outcome_logprobs(owner, label, np.concatenate([child_mass, node_mass]), weights, bid, norm)

    want = np.full((n_beams, N_OUTCOMES), -np.inf)
    with np.errstate(divide="ignore"):
        vals = weights[owner] + np.log(child_mass) - np.log(node_mass[owner])
    for v, c, a in zip(vals, owner, np.where(label == 257, 256, label)):
        want[bid[c], a] = np.logaddexp(want[bid[c], a], v)
    want -= norm[:, None]
    assert (np.isfinite(got) == np.isfinite(want)).all()
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    data=texts(6),
    spread=st.sampled_from([0.0, 50.0, 800.0, 2000.0]),
)
async def test_next_byte_sums_read_in_rows_equal_the_gathered_ones(vocab, seed, data, spread):
    """On host weight rows ``_next_logprobs`` reads each mass where it sums it; the result
    equals, bit for bit, the sums over one gather of all children's masses, also when
    candidates' weights lie far apart (``spread``: sums then redone in log space)."""
    from dataclasses import replace

    from genlm_bytes_potential.beam.core import _children_plan, _Flat, _next_logprobs, _outcome_logprobs

    lm, model = make_model(vocab, seed)
    beams = [await initial_beam(model, BeamParams(K=None, heal=False))]
    for b in data:
        (beam,) = await advance([beams[-1]], [b])
        if beam.is_empty:
            break
        beams.append(beam)
    rng = np.random.default_rng(seed)
    beams = [replace(b, weights=b.weights - spread * rng.random(len(b)), _dist=[]) for b in beams]
    trie = model.trie
    flat = _Flat(beams)
    owner, pos, g_slot, g_node = _children_plan(flat.nodes, flat.rows.slot, trie.child_ptr, trie.child_node)
    norm = np.array([b.log_norm for b in beams])
    gathered = _outcome_logprobs(
        owner, trie.child_label[pos], model.store.gather(g_slot, g_node), flat.weights, flat.bid, norm
    )
    assert isinstance(model.store.table, np.ndarray)
    np.testing.assert_array_equal(_next_logprobs(beams), gathered)


@settings(max_examples=40, deadline=None)
@given(
    vocab=vocabularies(),
    seed=st.integers(0, 1000),
    data=texts(10),
    K=st.sampled_from([None, 1, 3]),
    heal=st.booleans(),
)
async def test_full_rows_hold_the_masses_of_the_known_bytes_on_the_host(vocab, seed, data, K, heal):
    """A store of full rows (as on a GPU; here a torch table on the CPU) copies, with each
    new row's check, the masses that reading the bytes known after its context visits
    (``keep_paths``). Scoring then gives, bit for bit, what the same store gives copying
    every mass from the table when it is read; without healing no read copies anything
    but from the first context's row (computed before any bytes were known); and the
    values are those of host weight rows (another summation order: to 1e-9)."""
    from genlm_bytes_potential.lm_state import MassStore

    runs = []
    for hold in (True, False):
        blm = ByteLM(MockTokenLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES)), K=K, heal=heal)
        store = blm.model.store = MassStore(blm.model.trie, 2**30, full_rows=True)
        if not hold:  # hold nothing: only the check's copy of the root masses
            store.keep_paths = lambda sent, copy=store._copied, root=blm.model.trie.root: copy(
                sent.slots, np.full(len(sent.slots), root)
            )
        read_copies = record_read_copies(store)
        first_row = int((await blm.beam()).rows.slot[0])
        score = await blm.score(data)
        runs.append((score.logprob, score.heals, score.impossible_at))
        if hold and not heal:
            assert set(np.concatenate([[first_row], *read_copies]).tolist()) == {first_row}
        elif not hold and len(data) > 1 and score.impossible_at is None:
            assert len(read_copies) >= len(data)
        assert isinstance(store.table, torch.Tensor) and store.held_node is not None
    assert runs[0] == runs[1]
    host = await ByteLM(MockTokenLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES)), K=K, heal=heal).score(data)
    assert (host.heals, host.impossible_at) == runs[0][1:]
    assert host.logprob == pytest.approx(runs[0][0], rel=1e-9, abs=1e-9)


def test_held_masses_merge_sorted_and_new_ones_replace_a_full_list():
    """``_hold``: per slot a sorted list, each node once (a node held keeps its mass);
    entries that would overflow the list replace it; ``_held_masses`` finds them."""
    from genlm_bytes_potential.lm_state import _held_masses, _hold

    width, slots = 4, 2
    node, mass, n = np.zeros((slots, width), np.int64), np.zeros((slots, width)), np.zeros(slots, np.int64)
    no_front = (np.full(20, -1), np.zeros(slots, bool), np.zeros((slots, 1)))

    def hold(slot, nodes):
        _hold(node, mass, n, np.array(slot), np.array(nodes), np.array(nodes, float) + 0.5)

    hold([0, 1, 0, 0], [7, 3, 2, 7])
    assert n.tolist() == [2, 1] and node[0, :2].tolist() == [2, 7] and node[1, :1].tolist() == [3]
    mass[0, 1] = -1.0  # held already: a new copy of node 7 leaves it
    hold([0, 0], [7, 5])
    assert node[0, :3].tolist() == [2, 5, 7] and mass[0, :3].tolist() == [2.5, 5.5, -1.0]
    hold([0, 0], [9, 1])  # 3 + 2 > 4: the new ones replace the list
    assert node[0, : n[0]].tolist() == [1, 9]
    got, missing = _held_masses(*no_front, node, mass, n, np.array([0, 0, 1, 1]), np.array([9, 2, 3, 4]))
    assert missing.tolist() == [1, 3] and got[[0, 2]].tolist() == [9.5, 3.5]


def test_store_allocation_order():
    """``MassStore.allocate``: free slots, then rows idle for ``IDLE`` allocations (least
    recently used first), then new rows up to ``max_rows``, then rows not used since the
    previous allocation (least recently used first), then new rows past ``max_rows``."""
    from genlm_bytes_potential.lm_state import MassStore
    from genlm_bytes_potential.trie import TokenByteTrie

    trie = TokenByteTrie([b"a", b"b"])
    store = MassStore(trie, max_bytes=4 * 8 * trie.row_width)  # 4 rows
    like = np.zeros((1, trie.vocab_size))
    key = lambda i: (True, LMState((i,)))  # noqa: E731
    assert store.allocate([key(0), key(1)], like).tolist() == [0, 1]
    assert store.allocate([key(2)], like).tolist() == [2]
    store.touch(np.array([0]))  # row 0 used now, row 2 by the previous allocation: row 1 is not
    # existing slots first in the result: row 1 reused, then new row 3 (the last under max_rows) and row 4
    assert store.allocate([key(3), key(4), key(5)], like).tolist() == [1, 3, 4]
    assert key(1) not in store and all(key(i) in store for i in (0, 2, 3, 4, 5))
    store.discard([key(2)])
    assert store.allocate([key(6)], like).tolist() == [2]  # the free slot

    store = MassStore(trie, max_bytes=100 * 8 * trie.row_width)  # room for new rows
    store.allocate([key(0)], like), store.allocate([key(1)], like)
    new = [store.allocate([key(100 + i)], like).item() for i in range(MassStore.IDLE)]
    assert new == list(range(2, 2 + MassStore.IDLE))
    # row 0 untouched for IDLE allocations goes before a new row; row 1 is not idle yet
    assert store.allocate([key(7)], like).tolist() == [0] and key(0) not in store and key(1) in store


def test_a_host_store_allocates_its_rows_once(monkeypatch):
    """A host table is allocated for ``max_rows`` at once (its rows take memory when first
    written), where a device table starts small: growing to ``max_rows`` rows copies
    none; a step needing more rows than that grows it past them, keeping every row."""
    from genlm_bytes_potential import lm_state
    from genlm_bytes_potential.lm_state import MassStore
    from genlm_bytes_potential.trie import TokenByteTrie

    trie = TokenByteTrie([b"a", b"b", b"ab"])
    store = MassStore(trie, max_bytes=300 * 8 * trie.row_width)
    monkeypatch.setattr(lm_state, "_FIRST_TABLE_BYTES", store.row_bytes)  # a device table: 64 rows
    like = np.zeros((1, trie.vocab_size))
    key = lambda i: (True, LMState((i,)))  # noqa: E731
    store.allocate([key(0)], like)
    table = store.table
    assert table.shape[0] == store.max_rows == 300
    for start in range(1, 300, 20):  # 15 allocations: no row idle yet, 300 rows in use
        slots = store.allocate([key(i) for i in range(start, min(start + 20, 300))], like)
        store.table[slots] = slots[:, None]
    assert len(store) == 300 and store.table is table
    wanted = store.table[:300].copy()
    slots = store.allocate([key(1000 + i) for i in range(400)], like)  # more than max_rows at once
    assert store.table is not table and store.table.shape[0] >= 400 and len(set(slots.tolist())) == 400
    np.testing.assert_array_equal(store.table[:300], wanted)


def test_a_host_refusing_a_large_table_gets_one_that_doubles(monkeypatch):
    """When the host refuses the address space of ``max_rows`` rows at once, the table
    starts at a device table's first size and doubles, keeping every row."""
    from genlm_bytes_potential import lm_state
    from genlm_bytes_potential.lm_state import MassStore
    from genlm_bytes_potential.trie import TokenByteTrie

    trie = TokenByteTrie([b"a", b"b", b"ab"])
    store = MassStore(trie, max_bytes=300 * 8 * trie.row_width)
    monkeypatch.setattr(lm_state, "_FIRST_TABLE_BYTES", store.row_bytes)  # first size: 64 rows
    new_table = store._new_table

    def refuse_large(rows, full, device):
        if rows > 200:  # max_rows (300) at once
            raise MemoryError(f"{rows} rows")
        return new_table(rows, full, device)

    monkeypatch.setattr(store, "_new_table", refuse_large)
    like = np.zeros((1, trie.vocab_size))
    first = store.allocate([(True, LMState((i,))) for i in range(10)], like)
    store.table[first] = first[:, None]
    assert store.table.shape[0] == 64
    store.allocate([(True, LMState((i,))) for i in range(10, 70)], like)
    assert store.table.shape[0] == 128 and store.table[first, 0].tolist() == first.tolist()


def test_pinned_rows_are_never_reused():
    """Rows a call pins while it awaits the GPU (``MassStore.pinned``) are passed over by
    every rule of ``allocate``, idle or not, free after a ``clear`` or not (the table grows
    instead); pins nest, and the rows are reusable again once every pin is gone."""
    from genlm_bytes_potential.lm_state import MassStore
    from genlm_bytes_potential.trie import TokenByteTrie

    trie = TokenByteTrie([b"a", b"b"])
    store = MassStore(trie, max_bytes=2 * 8 * trie.row_width)  # 2 rows
    like = np.zeros((1, trie.vocab_size))
    key = lambda i: (True, LMState((i,)))  # noqa: E731
    pinned = store.allocate([key(0), key(1)], like)
    with store.pinned(pinned), store.pinned(pinned[:1]):
        for i in range(MassStore.IDLE + 2):  # rows 0 and 1 go idle, unused
            assert store.allocate([key(10 + i)], like).item() not in (0, 1)
        store.clear()  # every row free, the pinned ones too: still not taken
        assert not set(store.allocate([key(20), key(21)], like).tolist()) & {0, 1}
    assert set(store.allocate([key(30), key(31)], like).tolist()) == {0, 1}  # the two free rows come first


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6),
    st.lists(st.integers(-5, 2**31), min_size=1, max_size=40),
    st.booleans(),
)
def test_extended_contexts_hash_as_plain_tuples(root, tokens, folded):
    """``TokenContext.extended`` folds each token into its parent's hash state: the hash
    of every context along a line of extensions is ``tuple.__hash__`` of its tokens (from
    a context made from any sequence, and with the fold switched off, as on interpreters
    whose tuple hash differs), so contexts and equal plain tuples share dict entries."""
    from genlm_bytes_potential import lm_state
    from genlm_bytes_potential.lm_state import TokenContext

    saved = lm_state._FOLDED_HASH
    lm_state._FOLDED_HASH = folded and saved
    try:
        ctx, table = TokenContext(root), {}
        for t in tokens:
            ctx = ctx.extended(t)
            assert hash(ctx) == hash(tuple(ctx)) and ctx == tuple(root) + tuple(tokens[: len(ctx) - len(root)])
            table[ctx] = len(ctx)
        assert all(table[tuple(root) + tuple(tokens[:k])] == len(root) + k for k in range(1, len(tokens) + 1))
        assert TokenContext(tuple(ctx)).extended(3) == tuple(ctx) + (3,)
    finally:
        lm_state._FOLDED_HASH = saved
    assert saved  # CPython: the fold is the interpreter's own tuple hash


def test_token_contexts_keep_their_prefix_two_links_deep():
    """A context made by ``extended`` equals (and hashes as) the plain tuple and keeps the
    context it extends, which backends find as its prefix without slicing; links stay at
    most two deep, so a long line of contexts keeps no chain of ancestors alive."""
    from genlm_bytes_potential.backends.protocol import context_prefix
    from genlm_bytes_potential.lm_state import TokenContext

    root = TokenContext((5, 6))
    line = [root]
    for t in range(7, 12):
        line.append(line[-1].extended(t))
    last = line[-1]
    assert last == (5, 6, 7, 8, 9, 10, 11) and hash(last) == hash((5, 6, 7, 8, 9, 10, 11))
    assert context_prefix(last) is line[-2] and context_prefix(line[-2]) is line[-3]
    assert [t.prefix for t in line[:-2]] == [None] * (len(line) - 2)  # cut past two links
    assert context_prefix(line[2]) == (5, 6, 7) and context_prefix((1, 2, 3)) == (1, 2)
    assert LMState(root).extend(np.int64(9)).tokens.prefix is root  # what a beam's step makes
