"""Hypothesis strategies: small random vocabularies over a few letters."""

from hypothesis import strategies as st

ALPHABET = b"abc"
EOS_BYTES = b"<e>"


def _word(max_len):
    return st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=max_len).map(bytes)


@st.composite
def vocabularies(draw, max_extra=8, max_len=3, eos=True):
    """Every single letter (so every text has a tokenization), shared-prefix words,
    duplicates (distinct ids with equal bytes), optionally an EOS token."""
    words = [bytes([c]) for c in ALPHABET]
    words += draw(st.lists(_word(max_len), max_size=max_extra))
    if draw(st.booleans()):
        words.append(draw(st.sampled_from(words)))  # a duplicate
    words = draw(st.permutations(words))
    if eos:
        words.insert(draw(st.integers(0, len(words))), EOS_BYTES)
    return list(words)


def texts(max_size=5):
    return st.lists(st.sampled_from(list(ALPHABET)), max_size=max_size).map(bytes)
