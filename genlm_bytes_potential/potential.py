"""``ByteBeamPotential``: the byte beam as a genlm-control ``Potential`` over bytes.

The vocabulary is the 256 one-byte ``bytes`` tokens (``b"a"``), as for genlm-control's
``ByteLLM``, so code written for ``ByteLLM`` runs unchanged and ``Sequences.decoded_posterior``
reads sampled sequences. ``potential * grammar`` takes genlm-control's byte grammars over ints
(``BoolFSA``, ``BoolCFG``, ``JsonSchema``) as they are (see :mod:`.tokens`); contexts may be
given as one-byte ``bytes`` tokens, ints 0..255 or a ``bytes`` string. For a context
``x = x_1..x_n`` with beam distribution ``q`` (see :mod:`.beam`):

    prefix(x)      = sum_i log q(x_i | x_<i)          (prefix([]) = 0)
    complete(x)    = prefix(x) + log q(EOS | x)
    logw_next(x)_a = log q(a | x)                     (a = b"\\x00".."\\xff", EOS)

so ``logw_next(x)_a == prefix(x·a) - prefix(x)`` holds to the last bit (both come from the
same beam step) and each ``logw_next`` row sums to 1. A context the beam gives probability 0
has weight -inf and a ``logw_next`` of all -inf; nothing raises. Healing is used only while
reading the prompt: inside contexts it would step outside the normalized distribution.

Beams are cached in a prefix tree keyed by context bytes, so particles sharing a prefix share
beam states; batch methods advance all missing beams together, one LM batch call and one
trie batch per byte step.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from numbers import Integral
from typing import Any

import numpy as np
import torch
from genlm.control.constant import EndOfSequence
from genlm.control.potential.base import Potential

from .beam import Beam, BeamParams, advance, initial_beam, next_byte_logprobs
from .lm_state import DRAFT_WINDOW, TokenModel
from .prompts import Messages, chat_token_ids, is_messages, token_ids
from .tokens import BYTE_TABLES, ByteTokenView, autobatch_as_bytes, byte_product, byte_value


class _Node:
    """A context in the beam cache's prefix tree."""

    __slots__ = ("children", "beam", "parent", "byte")

    def __init__(self, parent: _Node | None, byte: int | None):
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
        parent = self._by_key.get(key[:-1]) if key else None
        if parent is not None:  # the usual case (the context's parent is cached): no walk
            node = parent.children.get(key[-1])
            if node is None:
                node = parent.children[key[-1]] = _Node(parent, key[-1])
            self._store(key, node, beam)
            return
        node = self.root
        for b in key:
            child = node.children.get(b)
            if child is None:
                child = node.children[b] = _Node(node, b)
            node = child
        self._store(key, node, beam)

    def _store(self, key: bytes, node: _Node, beam: Beam) -> None:
        node.beam = beam
        self._by_key[key] = node
        self._by_key.move_to_end(key)
        while len(self._by_key) > self.max_beams:
            _, old = self._by_key.popitem(last=False)
            old.beam = None
            while old.parent is not None and old.beam is None and not old.children:
                del old.parent.children[old.byte]
                old = old.parent


def _check_lm(lm) -> None:
    if not hasattr(lm, "byte_vocab") or not callable(getattr(lm, "batch_next_token_logprobs", None)):
        hint = " (a model name: use ByteBeamPotential.from_name)" if isinstance(lm, str) else ""
        raise TypeError(
            f"lm={lm!r} has type {type(lm).__name__}; expected a token LM with byte_vocab and "
            f"batch_next_token_logprobs (genlm_bytes_potential.models.load_lm, a genlm-backend AsyncLM){hint}"
        )


def _check_device(device) -> None:
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device={device!r} has type {type(device).__name__}; expected 'cpu', 'cuda', 'cuda:N' or None")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; expected 'cpu', 'cuda', 'cuda:N' or None") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (d.index is not None and d.index >= n):
            raise ValueError(f"device={device!r}, but this machine has {n} CUDA device(s); expected 'cpu' or None")
    elif d.type != "cpu":
        raise ValueError(
            f"device={device!r}; expected 'cpu', 'cuda', 'cuda:N' or None (trie masses run on CPU or CUDA)"
        )


def _check_eos_tokens(eos_tokens) -> None:
    if eos_tokens is None:
        return
    if isinstance(eos_tokens, (str, bytes, bytearray)):
        raise TypeError(f"eos_tokens={eos_tokens!r}; expected a list of byte strings, e.g. [{eos_tokens!r}]")
    try:
        items = list(eos_tokens)
    except TypeError:
        raise TypeError(
            f"eos_tokens={eos_tokens!r} has type {type(eos_tokens).__name__}; expected a list of byte strings"
        ) from None
    for e in items:
        if not isinstance(e, (bytes, bytearray)):
            raise TypeError(
                f"eos_tokens item {e!r} has type {type(e).__name__}; expected bytes (e.g. {str(e).encode()!r})"
            )


# genlm-bytes' BeamParams fields -> ours (``heal`` applies to the prompt only)
_GENLM_BYTES_FIELDS = {
    "K",
    "prune_threshold",
    "heal",
    "heal_max_backoff",
    "heal_max_splits",
    "eos_byte_strings",
    "eos_tokens",
}


def _beam_settings(beam_params) -> dict:
    """The beam settings of our ``BeamParams`` or of genlm-bytes' (``eos_byte_strings`` as
    ``eos_tokens``); fields of theirs we do not have must keep their defaults."""
    if isinstance(beam_params, BeamParams):
        return dict(
            K=beam_params.K,
            prune_threshold=beam_params.prune_threshold,
            heal=beam_params.heal,
            heal_max_backoff=beam_params.heal_max_backoff,
            heal_max_splits=beam_params.heal_max_splits,
        )
    if not (dataclasses.is_dataclass(beam_params) and type(beam_params).__name__ == "BeamParams"):
        raise TypeError(
            f"beam_params={beam_params!r} has type {type(beam_params).__name__}; expected "
            f"genlm_bytes_potential.BeamParams or genlm.bytes.BeamParams"
        )
    values = {f.name: getattr(beam_params, f.name) for f in dataclasses.fields(beam_params)}
    for f in dataclasses.fields(beam_params):
        if f.name not in _GENLM_BYTES_FIELDS and f.default is not dataclasses.MISSING and values[f.name] != f.default:
            raise ValueError(
                f"beam_params.{f.name}={values[f.name]!r} is not supported by ByteBeamPotential "
                f"(supported: {', '.join(sorted(_GENLM_BYTES_FIELDS - {'eos_tokens'}))}); leave it at {f.default!r}"
            )
    eos = values.get("eos_byte_strings") or values.get("eos_tokens") or ()
    return dict(
        K=values["K"],
        prune_threshold=values.get("prune_threshold", 0.0),
        heal=values.get("heal", True),
        heal_max_backoff=values.get("heal_max_backoff"),
        heal_max_splits=values.get("heal_max_splits"),
        eos_tokens=sorted(bytes(e) for e in eos),
    )


class ByteBeamPotential(Potential):
    """A token LM as an exact, normalized potential over bytes (one-byte ``bytes`` tokens
    and EOS).

    Drop-in for genlm-control's ``ByteLLM``: ``ByteBeamPotential(lm, BeamParams(K=5, ...))``
    (ours or genlm-bytes' ``BeamParams``; genlm-bytes' ``eos_byte_strings`` are our
    ``eos_tokens``, an empty set meaning no EOS as there), ``from_name``,
    ``set_prompt_from_str``, ``prompt_bytes``, ``cleanup`` and ``async with``. Unlike
    ``ByteLLM``, contexts are never healed (the distribution stays normalized; a context
    no kept tokenization reads weighs -inf instead of raising).

    Args:
        lm: a token LM (:func:`~genlm_bytes_potential.models.load_lm`, a genlm-backend
            ``AsyncLM``, anything with ``byte_vocab`` and ``batch_next_token_logprobs``).
        beam_params: the beam settings as one object (instead of ``K``,
            ``prune_threshold``, ``heal``, ``heal_max_*`` and, for genlm-bytes', ``eos_tokens``).
        cache_size: most beams kept in the prefix-tree cache.
        K: beam width (``None``: no limit).
        prune_threshold: drop candidates below this share of the beam's weight.
        prompt: bytes (or str, utf-8) read by the beam before the context, EOS tokens as
            text, with token healing; or a chat message list (as ``prompt_tokens``).
        prompt_tokens: tokens the LM is conditioned on first; ``prompt`` bytes, if any,
            follow them. Token ids in any form a tokenizer returns (list, ``BatchEncoding``
            or dict with ``input_ids``, tensor/array of shape [n] or [1, n], a rendered
            template str), or a chat message list, rendered with the LM tokenizer's chat
            template ready for the assistant's reply (see :mod:`.prompts`).
        eos_tokens: byte strings that end a sequence (default: the LM's EOS token).
        max_context_length: the most tokens the LM sees, capped by the LM's own limit
            (``max_context_length``, vLLM's ``max_model_len``, HF's
            ``config.max_position_embeddings``). Longer contexts, a long prompt included,
            are truncated, never an error: the LM sees the start token (BOS, or EOS as
            document start) followed by the most recent tokens (see ``TokenModel``).
        cache_bytes: most bytes of trie-mass rows kept (for each token context one float64
            row, in the model's ``MassStore``, on the device where masses are computed: on
            the host a weight per token plus ~260 cached masses, on a GPU a mass per trie
            node); rows are recomputed when needed again.
        heal: heal the prompt (re-tokenize where a prompt byte cannot be read);
            heal_max_backoff, heal_max_splits: its limits (see ``BeamParams``).
        device: where trie masses are computed (``"cpu"``, ``"cuda[:N]"``; default: where
            the LM returns its log-probs).
        canonical: commit only canonical tokenizations (the tokenizer's own encoding,
            checked on a window of trailing tokens; see ``TokenModel``). Needs
            ``lm.tokenizer``.
        lookahead: bytes of a context (or prompt) read ahead to prefetch LM calls into
            the LM's cache (see ``TokenModel``; 0: off). Values unchanged.
        draft_window: bytes of a prompt a draft of the beam reads ahead to choose what
            to prefetch (see ``TokenModel``; 0: ranked guesses instead). Values unchanged.

    Exact mode: ``K=None, prune_threshold=0`` keeps every tokenization of the context
    that has nonzero probability, and the potential is then the exact byte-level
    distribution of the token LM. Its cost is the number of those tokenizations, which
    is exponential in the context length whenever tokens overlap, i.e. for every real
    (byte-level BPE) vocabulary, not only in contrived worst cases: it about doubles per
    byte on English text with SmolLM2's vocabulary (5,440 candidates after 15 bytes). It
    is meant for short strings and tests; a small ``prune_threshold`` (e.g. 1e-12) drops
    the negligible tokenizations and bounds the beam in practice.

    Errors: bad input raises ``TypeError``/``ValueError`` naming the value (every
    constructor argument where it is given; context items, EOS inside a context, a prompt
    byte no tokenization can read); contexts of probability 0 weigh -inf and are not
    errors. A failing LM call raises ``RuntimeError`` naming the contexts, chained to the
    LM's own error; cancelled or failed calls leave the cache consistent and the
    potential usable.
    """

    def __init__(
        self,
        lm: Any,
        beam_params: Any = None,
        cache_size: int = 4096,
        *,
        K: int | None = 8,
        prune_threshold: float = 0.0,
        prompt: bytes | str | Messages = b"",
        prompt_tokens: Any = (),
        eos_tokens: Sequence[bytes] | None = None,
        max_context_length: int | None = None,
        cache_bytes: int = 2**31,
        heal: bool = True,
        heal_max_backoff: int | None = None,
        heal_max_splits: int | None = None,
        device: str | None = None,
        canonical: bool = False,
        lookahead: int = 4,
        draft_window: int = DRAFT_WINDOW,
    ):
        _check_lm(lm)
        if beam_params is not None:
            given = dict(
                K=K,
                prune_threshold=prune_threshold,
                heal=heal,
                heal_max_backoff=heal_max_backoff,
                heal_max_splits=heal_max_splits,
                eos_tokens=eos_tokens,
            )
            defaults = dict(
                K=8, prune_threshold=0.0, heal=True, heal_max_backoff=None, heal_max_splits=None, eos_tokens=None
            )
            both = [k for k in given if given[k] is not defaults[k] and given[k] != defaults[k]]
            settings = _beam_settings(beam_params)
            if both:
                raise TypeError(
                    f"{', '.join(both)} given both as keyword and in beam_params; give each beam setting once"
                )
            K, prune_threshold, heal = settings["K"], settings["prune_threshold"], settings["heal"]
            heal_max_backoff, heal_max_splits = settings["heal_max_backoff"], settings["heal_max_splits"]
            eos_tokens = settings.get("eos_tokens", eos_tokens)
        for name, value in (("cache_size", cache_size), ("cache_bytes", cache_bytes)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")
        for name, value in (("heal", heal), ("canonical", canonical)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected True or False")
        _check_eos_tokens(eos_tokens)
        _check_device(device)
        self.lm = lm
        self.params = BeamParams(K=K, prune_threshold=prune_threshold, heal=False)
        self.prompt_params = replace(
            self.params, heal=bool(heal), heal_max_backoff=heal_max_backoff, heal_max_splits=heal_max_splits
        )
        self.model = TokenModel(
            lm,
            eos_tokens,
            max_context_length,
            device,
            canonical=canonical,
            lookahead=lookahead,
            draft_window=draft_window,
            mass_bytes=cache_bytes,
        )
        self.cache = BeamCache(cache_size)
        self._warned_cache = False
        self._root_beam: Beam | None = None
        self._init_args = dict(
            K=K,
            prune_threshold=prune_threshold,
            eos_tokens=eos_tokens,
            max_context_length=max_context_length,
            cache_size=cache_size,
            cache_bytes=cache_bytes,
            heal=bool(heal),
            heal_max_backoff=heal_max_backoff,
            heal_max_splits=heal_max_splits,
            device=device,
            canonical=canonical,
            lookahead=lookahead,
            draft_window=draft_window,
        )
        self.prompt: bytes = b""
        self.prompt_tokens: tuple[int, ...] = ()
        self.set_prompt(prompt, prompt_tokens)
        super().__init__(BYTE_TABLES.vocab_eos[:-1], tables=BYTE_TABLES)
        autobatch_as_bytes(self)  # AWRS(potential, grammar) multiplies without the overlap warning

    @classmethod
    def from_name(
        cls,
        model: str | None = None,
        beam_params: Any = None,
        backend: str | None = "auto",
        cache_size: int = 4096,
        *,
        engine_opts: dict | None = None,
        llm_opts: dict | None = None,
        **kwargs,
    ) -> ByteBeamPotential:
        """Load a model by HF name or local folder (``None``: the embedded SmolLM2-135M)
        on ``backend`` (``"auto"`` or ``None``, ``"vllm"``, ``"paged"``, ``"hf"``,
        ``"mock"``; see :func:`~genlm_bytes_potential.models.load_lm`) and wrap it.
        ``engine_opts`` (or ``llm_opts``, genlm-backend's name) go to the backend;
        ``kwargs`` to the constructor."""
        from .models import load_lm

        if engine_opts is not None and llm_opts is not None:
            raise TypeError("engine_opts and llm_opts are the same thing; give one")
        opts = engine_opts if engine_opts is not None else llm_opts
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"engine_opts={opts!r} has type {type(opts).__name__}; expected a dict")
        lm = load_lm(model, backend="auto" if backend is None else backend, **(opts or {}))
        return cls(lm, beam_params, cache_size, **kwargs)

    # ------------------------------------------------------------ prompts
    def set_prompt(self, prompt: bytes | str | Messages = b"", prompt_tokens: Any = ()) -> None:
        """Condition on a new prompt (``prompt`` and ``prompt_tokens`` as in the
        constructor). Cached beams are dropped when the prompt changes."""
        tokenizer = getattr(self.lm, "tokenizer", None)
        if is_messages(prompt_tokens):
            ids = chat_token_ids(tokenizer, prompt_tokens)
        else:
            ids = token_ids(prompt_tokens, tokenizer)
        if is_messages(prompt):
            if ids:
                raise ValueError("prompt is a chat message list and prompt_tokens are given too; give one of them")
            prompt, ids = b"", chat_token_ids(tokenizer, prompt)
        elif isinstance(prompt, str):
            try:
                prompt = prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"prompt {prompt[:40]!r} is not encodable as UTF-8 ({e.reason} at position {e.start}); pass bytes"
                ) from None
        if not isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"prompt has type {type(prompt).__name__}; expected bytes, str or a chat message list")
        tokens = self.model.initial_state(ids).tokens
        if (bytes(prompt), tokens) != (self.prompt, self.prompt_tokens):
            self.prompt, self.prompt_tokens = bytes(prompt), tokens
            self.cache.clear()
            self._root_beam = None
        self._init_args.update(prompt=self.prompt, prompt_tokens=tuple(ids))

    def set_prompt_from_str(self, prompt: str) -> None:
        """The prompt is this text (``ByteLLM``'s and ``PromptedLLM``'s method)."""
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt has type {type(prompt).__name__}; expected str (use set_prompt for bytes or tokens)"
            )
        self.set_prompt(prompt)

    @property
    def prompt_bytes(self) -> bytes:
        """The prompt's bytes (``ByteLLM``'s name)."""
        return self.prompt

    async def prefill(self, context=()) -> float:
        """Read the prompt, and ``context`` (bytes, str or byte tokens) if given, now rather
        than at the first call: a prompt no tokenization can read fails here, and the first
        sampling step finds its beam cached. Returns ``prefix(context)``."""
        return await self.prefix(context.encode("utf-8") if isinstance(context, str) else context)

    # ------------------------------------------------------------ beams
    @staticmethod
    def _key(context) -> bytes:
        """A context (one-byte ``bytes`` tokens, ints 0..255, or ``bytes``) as bytes."""
        if isinstance(context, (bytes, bytearray)):
            return bytes(context)
        try:
            items = context if type(context) in (list, tuple) else list(context)
        except TypeError:
            raise TypeError(f"context {context!r} is not a sequence of byte tokens") from None
        # fast paths (C loops, a few per call): contexts are long and come every step
        if items and not isinstance(items[0], (bytes, bytearray)):  # ints 0..255
            try:
                key = bytes(items)
                # a bool would read as byte 0 or 1: look for one only where such bytes are
                if (b"\x00" not in key and b"\x01" not in key) or bool not in set(map(type, items)):
                    return key
            except (TypeError, ValueError):
                pass
        else:  # one-byte bytes tokens, the vocabulary
            try:
                key = b"".join(items)
                if len(key) == len(items) and b"" not in items:  # n bytes, none empty: one each
                    return key
            except TypeError:
                pass
        for i, x in enumerate(items):  # find and name the bad item
            if isinstance(x, EndOfSequence):
                raise ValueError(
                    f"context has EOS at position {i} of {len(items)}; EOS may only end a sequence (use complete())"
                )
            if byte_value(x) is None:
                expected = "expected a one-byte bytes token or an int 0..255"
                if isinstance(x, (bytes, bytearray)) or (isinstance(x, Integral) and not isinstance(x, bool)):
                    raise ValueError(f"context item {x!r} at position {i} is outside the byte vocabulary; {expected}")
                raise TypeError(f"context item {x!r} at position {i} has type {type(x).__name__}; {expected}")
        return bytes(map(byte_value, items))

    async def _root(self) -> Beam:
        """The beam after the prompt, for the empty context (kept outside the LRU)."""
        if self._root_beam is None:
            beam = await initial_beam(
                self.model, self.prompt_params, self.prompt_tokens, with_eos=not self.prompt, ahead=self.prompt
            )
            for i, b in enumerate(self.prompt):  # prefill, stopping at a byte it cannot read
                (beam,) = await advance(
                    [beam], [b], with_eos=i == len(self.prompt) - 1, ahead=[memoryview(self.prompt)[i + 1 :]]
                )
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
            advanced = dict(
                zip(step, await advance(list(step.values()), [k[-1] for k in step], ahead=list(ahead.values())))
            )
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

    async def logw_eos(self, context) -> float:
        """``logw_next(context)[EOS]``. Calls made together share one ``batch_logw_next``
        (through this potential's autobatched wrapper): a sampler ending its particles at
        ``max_tokens`` asks every particle's ``logw_eos`` at once, and genlm-control's
        autobatcher and ``Product`` pass ``logw_eos`` on one context at a time."""
        return float((await self._autobatched.logw_next(context))[self.eos])

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
    def spawn(self) -> ByteBeamPotential:
        """A fresh potential over the same LM, settings and prompt, with an empty cache."""
        return ByteBeamPotential(self.lm, **self._init_args)

    async def cleanup(self) -> None:
        """Drop every cached beam and stored mass row."""
        self.cache.clear()
        self.model.store.clear()
        self._root_beam = None

    async def __aenter__(self) -> ByteBeamPotential:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        await self.cleanup()
        return False

    def __mul__(self, other):
        """The product with ``other``; genlm-control's byte grammars over ints
        (``BoolFSA``, ``BoolCFG``, ``JsonSchema``) are taken as they are (see :mod:`.tokens`)."""
        return byte_product(self, other)

    def int_view(self) -> ByteTokenView:
        """This potential over ints 0..255 instead of one-byte ``bytes`` tokens, for
        samplers or potentials that want ints. Weights are identical."""
        return ByteTokenView(self, int)

    def __repr__(self) -> str:
        return f"ByteBeamPotential(K={self.params.K}, prune_threshold={self.params.prune_threshold}, prompt={self.prompt[:40]!r})"
