"""Byte tokens: the vocabulary of :class:`~genlm_bytes_potential.ByteBeamPotential`, and
products of byte potentials with genlm-control's byte grammars.

A byte potential's tokens are the 256 one-byte ``bytes`` (``b"a"``), as for genlm-control's
``ByteLLM``, so sampled sequences read with ``Sequences.decoded_posterior``. genlm-control's
byte grammars (``BoolFSA``, ``BoolCFG``, ``JsonSchema``) use ints ``0..255`` instead, and a
regex's automaton only the bytes its pattern mentions. :class:`ByteTokenView` presents such a
potential over the same bytes as the other token type, weights unchanged:

    prefix_view(x) = prefix(f(x)),  complete_view(x) = complete(f(x)),
    logw_next_view(x) = logw_next(f(x))          (same columns, tokens retyped)

with ``f`` the token conversion. :class:`ByteProduct` is genlm-control's ``Product``
(vocabulary: the bytes both sides have), without its warning that a grammar's few bytes are
"less than 10%" of the 256: an alphabet is meant to be small, and narrow rows are cheaper to
sample from.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
from genlm.control.constant import EndOfSequence
from genlm.control.potential.autobatch import AutoBatchedPotential
from genlm.control.potential.base import Potential
from genlm.control.potential.product import Product
from genlm.control.typing import Atomic


class _ByteLookup(dict):
    """Token -> column for byte tokens and EOS, also answering for the ints 0..255 (the
    column of their byte token) without holding them, so ``len`` and iteration see the
    vocabulary only: weights read by int (``w[97] == w[b"a"]``) as well as by token."""

    def __missing__(self, key):
        if isinstance(key, Integral) and not isinstance(key, bool) and 0 <= key <= 255:
            return dict.__getitem__(self, BYTE_TOKENS[key])
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        is_byte = isinstance(key, Integral) and not isinstance(key, bool) and 0 <= key <= 255
        return is_byte and dict.__contains__(self, BYTE_TOKENS[key])


def _alias_ints(potential: Potential) -> None:
    """Let ``potential``'s lookup (its tokens: one-byte ``bytes``) take ints too."""
    if not isinstance(potential.lookup, _ByteLookup):
        potential.lookup = _ByteLookup(potential.lookup)


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
        if set(map(type, context)) == {int}:  # ints (no bools), their range checked at C speed
            try:
                return list(bytes(context))
            except ValueError:
                pass
    return [x if isinstance(x, EndOfSequence) or byte_value(x) is None else byte_value(x) for x in context]


def _same(context):
    return context


class _Distinct:
    """A batch of contexts with each distinct one once (``contexts``, in order of first
    appearance), for a potential whose batch answer is a function of each context alone:
    ``spread`` turns the answer for ``contexts`` into the batch's (row ``i`` of the batch is
    the row of its context). After SMC resampling many particles hold the same context
    (22-31% of the contexts a regex SMC with SmolLM2 passes its grammar, at 32 and 128
    particles)."""

    __slots__ = ("contexts", "index")

    def __init__(self, batch: list):
        first: dict = {}
        try:
            index = [first.setdefault(tuple(c), len(first)) for c in batch]
        except TypeError:  # an unhashable token: every context counts as distinct
            index = None
        if index is None or len(first) == len(batch):
            self.contexts, self.index = batch, None
        else:  # positions are given in order of first appearance
            self.contexts, self.index = [], np.array(index)
            for c, j in zip(batch, index):
                if j == len(self.contexts):
                    self.contexts.append(c)

    def spread(self, answer):
        """``answer`` (one row or value per distinct context) for the whole batch."""
        return answer if self.index is None else np.asarray(answer)[self.index]


class ByteTokenView(Potential):
    """``inner``, a potential over byte values (ints or one-byte ``bytes``, any subset of
    the 256), over the same bytes as ``bytes`` tokens (``token=bytes``) or ints
    (``token=int``); see the module docstring. ``to_inner`` converts a context to the
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
        if values == list(range(256)):
            tables = BYTE_TABLES if token is bytes else INT_TABLES
            super().__init__(tables.vocab_eos[:-1], tables=tables)
        else:
            super().__init__([BYTE_TOKENS[v] for v in values] if token is bytes else values)
            if token is bytes:
                _alias_ints(self)

    async def prefix(self, context) -> float:
        return await self.inner.prefix(self.to_inner(context))

    async def complete(self, context) -> float:
        return await self.inner.complete(self.to_inner(context))

    async def logw_next(self, context):
        return self.make_lazy_weights((await self.inner.logw_next(self.to_inner(context))).weights)

    async def batch_prefix(self, contexts):
        distinct = _Distinct([self.to_inner(c) for c in contexts])
        return distinct.spread(await self.inner.batch_prefix(distinct.contexts))

    async def batch_complete(self, contexts):
        distinct = _Distinct([self.to_inner(c) for c in contexts])
        return distinct.spread(await self.inner.batch_complete(distinct.contexts))

    async def batch_logw_next(self, contexts):
        distinct = _Distinct([self.to_inner(c) for c in contexts])
        return self.make_lazy_weights(distinct.spread((await self.inner.batch_logw_next(distinct.contexts)).weights))

    def is_terminal_only(self) -> bool:
        return self.inner.is_terminal_only()

    def spawn(self) -> ByteTokenView:
        return ByteTokenView(self.inner.spawn(), self.token, self.to_inner)

    async def cleanup(self) -> None:
        await self.inner.cleanup()

    def __repr__(self) -> str:
        return f"ByteTokenView({self.inner!r}, token={self.token.__name__})"


def as_byte_tokens(potential: Potential) -> Potential:
    """``potential``, over byte values, with one-byte ``bytes`` tokens: itself if it has
    them already, else a :class:`ByteTokenView` (genlm-control's grammars over ints).
    Raises ``ValueError`` naming a token that is not a byte."""
    if potential.token_type == Atomic(bytes) and all(byte_value(t) is not None for t in potential.vocab):
        return potential
    return ByteTokenView(potential, bytes)


def _is_byte_potential(potential) -> bool:
    return isinstance(potential, Potential) and all(byte_value(t) is not None for t in potential.vocab)


class ByteProduct(Product):
    """genlm-control's ``Product`` of a potential over byte tokens with a potential over
    (some of the) bytes, without the small-overlap warning (see the module docstring);
    its ``*`` takes byte grammars over ints too, so products chain:
    ``potential * JsonSchema(s) * BoolFSA...``."""

    def __init__(self, p1, p2):
        super().__init__(p1, p2)
        _alias_ints(self)
        autobatch_as_bytes(self)

    def _check_vocab_overlap(self, common_vocab, p1, p2, threshold=0.1):
        if not (_is_byte_potential(p1) and _is_byte_potential(p2)):
            super()._check_vocab_overlap(common_vocab, p1, p2, threshold)

    def __mul__(self, other):
        return byte_product(self, other)

    def spawn(self, p1_opts=None, p2_opts=None):
        return ByteProduct(self.p1.spawn(**(p1_opts or {})), self.p2.spawn(**(p2_opts or {})))


def byte_product(left: Potential, right) -> Product:
    """``left * right`` for ``left`` over byte tokens: ``right`` over byte values of either
    type goes through :func:`as_byte_tokens` into a :class:`ByteProduct`; anything else is
    genlm-control's product (whose errors say what does not match)."""
    if _is_byte_potential(right):
        return ByteProduct(left, as_byte_tokens(right))
    return Product(left, right)


class _ByteAutoBatched(AutoBatchedPotential):
    """genlm-control's autobatched wrapper of a potential over byte tokens. Samplers
    multiply their autobatched operands (``AWRS``: potential * condition) and then call the
    operands themselves, so ``*`` here takes byte tokens only, into a :class:`ByteProduct`
    (no overlap warning), and names :func:`as_byte_tokens` for a grammar over ints."""

    def __mul__(self, other):
        if _is_byte_potential(other) and other.token_type != Atomic(bytes):
            raise TypeError(
                f"{other!r} reads ints; a sampler that calls it next to a byte potential "
                f"(AWRS's condition, a critic) needs it over byte tokens: as_byte_tokens(it)"
            )
        return byte_product(self, other)


def autobatch_as_bytes(potential: Potential) -> None:
    """Give ``potential`` the autobatched wrapper above: genlm-control's ``autobatched``
    returns the wrapper memoized in the instance's ``_autobatched`` (without it, or if that
    memo changes, ``AWRS`` works the same and only warns about the small overlap)."""
    potential._autobatched = _ByteAutoBatched(potential)
