"""Byte tokens: the vocabulary of :class:`~genlm_bytes_potential.ByteBeamPotential`, and
views that let potentials over byte values of either type meet in one product.

A byte potential's tokens are the 256 one-byte ``bytes`` (``b"a"``), as for genlm-control's
``ByteLLM``, so sampled sequences read with ``Sequences.decoded_posterior``. genlm-control's
byte grammars (``BoolFSA``, ``BoolCFG``, ``JsonSchema``) use ints ``0..255`` instead, often
only the bytes their pattern mentions. :class:`ByteTokenView` presents such a potential over
all 256 bytes of one type:

    prefix_view(x)     = prefix(f(x)),   complete_view(x) = complete(f(x))
    logw_next_view(x)_b = logw_next(f(x))_b  for b in the wrapped vocabulary, -inf otherwise

with ``f`` the token conversion, so a product with it is genlm-control's plain ``Product``
over identical vocabularies (no index gathers, no "common vocabulary" warning). The weights
are the wrapped potential's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
import torch
from genlm.control.constant import EndOfSequence
from genlm.control.potential.base import Potential
from genlm.control.potential.product import Product
from genlm.control.typing import Atomic

class _ByteLookup(dict):
    """Token -> column for the byte tokens and EOS, also answering for the ints 0..255 (the
    byte's own column) without holding them, so ``len`` and iteration see the vocabulary
    only: weights read by int (``w[97] == w[b"a"]``) as well as by token."""

    def __missing__(self, key):
        if isinstance(key, Integral) and not isinstance(key, bool) and 0 <= key <= 255:
            return int(key)
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or (
            isinstance(key, Integral) and not isinstance(key, bool) and 0 <= key <= 255
        )


#: the vocabulary of a byte potential: ``BYTE_TOKENS[i] == bytes([i])``
BYTE_TOKENS: list[bytes] = [bytes([i]) for i in range(256)]
BYTE_TABLES = Potential.build_tables(BYTE_TOKENS)
BYTE_TABLES = BYTE_TABLES._replace(lookup=_ByteLookup(BYTE_TABLES.lookup))
INT_TABLES = Potential.build_tables(list(range(256)))


def byte_value(token) -> int | None:
    """The byte value of a token (an int 0..255 or a one-byte ``bytes``), else ``None``."""
    if isinstance(token, (bytes, bytearray)) and len(token) == 1:
        return token[0]
    if isinstance(token, Integral) and not isinstance(token, bool) and 0 <= token <= 255:
        return int(token)
    return None


def byte_ints(context) -> list:
    """A context of byte tokens (one-byte ``bytes`` or ints, an EOS allowed) as ints."""
    try:
        data = b"".join(context)  # the usual case, at C speed
        if len(data) == len(context) and (not data or min(map(len, context)) == 1):
            return list(data)
    except TypeError:
        pass
    return [x if isinstance(x, EndOfSequence) or byte_value(x) is None else byte_value(x) for x in context]


def _same(context):
    return context


class ByteTokenView(Potential):
    """``inner``, a potential over byte values (ints or one-byte ``bytes``, any subset of
    the 256), as a potential over all 256 bytes as ``bytes`` tokens (``token=bytes``) or
    ints (``token=int``); see the module docstring. ``to_inner`` converts a context to the
    tokens ``inner`` reads (default: ints if ``inner``'s tokens are ints, else unchanged)."""

    def __init__(self, inner: Potential, token: type = bytes, to_inner: Callable | None = None):
        if token not in (bytes, int):
            raise ValueError(f"token={token!r}; expected bytes or int")
        values = [byte_value(t) for t in inner.vocab]
        bad = next((t for t, v in zip(inner.vocab, values) if v is None), None)
        if bad is not None:
            raise ValueError(
                f"{inner!r} has token {bad!r}, not a byte; a byte token view needs a potential "
                f"over ints 0..255 or one-byte bytes"
            )
        self.inner = inner
        self.token = token
        if to_inner is None:
            to_inner = byte_ints if inner.token_type == Atomic(int) else _same
        self.to_inner = to_inner
        cols = np.array(values + [256], dtype=np.int64)
        #: where each of ``inner.vocab_eos``'s columns goes (``None``: the same place)
        self.columns = None if np.array_equal(cols, np.arange(257)) else cols
        tables = BYTE_TABLES if token is bytes else INT_TABLES
        super().__init__(tables.vocab_eos[:-1], tables=tables)

    def _spread(self, weights):
        """``[..., len(inner.vocab_eos)]`` weights as ``[..., 257]`` (-inf for other bytes)."""
        if self.columns is None:
            return weights
        shape = (*weights.shape[:-1], 257)
        if torch.is_tensor(weights):
            out = weights.new_full(shape, float("-inf"))
            out[..., torch.as_tensor(self.columns, device=weights.device)] = weights
        else:
            out = np.full(shape, -np.inf, dtype=np.result_type(weights.dtype, np.float64))
            out[..., self.columns] = weights
        return out

    async def prefix(self, context) -> float:
        return await self.inner.prefix(self.to_inner(context))

    async def complete(self, context) -> float:
        return await self.inner.complete(self.to_inner(context))

    async def logw_next(self, context):
        return self.make_lazy_weights(self._spread((await self.inner.logw_next(self.to_inner(context))).weights))

    async def batch_prefix(self, contexts):
        return await self.inner.batch_prefix([self.to_inner(c) for c in contexts])

    async def batch_complete(self, contexts):
        return await self.inner.batch_complete([self.to_inner(c) for c in contexts])

    async def batch_logw_next(self, contexts):
        w = await self.inner.batch_logw_next([self.to_inner(c) for c in contexts])
        return self.make_lazy_weights(self._spread(w.weights))

    def is_terminal_only(self) -> bool:
        return self.inner.is_terminal_only()

    def spawn(self) -> "ByteTokenView":
        return ByteTokenView(self.inner.spawn(), self.token, self.to_inner)

    async def cleanup(self) -> None:
        await self.inner.cleanup()

    def __repr__(self) -> str:
        return f"ByteTokenView({self.inner!r}, token={self.token.__name__})"


def as_byte_tokens(potential: Potential) -> Potential:
    """``potential`` over the 256 one-byte ``bytes`` tokens of a byte potential: returned
    as it is when it already has exactly that vocabulary, else a :class:`ByteTokenView`
    (for genlm-control's grammars over ints, or over a subset of the bytes). Raises
    ``ValueError`` naming a token that is not a byte."""
    if potential.vocab == BYTE_TOKENS and potential.token_type == Atomic(bytes):
        return potential
    return ByteTokenView(potential, bytes)


def _is_byte_potential(potential) -> bool:
    return isinstance(potential, Potential) and all(byte_value(t) is not None for t in potential.vocab)


class ByteProduct(Product):
    """genlm-control's ``Product`` of potentials over byte tokens whose ``*`` also takes
    potentials over byte values as ints (``BoolFSA``, ``BoolCFG``, ``JsonSchema``), through
    :func:`as_byte_tokens`, so products chain: ``potential * JsonSchema(s) * BoolFSA...``."""

    def __mul__(self, other):
        return byte_product(self, other)

    def spawn(self, p1_opts=None, p2_opts=None):
        return ByteProduct(self.p1.spawn(**(p1_opts or {})), self.p2.spawn(**(p2_opts or {})))


def byte_product(left: Potential, right) -> Product:
    """``left * right`` for ``left`` over byte tokens: ``right`` over byte values of either
    type goes through :func:`as_byte_tokens`; anything else is genlm-control's product
    (whose errors say what does not match)."""
    if _is_byte_potential(right):
        right = as_byte_tokens(right)
        return ByteProduct(left, right)
    return Product(left, right)
