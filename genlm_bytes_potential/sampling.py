"""Reading genlm-control SMC results over byte potentials."""

from __future__ import annotations

import math

import numpy as np
from genlm.control.constant import EndOfSequence

from .tokens import byte_ints


def byte_posterior(sequences) -> list[tuple[bytes, float]]:
    """Completed byte strings of an SMC run with their posterior probabilities, likeliest
    first: particles ending in EOS with finite weight, duplicates summed, normalized.
    Tokens may be one-byte ``bytes`` or ints. Unlike genlm-control's
    ``sequences.decoded_posterior`` (strings), it keeps strings that are not valid UTF-8."""
    mass: dict[bytes, float] = {}
    for ctx, lw in zip(sequences.contexts, sequences.log_normalized_weights):
        if np.isfinite(lw) and ctx and isinstance(ctx[-1], EndOfSequence):
            key = bytes(byte_ints(ctx[:-1]))
            mass[key] = mass.get(key, 0.0) + math.exp(lw)
    total = sum(mass.values())
    return sorted(((k, v / total) for k, v in mass.items()), key=lambda kv: -kv[1])
