"""Token contexts and batched calls to a token-level LM.

An :class:`LMState` is an immutable token context. :class:`TokenModel` wraps any object
with genlm-backend's ``AsyncLM`` interface (``byte_vocab`` and
``batch_next_token_logprobs``) and turns a list of states into their trie log-masses with
exactly one LM batch call and one trie batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .trie import TokenByteTrie


@dataclass(frozen=True, slots=True)
class LMState:
    """A token context. Extending returns a new state; nothing is shared or mutated."""

    tokens: tuple[int, ...]

    def extend(self, token: int) -> "LMState":
        return LMState(self.tokens + (int(token),))


@dataclass
class LMStats:
    """Counters of the work a model did: batch calls and contexts evaluated."""

    batch_calls: int = 0
    contexts: int = 0


def _special_id(lm: Any, name: str) -> int | None:
    value = getattr(lm, name, None)
    if value is None and getattr(lm, "tokenizer", None) is not None:
        value = getattr(lm.tokenizer, name, None)
    return None if value is None else int(value)


@dataclass
class TokenModel:
    """A token LM, its trie, and how contexts are presented to it.

    Args:
        lm: an ``AsyncLM``-like object (``byte_vocab``, ``batch_next_token_logprobs``).
        eos_tokens: byte strings that mean end-of-sequence. ``None`` takes the LM's EOS
            token (``eos_token_id`` of the LM or its tokenizer) when there is one.
        max_context_length: when set, the LM sees at most the last this many tokens of a
            context (states keep their full context).
        device: where trie masses are computed (``"cpu"``, ``"cuda"``); default: where
            the LM returns its log-probs.
    """

    lm: Any
    eos_tokens: list[bytes] | None = None
    max_context_length: int | None = None
    device: str | None = None
    trie: TokenByteTrie = field(init=False)
    stats: LMStats = field(init=False, default_factory=LMStats)

    def __post_init__(self):
        if self.max_context_length is not None and (
            not isinstance(self.max_context_length, int) or self.max_context_length < 1
        ):
            raise ValueError(
                f"max_context_length={self.max_context_length!r}; expected a positive int or None"
            )
        vocab = [bytes(t) for t in self.lm.byte_vocab]
        self.bos_token_id = _special_id(self.lm, "bos_token_id")
        self.eos_token_id = _special_id(self.lm, "eos_token_id")
        if self.eos_tokens is None:
            self.eos_tokens = [vocab[self.eos_token_id]] if self.eos_token_id is not None else []
        self.trie = TokenByteTrie(vocab, self.eos_tokens)

    def initial_state(self, prompt_tokens: list[int] | tuple[int, ...] = ()) -> LMState:
        """The context a byte string starts from: ``prompt_tokens``, after BOS when the
        tokenizer has one. A tokenizer without BOS starts from its EOS token (the usual
        document separator, e.g. GPT-2, Qwen) and, lacking both, from the bare prompt."""
        prompt = tuple(int(t) for t in prompt_tokens)
        for t in prompt:
            if not 0 <= t < self.trie.vocab_size:
                raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {self.trie.vocab_size})")
        start = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        if start is not None and (not prompt or prompt[0] != start):
            prompt = (start,) + prompt
        return LMState(prompt)

    def model_input(self, state: LMState) -> list[int]:
        tokens = state.tokens
        if self.max_context_length is not None and len(tokens) > self.max_context_length:
            tokens = tokens[-self.max_context_length :]
        return list(tokens)

    async def masses(self, states: list[LMState], with_eos: bool) -> np.ndarray:
        """Scaled trie masses (see ``TokenByteTrie.masses``) of the states' next-token
        distributions, ``[len(states), n_nodes]``: one LM batch call over the distinct
        contexts and one trie batch. Within a row, mass ratios are exact."""
        distinct: dict[tuple[int, ...], int] = {}
        rows = np.array([distinct.setdefault(s.tokens, len(distinct)) for s in states], np.int64)
        inputs = [self.model_input(LMState(t)) for t in distinct]
        logprobs = await self.lm.batch_next_token_logprobs(inputs)
        self.stats.batch_calls += 1
        self.stats.contexts += len(inputs)
        if not torch.is_tensor(logprobs):
            logprobs = torch.as_tensor(np.asarray(logprobs))
        if self.device is not None:
            logprobs = logprobs.to(self.device)
        scaled, _ = self.trie.masses(logprobs, with_eos=with_eos)
        scaled = scaled.cpu().numpy() if torch.is_tensor(scaled) else scaled
        return scaled if len(distinct) == len(states) else scaled[rows]
