"""Token contexts and batched calls to a token-level LM.

An :class:`LMState` is an immutable token context. :class:`TokenModel` wraps any object
with genlm-backend's ``AsyncLM`` interface (``byte_vocab`` and
``batch_next_token_logprobs``) and turns a list of states into their trie log-masses with
exactly one LM batch call and one trie batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import numpy as np
import torch

from .transfer import to_device, to_host
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


def lm_context_limit(lm: Any) -> int | None:
    """The most tokens ``lm`` can take as a context, when it says: its own
    ``max_context_length``, vLLM's ``max_model_len`` (minus the position of the next
    token), or a Hugging Face model's ``config.max_position_embeddings``."""
    value = getattr(lm, "max_context_length", None)
    if value is None and getattr(lm, "max_model_len", None) is not None:
        value = int(lm.max_model_len) - 1
    if value is None:
        config = getattr(getattr(lm, "model", None), "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        return None
    return int(value)


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
        max_context_length: the most tokens the LM sees (states keep their full
            context). The LM's own limit (see :func:`lm_context_limit`) caps it, so a
            context or prompt longer than the model's window never reaches the model.
            Truncation rule: a context longer than the window is cut to its first token,
            when that is the start token (BOS, or EOS used as document start; see
            ``initial_state``), followed by its most recent tokens, ``window`` tokens in
            all (a window of 1 keeps only the last token).
        device: where trie masses are computed (``"cpu"``, ``"cuda"``); default: where
            the LM returns its log-probs.
        canonical: keep only canonical tokenizations (as in Phan et al. 2024 and
            ByteSampler): a token is committed only if the tokenizer's own encoding of
            the bytes of the last ``canonical_window`` committed tokens (the window
            stops at special tokens such as BOS) is exactly those tokens. Needs
            ``lm.tokenizer`` (a Hugging Face tokenizer). With the default window of 2 this
            is the bigram test, which decides canonicity for plain BPE merges (Vieira et
            al. 2025); pretokenizer context wider than the window is not seen, and windows
            whose bytes are not valid UTF-8 (a character split across tokens) cannot be
            encoded and are accepted unchecked. Mass of tokens still being read is not
            filtered, only commits are; healed tokens are not checked.
        canonical_window: tokens checked per commit (>= 1).
        lookahead: when the bytes ahead are known (scoring, prefill, a potential's
            context), a batch that has to call the LM also asks for the contexts the next
            ``lookahead`` bytes may need (see ``beam.advance``), so that later steps find
            them in the LM's cache: fewer, larger LM calls, same values. Only for LMs that
            cache log-probs and say so (``lm.has_logprobs(token_ids) -> bool``); 0: off.
        max_prefetch: most contexts one LM call asks for, when it prefetches.
    """

    lm: Any
    eos_tokens: list[bytes] | None = None
    max_context_length: int | None = None
    device: str | None = None
    canonical: bool = False
    canonical_window: int = 2
    lookahead: int = 6
    max_prefetch: int = 128
    trie: TokenByteTrie = field(init=False)
    stats: LMStats = field(init=False, default_factory=LMStats)

    def __post_init__(self):
        m = self.max_context_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, Integral) or m < 1):
            raise ValueError(f"max_context_length={m!r}; expected a positive int or None")
        limit = lm_context_limit(self.lm)
        #: tokens the LM sees at most: ``max_context_length`` capped by the LM's own limit
        self.window = min((x for x in (m, limit) if x is not None), default=None)
        vocab = [bytes(t) for t in self.lm.byte_vocab]
        self.bos_token_id = _special_id(self.lm, "bos_token_id")
        self.eos_token_id = _special_id(self.lm, "eos_token_id")
        self.start_token_id = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        if self.eos_tokens is None:
            self.eos_tokens = [vocab[self.eos_token_id]] if self.eos_token_id is not None else []
        self.trie = TokenByteTrie(vocab, self.eos_tokens)
        self._vocab = vocab
        self.lookahead = self._resolve_lookahead()
        self._ready: dict[tuple[tuple[int, ...], bool], torch.Tensor] = {}  # prefetched device masses
        self._ready_calls: deque[list] = deque()
        if self.canonical:
            w = self.canonical_window
            if isinstance(w, bool) or not isinstance(w, Integral) or w < 1:
                raise ValueError(f"canonical_window={w!r}; expected an int >= 1")
            tok = getattr(self.lm, "tokenizer", None)
            if tok is None or not hasattr(tok, "encode"):
                raise ValueError(
                    f"canonical=True needs the LM's tokenizer (lm.tokenizer with .encode); "
                    f"{type(self.lm).__name__} has {'none' if tok is None else type(tok).__name__}"
                )
            self._tokenizer = tok
            self._special = frozenset(int(t) for t in getattr(tok, "all_special_ids", ()) or ())
            self._canonical_memo: dict[tuple[int, ...], bool] = {}

    def _resolve_lookahead(self) -> int:
        for name in ("lookahead", "max_prefetch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 0:
                raise ValueError(f"{name}={v!r}; expected an int >= 0")
        return int(self.lookahead) if callable(getattr(self.lm, "has_logprobs", None)) else 0

    def would_call(self, states: list[LMState]) -> bool:
        """Whether ``masses(states)`` may need an LM forward pass: the (caching) LM lacks
        some context's log-probs. Always True without lookahead."""
        return not self.lookahead or not all(self._cached(s) for s in states)

    def _cached(self, state: LMState) -> bool:
        """Whether the (caching) LM holds ``state``'s log-probs."""
        tokens, n = state.tokens, self.window
        return self.lm.has_logprobs(tokens if n is None or len(tokens) <= n else self.model_input(state))

    def is_canonical(self, tokens: tuple[int, ...]) -> bool:
        """Whether the last committed token of ``tokens`` passes the canonicity check
        (see ``canonical``): the tokenizer re-encodes the trailing window to itself. A
        window starting inside a UTF-8 character widens left to the character's start
        (at most 3 tokens); one ending inside a character is left to the next commit."""
        tail: list[int] = []
        for t in reversed(tokens):
            if t in self._special or len(tail) == self.canonical_window + 3:
                break
            tail.append(t)
        tail.reverse()
        key = tuple(tail)
        hit = self._canonical_memo.get(key)
        if hit is None:
            hit = self._check_window(key)
            if len(self._canonical_memo) >= 1 << 20:
                self._canonical_memo.clear()
            self._canonical_memo[key] = hit
        return hit

    def _check_window(self, tail: tuple[int, ...]) -> bool:
        n = min(self.canonical_window, len(tail))
        while 0 < n <= len(tail):
            window = tail[len(tail) - n :]
            data = b"".join(self._vocab[t] for t in window)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and e.end >= len(data):
                    return True  # ends inside a character: checked at the next commit
                n += 1  # starts inside a character (or invalid bytes): widen left
                continue
            return list(self._tokenizer.encode(text, add_special_tokens=False)) == list(window)
        return True  # no encodable window: unchecked

    def initial_state(self, prompt_tokens: list[int] | tuple[int, ...] = ()) -> LMState:
        """The context a byte string starts from: ``prompt_tokens``, after BOS when the
        tokenizer has one. A tokenizer without BOS starts from its EOS token (the usual
        document separator, e.g. GPT-2, Qwen) and, lacking both, from the bare prompt."""
        prompt = tuple(int(t) for t in prompt_tokens)
        for t in prompt:
            if not 0 <= t < self.trie.vocab_size:
                raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {self.trie.vocab_size})")
        start = self.start_token_id
        if start is not None and (not prompt or prompt[0] != start):
            prompt = (start,) + prompt
        return LMState(prompt)

    def model_input(self, state: LMState) -> list[int]:
        """The tokens the LM sees for ``state`` (see the truncation rule above)."""
        tokens, n = state.tokens, self.window
        if n is not None and len(tokens) > n:
            if n >= 2 and self.start_token_id is not None and tokens[0] == self.start_token_id:
                return [tokens[0], *tokens[len(tokens) - n + 1 :]]
            return list(tokens[-n:])
        return list(tokens)

    async def masses(self, states: list[LMState], with_eos: bool, prefetch: list[LMState] = (),
                     nodes: np.ndarray | None = None) -> np.ndarray:
        """Scaled trie masses (see ``TokenByteTrie.masses``) of the states' next-token
        distributions, ``[len(states), n_nodes]``: one LM batch call over the distinct
        contexts and one trie batch. Within a row, mass ratios are exact. ``nodes``
        (sorted, with the root): return only these columns, ``[len(states), len(nodes)]``
        (from a GPU, only they are copied).

        ``prefetch``: contexts asked for in the same LM call, for the LM's cache (see
        ``lookahead``). When masses are computed on a GPU, theirs are computed in the same
        trie batch and kept on the device (the last ``_READY_BATCHES`` calls' worth), so a
        later call for prefetched contexts only gathers and copies rows, without the LM."""
        distinct: dict[tuple[int, ...], int] = {}
        rows = np.array([distinct.setdefault(s.tokens, len(distinct)) for s in states], np.int64)
        n = len(distinct)
        asked = list(distinct)
        root = self.trie.root if nodes is None else int(np.searchsorted(nodes, self.trie.root))
        if self._ready and all((t, with_eos) in self._ready for t in asked):
            scaled = torch.stack([self._ready.pop((t, with_eos)) for t in asked])
            scaled = to_host(scaled if nodes is None else scaled[:, to_device(nodes, scaled.device)])
            self._check_finite(scaled[:, root], asked)
            return scaled if n == len(states) else scaled[rows]
        for s in prefetch if self.lookahead else ():
            if s.tokens not in distinct and not self._cached(s):
                distinct[s.tokens] = len(distinct)
        inputs = [self.model_input(LMState(t)) for t in distinct]
        try:
            logprobs = await self.lm.batch_next_token_logprobs(inputs)
        except Exception as e:  # not CancelledError: cancellation passes through as is
            raise RuntimeError(
                f"LM call failed: {type(self.lm).__name__}.batch_next_token_logprobs on "
                f"{len(inputs)} token contexts ({self._describe(inputs[0])}): {type(e).__name__}: {e}"
            ) from e
        self.stats.batch_calls += 1
        self.stats.contexts += len(inputs)
        if not torch.is_tensor(logprobs):
            logprobs = torch.as_tensor(np.asarray(logprobs))
        self._check_shape(logprobs, inputs)
        if self.device is not None:
            logprobs = logprobs.to(self.device)
        on_device = logprobs.device.type != "cpu"
        scaled, _ = self.trie.masses(logprobs if on_device else logprobs[:n], with_eos=with_eos)
        if on_device:
            if len(distinct) > n:
                self._keep_ready(list(distinct)[n:], with_eos, scaled[n:])
            scaled = to_host(scaled[:n] if nodes is None else scaled[:n, to_device(nodes, scaled.device)])
        elif nodes is not None:
            scaled = scaled[:, nodes]
        self._check_finite(scaled[:, root], asked)
        return scaled if n == len(states) else scaled[rows]

    def _keep_ready(self, contexts: list[tuple[int, ...]], with_eos: bool, scaled: torch.Tensor) -> None:
        """Keep device mass rows of prefetched contexts; forget the oldest call's rows."""
        keys = [(t, with_eos) for t in contexts]
        self._ready.update(zip(keys, scaled))
        self._ready_calls.append(keys)
        while len(self._ready_calls) > _READY_BATCHES:
            for k in self._ready_calls.popleft():
                self._ready.pop(k, None)

    def _describe(self, tokens: list[int]) -> str:
        tail = tokens[-8:]
        vocab = self.lm.byte_vocab
        text = b"".join(bytes(vocab[t]) for t in tail if 0 <= t < len(vocab))
        return f"first context: {len(tokens)} tokens, ending {tail} = {text!r}"

    def _check_shape(self, logprobs: torch.Tensor, inputs: list[list[int]]) -> None:
        """The LM's answer must be ``[len(inputs), V]``."""
        want = (len(inputs), self.trie.vocab_size)
        if tuple(logprobs.shape) != want:
            raise RuntimeError(
                f"{type(self.lm).__name__}.batch_next_token_logprobs returned shape "
                f"{tuple(logprobs.shape)} for {len(inputs)} contexts; expected {list(want)} "
                f"(one row per context, one column per token of byte_vocab)"
            )

    def _check_finite(self, root_mass: np.ndarray, contexts: list[tuple[int, ...]]) -> None:
        """A NaN or +inf log-prob anywhere in a row makes its root mass NaN (the trie sums
        every token into the root), so checking one number per row checks them all."""
        bad = np.nonzero(~np.isfinite(root_mass))[0]
        if len(bad):
            row = int(bad[0])
            raise RuntimeError(
                f"{type(self.lm).__name__}.batch_next_token_logprobs returned NaN or +inf "
                f"log-probabilities for context {row} of {len(contexts)} "
                f"({self._describe(self.model_input(LMState(contexts[row]))).removeprefix('first context: ')})"
            )


#: LM calls whose prefetched device mass rows are kept (each up to ``max_prefetch`` rows)
_READY_BATCHES = 4
