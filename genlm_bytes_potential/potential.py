"""``ByteBeamPotential``: the byte beam as a genlm-control ``Potential`` over bytes.

The vocabulary is the 256 byte values as ints (genlm-control's ``BoolFSA``, ``BoolCFG`` and
``JsonSchema`` use the same), so ``potential * grammar`` is a plain product. For a context
``x = x_1..x_n`` (ints) with beam distribution ``q`` (see :mod:`.beam`):

    prefix(x)      = sum_i log q(x_i | x_<i)          (prefix([]) = 0)
    complete(x)    = prefix(x) + log q(EOS | x)
    logw_next(x)_a = log q(a | x)                     (a = 0..255, EOS)

so ``logw_next(x)_a == prefix(x·a) - prefix(x)`` holds to the last bit (both come from the
same beam step) and each ``logw_next`` row sums to 1. A context the beam gives probability 0
has weight -inf and a ``logw_next`` of all -inf; nothing raises. Healing is used only while
reading the prompt: inside contexts it would step outside the normalized distribution.

Beams are cached in a prefix tree keyed by context bytes, so particles sharing a prefix share
beam states; batch methods advance all missing beams together, one LM batch call and one
trie batch per byte step.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from numbers import Integral
from typing import Any

import numpy as np
from genlm.control.constant import EndOfSequence
from genlm.control.potential.base import Potential

from .beam import Beam, BeamParams, advance, initial_beam, next_byte_logprobs
from .lm_state import TokenModel


class _Node:
    """A context in the beam cache's prefix tree."""

    __slots__ = ("children", "beam", "parent", "byte")

    def __init__(self, parent: "_Node | None", byte: int | None):
        self.children: dict[int, _Node] = {}
        self.beam: Beam | None = None
        self.parent = parent
        self.byte = byte


class BeamCache:
    """Beams by context in a prefix tree; least recently used beams are evicted while
    there are more than ``max_beams`` (the newest beam always stays). Beams hold no
    masses (those live in the model's ``MassStore``), only their candidates.

    ``lookup`` finds the deepest cached beam on a context's path: the exact context and its
    parent are found by hashing (C speed), so an SMC step costs O(1) Python work per
    particle; otherwise the walk costs one dict step per byte.
    """

    def __init__(self, max_beams: int):
        self.max_beams = max_beams
        self.root = _Node(None, None)
        self._by_key: OrderedDict[bytes, _Node] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def clear(self) -> None:
        self.root = _Node(None, None)
        self._by_key.clear()

    def lookup(self, key: bytes) -> tuple[int, Beam | None]:
        """(length of the deepest cached prefix of ``key``, its beam)."""
        for k in (len(key), len(key) - 1):
            node = self._by_key.get(key[:k]) if k >= 0 else None
            if node is not None:
                self._by_key.move_to_end(key[:k])
                return k, node.beam
        node, best = self.root, (0, self.root.beam)
        for i, b in enumerate(key):
            node = node.children.get(b)
            if node is None:
                break
            if node.beam is not None:
                best = (i + 1, node.beam)
        return best

    def put(self, key: bytes, beam: Beam) -> None:
        node = self.root
        for b in key:
            child = node.children.get(b)
            if child is None:
                child = node.children[b] = _Node(node, b)
            node = child
        node.beam = beam
        self._by_key[key] = node
        self._by_key.move_to_end(key)
        while len(self._by_key) > self.max_beams:
            _, old = self._by_key.popitem(last=False)
            old.beam = None
            while old.parent is not None and old.beam is None and not old.children:
                del old.parent.children[old.byte]
                old = old.parent


class ByteBeamPotential(Potential):
    """A token LM as an exact, normalized potential over bytes (ints 0..255 and EOS).

    Args:
        lm: a genlm-backend ``AsyncLM`` (or anything with ``byte_vocab`` and
            ``batch_next_token_logprobs``).
        K: beam width (``None``: no limit).
        prune_threshold: drop candidates below this share of the beam's weight.
        prompt: bytes (or str, utf-8) read by the beam before the context, EOS tokens as
            text, with token healing.
        prompt_tokens: token ids the LM is conditioned on first (e.g. from a chat template);
            ``prompt`` bytes, if any, follow them.
        eos_tokens: byte strings that end a sequence (default: the LM's EOS token).
        max_context_length: the most tokens the LM sees, capped by the LM's own limit
            (``max_context_length``, vLLM's ``max_model_len``, HF's
            ``config.max_position_embeddings``). Longer contexts, a long prompt included,
            are truncated, never an error: the LM sees the start token (BOS, or EOS as
            document start) followed by the most recent tokens (see ``TokenModel``).
        cache_size: most beams kept in the prefix-tree cache.
        cache_bytes: most bytes of trie-mass rows kept (one float64 row per trie node for
            each token context, in the model's ``MassStore``, on the device where masses
            are computed); rows are recomputed when needed again.
        heal_max_backoff, heal_max_splits: limits of prompt healing (see ``BeamParams``).
        canonical: commit only canonical tokenizations (the tokenizer's own encoding,
            checked on a window of trailing tokens; see ``TokenModel``). Needs
            ``lm.tokenizer``.
        lookahead: bytes of a context (or prompt) read ahead to prefetch LM calls into
            the LM's cache (see ``TokenModel``; 0: off). Values unchanged.

    Exact mode: ``K=None, prune_threshold=0`` keeps every tokenization of the context
    that has nonzero probability, and the potential is then the exact byte-level
    distribution of the token LM. Its cost is the number of those tokenizations, which
    is exponential in the context length whenever tokens overlap, i.e. for every real
    (byte-level BPE) vocabulary, not only in contrived worst cases: it about doubles per
    byte on English text with SmolLM2's vocabulary (5,440 candidates after 15 bytes). It
    is meant for short strings and tests; a small ``prune_threshold`` (e.g. 1e-12) drops
    the negligible tokenizations and bounds the beam in practice.

    Errors: bad input raises ``TypeError``/``ValueError`` naming the value (parameters,
    context items, EOS inside a context, a prompt byte no tokenization can read);
    contexts of probability 0 weigh -inf and are not errors. A failing LM call raises
    ``RuntimeError`` naming the contexts, chained to the LM's own error; cancelled or
    failed calls leave the cache consistent and the potential usable.
    """

    def __init__(
        self,
        lm: Any,
        *,
        K: int | None = 8,
        prune_threshold: float = 0.0,
        prompt: bytes | str = b"",
        prompt_tokens: Sequence[int] = (),
        eos_tokens: Sequence[bytes] | None = None,
        max_context_length: int | None = None,
        cache_size: int = 4096,
        cache_bytes: int = 2**31,
        heal_max_backoff: int | None = None,
        heal_max_splits: int | None = None,
        device: str | None = None,
        canonical: bool = False,
        lookahead: int = 6,
    ):
        if isinstance(prompt, str):
            try:
                prompt = prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"prompt {prompt[:40]!r} is not encodable as UTF-8 ({e.reason} at position "
                    f"{e.start}); pass bytes"
                ) from None
        if not isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"prompt has type {type(prompt).__name__}; expected bytes or str")
        for name, value in (("cache_size", cache_size), ("cache_bytes", cache_bytes)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")
        self.lm = lm
        self.params = BeamParams(K=K, prune_threshold=prune_threshold, heal=False)
        self.prompt_params = replace(
            self.params, heal=True, heal_max_backoff=heal_max_backoff, heal_max_splits=heal_max_splits
        )
        self.prompt = bytes(prompt)
        self.model = TokenModel(lm, eos_tokens, max_context_length, device, canonical=canonical, lookahead=lookahead,
                                mass_bytes=cache_bytes)
        self.prompt_tokens = self.model.initial_state(prompt_tokens).tokens
        self.cache = BeamCache(cache_size)
        self._warned_cache = False
        self._root_beam: Beam | None = None
        self._init_args = dict(
            K=K, prune_threshold=prune_threshold, prompt=self.prompt, prompt_tokens=tuple(prompt_tokens),
            eos_tokens=eos_tokens, max_context_length=max_context_length, cache_size=cache_size, cache_bytes=cache_bytes,
            heal_max_backoff=heal_max_backoff, heal_max_splits=heal_max_splits, device=device,
            canonical=canonical, lookahead=lookahead,
        )
        super().__init__(vocabulary=list(range(256)))

    @classmethod
    def from_name(cls, model: str | None = None, backend: str = "auto", *, engine_opts: dict | None = None, **kwargs) -> "ByteBeamPotential":
        """Load a model by HF name or local path (``None``: the embedded SmolLM2-135M) on
        ``backend`` (``"auto"``, ``"vllm"``, ``"hf"``, ``"mock"``) and wrap it."""
        from .models import load_lm

        return cls(load_lm(model, backend=backend, **(engine_opts or {})), **kwargs)

    # ------------------------------------------------------------ beams
    def _key(self, context) -> bytes:
        if isinstance(context, (bytes, bytearray)):
            return bytes(context)
        try:
            items = list(context)
        except TypeError:
            raise TypeError(f"context {context!r} is not a sequence of ints 0..255") from None
        try:  # fast path (C loops): valid contexts cost O(1) Python work per call
            key = bytes(items)
            if bool not in set(map(type, items)):
                return key
        except (TypeError, ValueError):
            pass
        for i, x in enumerate(items):  # find and name the bad item
            if isinstance(x, EndOfSequence):
                raise ValueError(f"context has EOS at position {i} of {len(items)}; EOS may only end a sequence (use complete())")
            if isinstance(x, bool) or not isinstance(x, Integral):
                raise TypeError(f"context item {x!r} at position {i} has type {type(x).__name__}; expected an int 0..255")
            if not 0 <= x <= 255:
                raise ValueError(f"context item {x!r} at position {i} is outside the byte vocabulary 0..255")
        return bytes(items)

    async def _root(self) -> Beam:
        """The beam after the prompt, for the empty context (kept outside the LRU)."""
        if self._root_beam is None:
            beam = await initial_beam(
                self.model, self.prompt_params, self.prompt_tokens, with_eos=not self.prompt
            )
            for i, b in enumerate(self.prompt):  # prefill, stopping at a byte it cannot read
                (beam,) = await advance([beam], [b], with_eos=i == len(self.prompt) - 1,
                                        ahead=[memoryview(self.prompt)[i + 1 :]])
                if beam.is_empty:
                    raise ValueError(
                        f"prompt byte {b:#04x} at position {i} ({self.prompt[max(0, i - 30) : i + 1]!r}): "
                        f"no tokenization of the prompt reads it with nonzero probability "
                        f"(is the byte in some token of the vocabulary?)"
                    )
            self._root_beam = replace(beam, params=self.params, logp=0.0, _dist=[])
        return self._root_beam

    async def beams(self, contexts: Sequence[Sequence[int]]) -> list[Beam]:
        """The beam of each context. Missing beams are built together from their deepest
        cached prefixes: one ``advance`` (one LM batch, one trie batch) per byte step."""
        keys = [self._key(c) for c in contexts]
        root = await self._root()
        found: dict[bytes, Beam] = {}
        pending: dict[bytes, tuple[int, Beam]] = {}
        for key in keys:
            if key in found or key in pending:
                continue
            n, beam = self.cache.lookup(key)
            if beam is None or n == 0:
                n, beam = 0, root
            if n == len(key):
                found[key] = beam
            else:
                pending[key] = (n, beam)
        while pending:
            # Contexts sharing a prefix advance through it once.
            step: dict[bytes, Beam] = {}
            ahead: dict[bytes, memoryview] = {}  # bytes known to follow each step
            for key, (n, beam) in pending.items():
                step.setdefault(key[: n + 1], beam)
                ahead.setdefault(key[: n + 1], memoryview(key)[n + 1 :])
            advanced = dict(zip(step, await advance(list(step.values()), [k[-1] for k in step],
                                                    ahead=list(ahead.values()))))
            for k, beam in advanced.items():
                self.cache.put(k, beam)
            nxt = {}
            for key, (n, _) in pending.items():
                beam = advanced[key[: n + 1]]
                if n + 1 == len(key):
                    found[key] = beam
                else:
                    nxt[key] = (n + 1, beam)
            pending = nxt
        if not self._warned_cache and len(keys) <= self.cache.max_beams:
            if any(k and k not in self.cache._by_key for k in keys):
                self._warned_cache = True
                warnings.warn(
                    f"the beam cache (cache_size={self.cache.max_beams}) cannot hold the beams of "
                    f"{len(keys)} contexts at once; the next calls will recompute them from "
                    f"shorter prefixes (slow). Raise cache_size.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return [found[k] for k in keys]

    # ------------------------------------------------------------ the contract
    async def prefix(self, context) -> float:
        return float((await self.batch_prefix([context]))[0])

    async def complete(self, context) -> float:
        return float((await self.batch_complete([context]))[0])

    async def logw_next(self, context):
        return self.make_lazy_weights((await self.batch_logw_next([context])).weights[0])

    async def batch_prefix(self, contexts) -> np.ndarray:
        if not contexts:
            raise ValueError("contexts is empty; expected at least one context")
        return np.array([b.logp for b in await self.beams(contexts)])

    async def batch_complete(self, contexts) -> np.ndarray:
        if not contexts:
            raise ValueError("contexts is empty; expected at least one context")
        beams = await self.beams(contexts)
        return np.array([b.logp for b in beams]) + (await next_byte_logprobs(beams))[:, 256]

    async def batch_logw_next(self, contexts):
        if not contexts:
            raise ValueError("contexts is empty; expected at least one context")
        return self.make_lazy_weights(await next_byte_logprobs(await self.beams(contexts)))

    # ------------------------------------------------------------ lifecycle
    def spawn(self) -> "ByteBeamPotential":
        """A fresh potential over the same LM and settings, with an empty cache."""
        return ByteBeamPotential(self.lm, **self._init_args)

    async def cleanup(self) -> None:
        """Drop every cached beam and stored mass row."""
        self.cache.clear()
        self.model.store.clear()
        self._root_beam = None

    def bytes_view(self) -> "BytesView":
        """This potential over one-byte ``bytes`` tokens instead of ints."""
        return BytesView(self)

    def __repr__(self) -> str:
        return f"ByteBeamPotential(K={self.params.K}, prune_threshold={self.params.prune_threshold}, prompt={self.prompt[:40]!r})"




class BytesView(Potential):
    """The same potential over one-byte ``bytes`` tokens (``b"a"`` rather than ``97``), for
    samplers and ``coerce`` users that want iterable tokens, e.g. genlm-control's
    ``eager_token_sampler(view, grammar)``. Weights are identical to the int potential's."""

    def __init__(self, potential: ByteBeamPotential):
        self.potential = potential
        super().__init__(vocabulary=[bytes([i]) for i in range(256)])

    def _ints(self, contexts):
        return [[x[0] if isinstance(x, (bytes, bytearray)) and len(x) == 1 else x for x in c] for c in contexts]

    async def prefix(self, context) -> float:
        return await self.potential.prefix(self._ints([context])[0])

    async def complete(self, context) -> float:
        return await self.potential.complete(self._ints([context])[0])

    async def logw_next(self, context):
        return self.make_lazy_weights((await self.potential.batch_logw_next(self._ints([context]))).weights[0])

    async def batch_prefix(self, contexts) -> np.ndarray:
        return await self.potential.batch_prefix(self._ints(contexts))

    async def batch_complete(self, contexts) -> np.ndarray:
        return await self.potential.batch_complete(self._ints(contexts))

    async def batch_logw_next(self, contexts):
        return self.make_lazy_weights((await self.potential.batch_logw_next(self._ints(contexts))).weights)

    def spawn(self) -> "BytesView":
        return BytesView(self.potential.spawn())

    async def cleanup(self) -> None:
        await self.potential.cleanup()
