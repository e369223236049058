"""Full support under pruning (the rule in the docstring of genlm_bytes_potential.beam): no
byte that begins a token gets q = 0, at any K and threshold, so on byte-complete
vocabularies every byte string is finite."""

import math

import numpy as np
import pytest
from contract import assert_contract
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_bytes_potential import ByteBeamPotential
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.beam import BeamParams, advance, initial_beam
from genlm_bytes_potential.byte_lm import ByteLM
from genlm_bytes_potential.lm_state import TokenModel

EOS = b"<e>"
TEXTS = [
    "naïve café — 東京タワー at 3:45pm; the crème brûlée costs €12.50 (½ price).".encode(),
    "Über den großen Sylter Deich weht ein kräftiger Wind, sagt Jürgen Müller.".encode(),
]


@st.composite
def byte_complete_vocabularies(draw):
    """All 256 single bytes, random words over a few bytes (shared prefixes, high and
    NUL bytes), duplicates, and an EOS token spelled as text."""
    alphabet = list(b"ab<e>") + [0x00, 0xFF, 0xC3, 0xA9]
    words = draw(st.lists(st.lists(st.sampled_from(alphabet), min_size=2, max_size=4).map(bytes), max_size=30))
    vocab = [bytes([c]) for c in range(256)] + words + [EOS]
    if draw(st.booleans()):
        vocab.append(draw(st.sampled_from(vocab)))  # a duplicate
    return draw(st.permutations(vocab))


def mock(vocab, seed, temperature):
    return MockTokenLM(vocab, seed=seed, temperature=temperature, eos_token_id=list(vocab).index(EOS))


@settings(max_examples=25, deadline=None)
@given(
    vocab=byte_complete_vocabularies(),
    seed=st.integers(0, 10_000),
    temperature=st.sampled_from([0.02, 0.1, 1.0]),  # 0.02: one token holds > 0.999 of the mass
    data=st.binary(max_size=7),
    K=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.1, 0.5]),
)
async def test_byte_complete_vocabulary_gives_every_string_finite_weight(vocab, seed, temperature, data, K, threshold):
    pot = ByteBeamPotential(mock(vocab, seed, temperature), K=K, prune_threshold=threshold)
    ctxs = [list(data[:i]) for i in range(len(data) + 1)]
    for c in ctxs:
        assert math.isfinite(await pot.prefix(c)), (c, K, threshold)
        w = (await pot.logw_next(c)).weights
        assert np.isfinite(w[:256]).all()
        assert abs(np.exp(w).sum() - 1) <= 1e-9
    await assert_contract(pot, ctxs, rtol=1e-9)
    single = [await pot.spawn().prefix(c) for c in ctxs]
    np.testing.assert_array_equal(await pot.spawn().batch_prefix(ctxs), single)


def trained_bpe_vocab(size=400) -> list[bytes]:
    """A byte-level BPE of ``size`` tokens trained on the held-out benchmark text: every
    single byte is a token, plus the merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from benchmarks.common import DATA_DIR

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False
    )
    tok.train_from_iterator([(DATA_DIR / "heldout.txt").read_text()], trainer)
    decode = {c: b for b, c in _gpt2_byte_chars().items()}
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return [bytes(decode[c] for c in piece) for piece, _ in by_id] + [EOS]


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character BPE shows."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


@pytest.fixture(scope="module")
def bpe400():
    vocab = trained_bpe_vocab()
    assert len(vocab) == 401 and {bytes([c]) for c in range(256)} <= set(vocab)
    return vocab


@pytest.mark.parametrize("text", TEXTS, ids=["cafe", "sylt"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.1])
async def test_real_texts_stay_finite_with_a_trained_bpe(bpe400, text, K, threshold):
    """The issue's texts, which emptied K=1/K=2 beams before the rule (from byte 8 or
    35 on), are finite at every prefix, and the beam never needs healing."""
    pot = ByteBeamPotential(mock(bpe400, 0, 1.0), K=K, prune_threshold=threshold)
    logp = await pot.batch_prefix([list(text[:i]) for i in range(1, len(text) + 1)])
    assert np.isfinite(logp).all(), int(np.argmin(np.isfinite(logp)))
    assert np.isfinite((await pot.logw_next(list(text))).weights[:256]).all()
    score = await ByteLM(mock(bpe400, 0, 1.0), K=K, prune_threshold=threshold).score(text)
    assert math.isfinite(score.logprob) and score.heals == 0


async def test_pruning_keeps_a_candidate_that_can_end_a_token():
    """K=1 after reading "ab" with "abc" heavy keeps the mid-token candidate "ab" and also
    the heaviest one at which a token ends, so every byte stays readable."""
    vocab = [bytes([c]) for c in range(256)] + [b"abcdef", b"abcde", EOS]
    lm = mock(vocab, 3, 0.05)
    model = TokenModel(lm)
    beam = await initial_beam(model, BeamParams(K=1, heal=False))
    for b in b"abc":
        (beam,) = await advance([beam], [b])
        assert (beam.nodes == model.trie.root).any()
        assert np.isfinite(beam.next_logprobs()[:256]).all()


async def test_after_a_prompt_no_candidate_commits_eos_as_text():
    """EOS spelled as ordinary bytes: the prompt b"a<e" leaves candidates inside "<e>";
    after the prompt every candidate uses with-EOS masses, so reading ">" cannot finish
    the EOS token as text inside the context."""
    vocab = [b"a", b"<", b"e", b">", b"<e", EOS, b"a<"]
    eos_id = vocab.index(EOS)
    lm = MockTokenLM(vocab, seed=1, eos_token_id=eos_id)
    pot = ByteBeamPotential(lm, K=None, prompt=b"a<e")
    prompt_tokens = len(pot.prompt_tokens)
    for ctx in (b">", b">a", b">a<e>"):
        (beam,) = await pot.beams([list(ctx)])
        assert beam.with_eos
        for state in beam.states:
            assert eos_id not in state.tokens[prompt_tokens:], (ctx, state)
    # Without the switch, candidates inside "<e" would read ">" through the EOS token:
    # here ">" is only readable as its own token after the prompt's tokens.
    root = await pot._root()
    assert all(root.model.store.valid(root.rows))
    assert math.isfinite(await pot.prefix(list(b">a")))


async def test_zero_probability_contexts_satisfy_the_checks_stated():
    """At a context of weight -inf (a byte that begins no token: this vocabulary is not
    byte-complete) prefix, complete and every logw_next weight are -inf and batch
    consistency holds; genlm-control's logw_next consistency check is not defined there
    (it computes -inf - -inf = NaN), so the README states it for finite contexts only."""
    vocab = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"ca", EOS]
    pot = ByteBeamPotential(MockTokenLM(vocab, seed=0, eos_token_id=7), K=None, prune_threshold=0.2)
    zero = [0, 0]
    assert await pot.prefix(zero) == -math.inf
    assert await pot.complete(zero) == -math.inf
    assert np.all((await pot.logw_next(zero)).weights == -math.inf)
    await pot.assert_batch_consistency([zero, [97], [97, 98]], rtol=1e-9)
    with pytest.raises(AssertionError):
        await pot.assert_logw_next_consistency(zero, rtol=1e-9)
    await assert_contract(pot, [zero, [97], [97, 98]], allow_zero=True, rtol=1e-9)
