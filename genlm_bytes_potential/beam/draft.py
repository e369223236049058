"""Draft prefetching: when a step reading known bytes (a text being scored, a prompt)
has to call the LM, a *draft* of the beam reads the next ``draft_window`` bytes first,
and every context it asks for joins that call (a guess for the LM's cache, never part of
the beam's arithmetic).

The draft is the beam itself, run on stand-in rows: a context the LM has not computed yet
reads with the row of the *proxy* context ending at the same byte of the text (one fixed
tokenization of it: the tokenizer's encoding, each position's tail by greedy longest
match). Where the stand-ins rank alternatives as the exact rows do, it asks for what the
exact beam will ask for: scoring SmolLM2's held-out text at K=8 it took 291 forward passes
where ranked guesses took 596 (H200), and 49 where they took 84 on 300 bytes on the CPU
(benchmarks/HISTORY.md, session 27). Each draft costs up to ``draft_window`` steps of host
work, which is most of the gain on a GPU (W1 1.05-1.16x there, 1.5x on the CPU); drafts of
many beams read in lockstep missed in turn (``batch_score`` of 16 documents 3.5x slower),
so only a step of one beam drafts. Off by default (``TokenModel.draft_window``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..lm_state import LMState, MassRows, TokenModel
from .core import Beam


def proxy_plan(vocab: list[bytes], tokenizer, text: bytes) -> tuple[list[int], list[tuple[int, tuple[int, ...]]]]:
    """One tokenization ``spine`` of ``text`` (the tokenizer's encoding; greedy longest
    match when there is none or the text is not UTF-8) and, per byte position ``p``
    (``0..len(text)``), the proxy context's tokens past the start: ``spine[:j]`` (its
    tokens that end at or before ``p``) then ``tail``, ``text[q:p]`` by greedy longest
    match (``q`` where ``spine[:j]`` ends). Returns ``spine`` and the ``(j, tail)``."""
    index = {t: i for i, t in enumerate(vocab) if t}
    longest = max(map(len, index))

    def greedy(data: bytes) -> tuple[int, ...]:
        out, i = [], 0
        while i < len(data):
            j = next((j for j in range(min(len(data), i + longest), i, -1) if data[i:j] in index), None)
            if j is None:
                raise ValueError(f"byte {data[i]:#04x} of {bytes(data)!r} begins no token of the vocabulary")
            out.append(index[data[i:j]])
            i = j
        return tuple(out)

    spine = None
    if tokenizer is not None and hasattr(tokenizer, "encode"):
        try:
            spine = list(tokenizer.encode(text.decode("utf-8"), add_special_tokens=False))
        except UnicodeDecodeError:
            spine = None
        if spine is not None and b"".join(vocab[t] for t in spine) != text:
            spine = None
    if spine is None:
        spine = list(greedy(text))
    plan, q, j = [], 0, 0
    for p in range(len(text) + 1):
        while j < len(spine) and q + len(vocab[spine[j]]) <= p:
            q += len(vocab[spine[j]])
            j += 1
        plan.append((j, greedy(text[q:p])))
    return spine, plan


class _DraftModel:
    """The model a draft reads with: ``model`` (delegated to), except that a context the
    store has no row for reads with its proxy's row and is recorded in ``asked`` (with the
    text position where its tokens end: ``pos``, kept for every state the draft makes).
    It never prefetches (``lookahead`` 0)."""

    lookahead = 0

    def __init__(self, model: TokenModel, text: memoryview, proxies: _Proxies, pos: dict[LMState, int]):
        self._model, self._text, self._proxies, self.pos = model, text, proxies, pos
        self.asked: dict[LMState, int] = {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def extend(self, state: LMState, token: int) -> LMState:
        child = self._model.extend(state, token)
        self.pos[child] = self.pos.get(state, self._proxies.first) + len(self._model._vocab[token])
        return child

    async def rows(self, states, with_eos: bool, prefetch=(), ahead=None) -> MassRows:
        store = self._model.store
        slot = store.find([(with_eos, s) for s in states])
        gen = np.zeros(len(slot), np.int64)
        found = slot >= 0
        gen[found] = store.gen[slot[found]]
        missing = np.flatnonzero(~found)
        if len(missing):
            proxies = self._proxies
            order, after = [], {}  # per missing state its stand-in; each stand-in's text after it
            for i in missing.tolist():
                s = states[i]
                p = self.pos.get(s, proxies.first)
                if not self._model._cached(s):  # (computed ones are not asked for again)
                    self.asked.setdefault(s, p)
                p = min(max(p, proxies.first), proxies.last)
                s = proxies.at(p)
                order.append(s)
                after[s] = self._text[p:]
            got = await self._model.rows(order, with_eos, ahead=after)
            slot[missing], gen[missing] = got.slot, got.gen
        return MassRows(slot, gen)

    async def ensure(self, rows: MassRows, states, with_eos: bool) -> None:
        await TokenModel.ensure(self, rows, states, with_eos)  # (recomputing through self.rows)


class _Proxies:
    """The proxy contexts of one text (``proxy_plan``), after ``anchor``, a context whose
    tokens end at byte ``first``: the one ending at position ``p`` (``first .. last``) is
    ``at(p)``, made on demand (a context is a tuple of all its tokens: a text's proxies are
    never all made, and only the most recent are kept)."""

    def __init__(self, anchor: LMState, first: int, spine: list[int], plan: list):
        self.first, self.last = first, first + len(plan) - 1
        self._anchor, self._spine, self._plan = anchor, spine, plan
        self._spined: dict[int, LMState] = {0: anchor}  # anchor + spine[:j], by j
        self._made: dict[int, LMState] = {}  # by position

    def at(self, p: int) -> LMState:
        state = self._made.get(p)
        if state is None:
            j, tail = self._plan[p - self.first]
            state = self._spine_state(j)
            for t in tail:
                state = state.extend(t)
            if len(self._made) >= _PROXIES_KEPT:
                self._made.clear()
            self._made[p] = state
        return state

    def _spine_state(self, j: int) -> LMState:
        state = self._spined.get(j)
        if state is None:
            k = max(k for k in self._spined if k <= j)
            state = self._spined[k]
            for t in self._spine[k:j]:
                state = state.extend(t)
            if len(self._spined) >= _PROXIES_KEPT:
                self._spined = {0: self._anchor}
            self._spined[j] = state
        return state


def _proxies(beam: Beam, text: bytes, i: int) -> _Proxies | None:
    """The proxy contexts of ``text`` for ``beam``'s model, made at its first draft, after
    its heaviest candidate among those whose partial token began in the text; None if none
    did (a token of the bytes before the text still being read) or if greedy longest match
    cannot spell the text."""
    model = beam.model
    hit = model.drafts.get(text)
    if hit is None:
        starts = i - model.trie.depth[beam.nodes]
        inside = np.flatnonzero(starts >= 0)
        if not len(inside):
            return None
        c = int(inside[np.argmax(beam.weights[inside])])
        first = int(starts[c])
        try:
            spine, plan = proxy_plan(model._vocab, getattr(model.lm, "tokenizer", None), text[first:])
        except ValueError:  # greedy longest match cannot spell the text
            return None
        kept = sum(map(len, model.drafts))
        while model.drafts and kept + len(text) > _TEXT_BYTES_KEPT:
            oldest = next(iter(model.drafts))
            del model.drafts[oldest]
            kept -= len(oldest)
        hit = model.drafts[text] = _Proxies(beam.states[c], first, spine, plan)
    return hit


async def drafted_contexts(beam: Beam, text: bytes, i: int, limit: int) -> dict[LMState, memoryview] | None:
    """Contexts to prefetch when ``beam`` reads byte ``i`` of ``text`` and the step calls
    the LM: those a draft of ``beam`` asks for reading bytes ``i .. i + draft_window``
    (module docstring), then the proxies of the window after that (the stand-ins of the
    next draft), at most ``limit``; each with the bytes of ``text`` that follow it. None
    when the text has no proxies (``_proxies``)."""
    from .extend import advance  # (the draft runs the step that calls it)

    model = beam.model
    proxies = _proxies(beam, text, i)
    if proxies is None:
        return None
    pos = dict(zip(beam.states, (i - model.trie.depth[beam.nodes]).tolist()))
    view = memoryview(text)
    draft_model = _DraftModel(model, view, proxies, pos)
    draft = replace(beam, model=draft_model, _dist=[])
    end = min(len(text), i + 1 + model.draft_window)
    # the stand-ins, in one call: a pass at a text's first draft, then the previous one's prefetch
    window = {proxies.at(p): view[p:] for p in range(max(i, proxies.first), end + 1)}
    await model.rows(list(window), beam.with_eos, ahead=window)
    for k in range(i, end):
        (draft,) = await advance([draft], [text[k]], ahead=[view[k + 1 :]])
        if draft.is_empty or draft.logp == -math.inf:
            break
    out = {s: view[p:] for s, p in draft_model.asked.items()}
    for p in range(end, min(len(text), end + model.draft_window) + 1):
        out.setdefault(proxies.at(p), view[p:])
    return dict(list(out.items())[:limit])


#: bytes of the texts whose proxy plans a model keeps (``TokenModel.drafts``)
_TEXT_BYTES_KEPT = 1 << 20
#: proxy contexts a text keeps made (and as many along its tokenization)
_PROXIES_KEPT = 64
