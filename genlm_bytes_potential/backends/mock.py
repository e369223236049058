"""A deterministic random token-level LM over an arbitrary byte vocabulary.

No tokenizer and no model: the next-token distribution is a pure function of
``(seed, temperature, context)``, so brute-force tests can recompute it exactly
with :meth:`MockTokenLM.logprobs_of` (float64). Every call is recorded
(``batch_calls``, ``requests``) so tests can prove how a caller batches.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from genlm.backend.llm.base import AsyncLM
from genlm.backend.tokenization import Token

from genlm_bytes_potential.backends.protocol import token_tuple

__all__ = ["MockTokenLM"]


class _Memo(NamedTuple):
    """A context's log-probs and the int64 words its generator's seed is hashed from."""

    row: np.ndarray
    words: np.ndarray


def _as_bytes(b) -> bytes:
    if isinstance(b, Token):
        return b.byte_string
    if isinstance(b, (bytes, bytearray)):
        return bytes(b)
    raise TypeError(f"byte_vocab entries must be bytes, got {type(b).__name__}: {b!r}")


class MockTokenLM(AsyncLM):
    """Deterministic random token LM; a
    :class:`~genlm_bytes_potential.backends.protocol.CachingTokenLM` (``has_logprobs``:
    the distribution is in its memo of the last 4096 contexts).

    Args:
        byte_vocab: the byte string of each token; token id = position. Duplicates
            are allowed (distinct ids with the same bytes).
        seed: changes every distribution.
        temperature: logits are standard normals divided by ``temperature``;
            small values give peaked distributions, large values nearly flat ones.
        bos_token_id, eos_token_id: optional ids, exposed as attributes only (the
            mock gives them ordinary random probability like any other token).

    Attributes:
        byte_vocab: list of ``genlm.backend`` ``Token(token_id, bytes)``.
        str_vocab: utf-8 decodings (``errors="replace"``), for API parity.
        vocab_size: ``len(byte_vocab)``.
        tokenizer: ``None`` (there is none).
        batch_calls: number of batch evaluations; each ``batch_next_token_logprobs[_sync]``
            call counts one, each ``next_token_logprobs[_sync]`` call counts one.
        requests: every context evaluated, in order, as a tuple of ints.

    The async and sync methods return ``torch.float64`` CPU tensors with exactly
    the values of :meth:`logprobs_of`.
    """

    _CACHE_SIZE = 4096

    def __init__(
        self,
        byte_vocab: Sequence[bytes],
        *,
        seed: int = 0,
        temperature: float = 1.0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ):
        # AsyncLM.__init__ would decode a tokenizer; set its state by hand.
        self.tokenizer = None
        self._batch_queue = []
        self._batch_armed = False
        raw = [_as_bytes(b) for b in byte_vocab]
        if not raw:
            raise ValueError("byte_vocab must not be empty")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.byte_vocab = [Token(i, b) for i, b in enumerate(raw)]
        self.str_vocab = [b.decode("utf-8", errors="replace") for b in raw]
        self.vocab_size = len(raw)
        for name, tid in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"{name}={tid} is not a token id in [0, {self.vocab_size})")
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.batch_calls = 0
        self.requests: list[tuple[int, ...]] = []
        self._cache: OrderedDict[tuple[int, ...], _Memo] = OrderedDict()

    def __repr__(self):
        return f"MockTokenLM(V={self.vocab_size}, seed={self.seed}, temperature={self.temperature})"

    # ---- the distribution -------------------------------------------------

    def _check(self, context, checked=()) -> tuple[int, ...]:
        """``context`` as a tuple of token ids in range. A context that keeps the context it
        extends (``lm_state.TokenContext``) has only its last token checked when that one is
        memoized or in ``checked`` (the memo holds checked contexts only)."""
        ctx = token_tuple(context)
        prefix = getattr(ctx, "prefix", None)
        known = prefix is not None and (prefix in self._cache or prefix in checked)
        new = ctx[-1:] if known else ctx
        if new and (min(new) < 0 or max(new) >= self.vocab_size):
            bad = next(t for t in new if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} out of range [0, {self.vocab_size})")
        return ctx

    def _row(self, ctx: tuple[int, ...]) -> np.ndarray:
        """The cached log-probs after the checked context ``ctx`` (not a copy): logits are
        standard normals drawn from a generator seeded by a hash of ``_words(ctx)``."""
        hit = self._cache.get(ctx)
        if hit is None:
            words = self._words(ctx)
            rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(words, digest_size=16).digest(), "little"))
            logits = rng.standard_normal(self.vocab_size) / self.temperature
            m = logits.max()
            hit = self._cache[ctx] = _Memo(logits - (m + np.log(np.exp(logits - m).sum())), words)
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(ctx)
        return hit.row

    def _words(self, ctx: tuple[int, ...]) -> np.ndarray:
        """``[seed, len(ctx), *ctx]`` as int64: from the memoized words of the context ``ctx``
        extends when there are some (an array copy, no work per token in Python)."""
        prefix = getattr(ctx, "prefix", None)
        memo = self._cache.get(prefix) if prefix is not None else None
        if memo is None:
            return np.asarray([self.seed, len(ctx), *ctx], dtype=np.int64)
        words = np.empty(len(memo.words) + 1, np.int64)
        words[:-1] = memo.words
        words[1], words[-1] = len(ctx), ctx[-1]
        return words

    def logprobs_of(self, context: Sequence[int]) -> np.ndarray:
        """Exact float64 next-token log-probabilities after ``context`` (a fresh copy).

        Does not count as a call.
        """
        return self._row(self._check(context)).copy()

    def _batch(self, contexts) -> torch.Tensor:
        checked: set[tuple[int, ...]] = set()  # contexts that keep their hash (TokenContext)
        ctxs = []
        for c in contexts:
            ctxs.append(self._check(c, checked))
            if hasattr(ctxs[-1], "prefix"):  # a plain tuple would be hashed again, whole, for nothing
                checked.add(ctxs[-1])
        self.batch_calls += 1
        self.requests.extend(ctxs)
        if not ctxs:
            return torch.empty((0, self.vocab_size), dtype=torch.float64)
        return torch.from_numpy(np.stack([self._row(c) for c in ctxs]))

    @staticmethod
    def _no_lora(lora_name):
        if lora_name is not None:
            raise ValueError(f"MockTokenLM has no LoRA adapters (got lora_name={lora_name!r})")

    # ---- AsyncLM API ------------------------------------------------------

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        self._no_lora(lora_name)
        return self._batch(token_ids_list)

    def batch_next_token_logprobs_sync(self, token_ids_list, lora_name=None):
        self._no_lora(lora_name)
        return self._batch(token_ids_list)

    async def next_token_logprobs(self, token_ids, lora_name=None):
        self._no_lora(lora_name)
        return self._batch([token_ids])[0]

    def next_token_logprobs_sync(self, token_ids, lora_name=None):
        self._no_lora(lora_name)
        return self._batch([token_ids])[0]

    def has_logprobs(self, token_ids) -> bool:
        """Whether the distribution after ``token_ids`` is cached (a byte beam may
        prefetch into the cache)."""
        return token_tuple(token_ids) in self._cache

    def reset_counters(self):
        """Zero ``batch_calls`` and empty ``requests``."""
        self.batch_calls = 0
        self.requests.clear()

    @property
    def memo_nbytes(self) -> int:
        """Bytes of the memoized log-prob rows and hashed words."""
        return sum(m.row.nbytes + m.words.nbytes for m in self._cache.values())

    def clear_cache(self):
        self._cache.clear()
