"""Brute-force references: exact byte-level probabilities by enumerating tokenizations."""

import math

import numpy as np


def prefix_prob(lm, ctx, data: bytes, eos_tokens=frozenset()) -> float:
    """P(the LM's byte output starts with ``data`` | token context ``ctx``), summing over
    every tokenization; tokens in ``eos_tokens`` end the output (they are not text)."""
    if not data:
        return 1.0
    p = np.exp(lm.logprobs_of(ctx))
    total = 0.0
    for t, tok in enumerate(lm.byte_vocab):
        b = bytes(tok)
        if not b or b in eos_tokens or p[t] == 0:
            continue
        if len(b) >= len(data):
            if b.startswith(data):
                total += p[t]
        elif data.startswith(b):
            total += p[t] * prefix_prob(lm, ctx + (t,), data[len(b) :], eos_tokens)
    return total


def complete_prob(lm, ctx, data: bytes, eos_tokens) -> float:
    """P(the LM's byte output is exactly ``data`` followed by an EOS token | ``ctx``)."""
    p = np.exp(lm.logprobs_of(ctx))
    eos_ids = [t for t, tok in enumerate(lm.byte_vocab) if bytes(tok) in eos_tokens]
    total = float(p[eos_ids].sum()) if not data else 0.0
    for t, tok in enumerate(lm.byte_vocab):
        b = bytes(tok)
        if b and b not in eos_tokens and data.startswith(b):
            total += p[t] * complete_prob(lm, ctx + (t,), data[len(b) :], eos_tokens)
    return total


def log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
