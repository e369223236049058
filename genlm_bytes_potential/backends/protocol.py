"""What the byte beam needs from a token-level LM: the :class:`TokenLM` protocol.

:class:`~genlm_bytes_potential.lm_state.TokenModel` turns a token LM into trie masses;
this module states, once, what it reads from the LM. Every backend of this package
(:class:`~genlm_bytes_potential.backends.mock.MockTokenLM`,
:class:`~genlm_bytes_potential.backends.hf.HFTokenLM`,
:class:`~genlm_bytes_potential.backends.paged.PagedTokenLM`,
:class:`~genlm_bytes_potential.backends.vllm.VLLMTokenLM`) conforms to it, and
``tests/test_backend_contract.py`` checks the contract below against each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["TokenLM", "CachingTokenLM", "context_prefix", "token_tuple"]


def token_tuple(token_ids) -> tuple[int, ...]:
    """``token_ids`` as a tuple: a tuple as it is (the byte beam's contexts are tuples that
    keep their hash: ``lm_state.TokenContext``), a list copied, anything else (arrays,
    tensors) copied as Python ints."""
    if isinstance(token_ids, tuple):
        return token_ids
    return tuple(token_ids) if type(token_ids) is list else tuple(map(int, token_ids))


def context_prefix(ctx: tuple[int, ...]) -> tuple[int, ...]:
    """``ctx`` without its last token: the context it was made from when it keeps that
    (``lm_state.TokenContext.prefix``: the same object, its hash kept), else a slice."""
    prefix = getattr(ctx, "prefix", None)
    return ctx[:-1] if prefix is None else prefix


@runtime_checkable
class TokenLM(Protocol):
    """A token-level language model over the vocabulary ``0 .. V-1``, ``V = len(byte_vocab)``.

    The one computation: for token contexts ``x^(1), ..., x^(B)`` (each a sequence of token
    ids in ``[0, V)``),

        ``batch_next_token_logprobs([x^(1), ..., x^(B)])[b, t] = log p(t | x^(b))``,

    a ``[B, V]`` tensor whose rows are normalized distributions over the vocabulary:
    ``logsumexp(row) = 0`` up to the rounding of its floating dtype; a token the model
    cannot produce (e.g. past the rows of its output layer) has ``-inf``.

    Contract (``tests/test_backend_contract.py`` checks it for every backend):

    * **Shape and type.** ``[B, V]``, floating (float32 from models, float64 from the mock),
      on any device (the caller moves it); ``B = 0`` gives ``[0, V]``.
    * **A function of the context alone.** A context's row does not depend on the rest of
      the call: the same context alone, in a larger batch, in another order, twice in one
      batch, asked again later, or from concurrent calls of several asyncio tasks, gives
      the same row, equal to the rounding of its dtype (different batch shapes may round
      differently); duplicates within one call, and rows served from a cache, are exactly
      equal to the row first computed.
    * **Bad input.** A token id outside ``[0, V)`` raises ``ValueError`` naming that id,
      before any work, and the LM stays usable; so does a context longer than the LM's
      context limit (below). Model backends need at least one token per context
      (``ValueError`` for an empty one); the mock answers the empty context.
    * **Concurrency.** Calls from several asyncio tasks may be in flight at once (and may
      be evaluated together); the event loop is not blocked by a forward pass.

    Attributes every backend declares (``TokenModel`` reads all but ``byte_vocab`` with
    ``getattr``, so an ``AsyncLM`` that lacks them still works, with these defaults):

    * ``byte_vocab``: the byte string of every token id (``bytes`` or genlm-backend
      ``Token``; ``bytes(byte_vocab[t])``). Required.
    * ``eos_token_id`` / ``bos_token_id``: ``int`` or ``None`` (default: the tokenizer's).
      The trie's EOS is ``byte_vocab[eos_token_id]``; contexts start with BOS, else EOS.
    * ``tokenizer``: a Hugging Face tokenizer or ``None``; needed only for
      ``canonical=True`` (``encode``, ``all_special_ids``) and chat templates in the CLI.
    * ``clear_cache()``: forget every cached context (values unchanged afterwards).

    Optional, read by ``TokenModel`` when present:

    * the context limit (:func:`~genlm_bytes_potential.lm_state.lm_context_limit`): the
      most tokens a context may have, as ``max_context_length``, or vLLM's
      ``max_model_len`` (contexts of at most ``max_model_len - 1`` tokens), or a Hugging
      Face ``model.config.max_position_embeddings``; ``TokenModel`` never sends longer
      contexts (it truncates them, see its docstring).
    * ``has_logprobs(token_ids) -> bool``: see :class:`CachingTokenLM`.
    """

    byte_vocab: Sequence[Any]
    tokenizer: Any
    eos_token_id: int | None
    bos_token_id: int | None

    async def batch_next_token_logprobs(self, token_ids_list: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(token_ids_list), V]`` next-token log-probabilities (see the class)."""
        ...

    def clear_cache(self) -> None:
        """Forget every cached context."""
        ...


@runtime_checkable
class CachingTokenLM(TokenLM, Protocol):
    """A :class:`TokenLM` that caches next-token log-probs and says which it holds.

    ``has_logprobs(x)`` is True exactly when a call asking for context ``x`` would be
    answered from the cache, without a forward pass, with the row computed before
    (exactly equal). A context asked for is cached right after the call (until evicted
    or ``clear_cache``). ``TokenModel`` uses it to prefetch: when the bytes ahead are
    known, one call also asks for the uncached contexts later steps will need.
    """

    def has_logprobs(self, token_ids: Sequence[int]) -> bool:
        """Whether the log-probs after ``token_ids`` are cached."""
        ...
