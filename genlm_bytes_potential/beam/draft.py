"""Draft prefetching: when a step reading known bytes (a text being scored, a prompt)
has to call the LM, a *draft* of the beam reads the next ``draft_window`` bytes first,
and every context it makes that needs a forward pass joins that call (a guess for the
LM's cache, never part of the beam's arithmetic).

The draft is the beam's own steps (read, prune, extend) run in one numba kernel on
stand-in rows: the beam's candidates read with their own rows, and a context the draft
makes reads with the row of the *proxy* context ending at the same byte of the text (one
fixed tokenization of it: the tokenizer's encoding, each position's tail by greedy
longest match). The masses it reads (the paths of the text's bytes on those rows) are
gathered at once; where the stand-ins rank alternatives as the exact rows do, it makes
what the exact beam will make (exactly so under an LM whose distribution ignores the
context). Scoring SmolLM2's held-out text at K=8 the drafts took 251 forward passes where
ranked guesses took 596, ~1,550 against ~900 B/s (H200; benchmarks/HISTORY.md, session 28).
Only a step of at most ``MAX_DRAFTING_BEAMS`` beams drafts: drafts of many beams read in
lockstep each need stand-ins of their own (``batch_score`` of 16 and 64 documents was 4-6x
slower, of 4 documents 1.35x faster). On by default (``TokenModel.draft_window``, 16 bytes).
"""

from __future__ import annotations

import numpy as np

from ..lm_state import LMState, TokenModel
from ..trie import child_by_byte
from .core import Beam, _grown, _njit
from .read import _logsumexp_at


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
    the LM: those a draft of ``beam`` makes reading bytes ``i .. i + draft_window`` that
    need a forward pass (module docstring), then the proxies of the window after that (the
    stand-ins of the next draft), at most ``limit``; each with the bytes of ``text`` that
    follow it. The draft stops where the stand-ins known end (those the previous draft
    prefetched: computing more would be a pass of its own), unless none is known (a text's
    first draft). None when the text has no proxies there (``draft``)."""
    model = beam.model
    proxies = _proxies(beam, text, i)
    if proxies is None or proxies.first > i + 1:  # (a text drafted before from further on)
        return None
    end = min(len(text), i + 1 + model.draft_window)
    known = i
    while known < end and _known(model, proxies.at(known + 1), beam.with_eos):
        known += 1
    made = await draft(beam, text, i, known if known > i else end)
    view = memoryview(text)
    out = {s: view[p:] for s, p in made.items() if not _known(model, s, beam.with_eos)}
    for p in range(end, min(len(text), end + model.draft_window) + 1):
        out.setdefault(proxies.at(p), view[p:])
    return dict(list(out.items())[:limit])


async def compute_stand_ins(jobs: list[tuple[Beam, bytes, int]]) -> None:
    """Compute, in one call per EOS mode, the stand-ins that the drafts of several beams
    read in lockstep (``beam`` reading byte ``i`` of ``text``) would each compute in a
    call of their own (a text's first draft: ``drafted_contexts``)."""
    windows: dict[bool, dict[LMState, memoryview]] = {}
    for beam, text, i in jobs:
        model = beam.model
        proxies = _proxies(beam, text, i)
        if proxies is None or proxies.first > i + 1 or _known(model, proxies.at(i + 1), beam.with_eos):
            continue
        view = memoryview(text)
        end = min(len(text), i + 1 + model.draft_window)
        windows.setdefault(beam.with_eos, {}).update((proxies.at(p), view[p:]) for p in range(i + 1, end + 1))
    for mode, window in windows.items():
        await jobs[0][0].model.rows(list(window), mode, ahead=window)


async def draft(beam: Beam, text: bytes, i: int, end: int) -> dict[LMState, int] | None:
    """The contexts a draft of ``beam`` makes reading ``text[i:end]``, in order, each with
    the position where its tokens end; None when the text has no proxies there
    (``_proxies``). The draft reads with the beam's own rows for its candidates and, for
    a context it makes ending at ``p``, with the row of ``text``'s proxy at ``p`` (those
    of ``i + 1 .. end`` in one call: a pass at a text's first draft, then what the
    previous draft prefetched); its steps are the beam's (read, prune to ``K``, the
    full-support rule, extensions past the threshold: ``_draft_steps``) on masses gathered
    once. When every context's row is its proxy's, these are the contexts the beam makes."""
    model, trie, params = beam.model, beam.model.trie, beam.params
    proxies = _proxies(beam, text, i)
    if proxies is None or proxies.first > i + 1:  # (a text drafted before from further on)
        return None
    view = memoryview(text)
    window = {proxies.at(p): view[p:] for p in range(i + 1, end + 1)}
    stand_ins = await model.rows(list(window), beam.with_eos, ahead=window)
    n = len(beam)
    start_node = np.concatenate([beam.nodes, np.full(end - i, trie.root)])
    start_pos = np.concatenate([np.full(n, i), np.arange(i + 1, end + 1)])
    slots = np.concatenate([beam.rows.slot, stand_ins.slot])
    off, node, leaf_off, leaf = _draft_walks(
        np.frombuffer(text, np.uint8),
        start_node,
        start_pos,
        end,
        trie.child_ptr,
        trie.child_label,
        trie.child_node,
        trie.n_leaves,
    )
    row_of_entry = np.repeat(np.arange(len(slots)), np.diff(off))
    entry_of_leaf = np.repeat(np.arange(len(node)), np.diff(leaf_off))
    m = model.log_mass(
        np.concatenate([slots[row_of_entry], slots[row_of_entry[entry_of_leaf]]]), np.concatenate([node, leaf])
    )
    K = params.K if params.K is not None else _UNBOUNDED_K
    parent, token, pos = _draft_steps(
        off,
        m[: len(node)],
        leaf_off,
        m[len(node) :],
        trie.leaf_token[leaf],
        beam.weights,
        i,
        end,
        K,
        params.log_threshold,
    )
    made: list[LMState] = []
    for src, t in zip(parent.tolist(), token.tolist()):
        made.append(model.extend(beam.states[-1 - src] if src < 0 else made[src], t))
    return dict(zip(made, pos.tolist()))


def _known(model: TokenModel, state: LMState, with_eos: bool) -> bool:
    """Whether ``state`` needs no LM forward pass: its row is stored or the LM caches it."""
    return (with_eos, state) in model.store or model._cached(state)


@_njit
def _draft_walks(data, start_node, start_pos, end, child_ptr, child_label, child_node, n_leaves):
    """Per row ``r``, the nodes reached from ``start_node[r]`` reading ``data[start_pos[r]:
    end]``, up to the first byte the trie lacks: ``node[off[r] + k]`` after ``k`` bytes;
    the leaves at entry ``e`` are ``leaf[leaf_off[e]:leaf_off[e + 1]]``."""
    R = len(start_node)
    off = np.zeros(R + 1, np.int64)
    node = np.empty(16, np.int64)
    leaf = np.empty(16, np.int64)
    leaf_off = np.zeros(17, np.int64)
    e = nl = 0
    for r in range(R):
        cur = start_node[r]
        p = start_pos[r]
        while True:
            if e + 1 >= len(node):
                node, leaf_off = _grown(node), _grown(leaf_off)
            node[e] = cur
            for j in range(n_leaves[cur]):
                if nl == len(leaf):
                    leaf = _grown(leaf)
                leaf[nl] = cur + 1 + j
                nl += 1
            e += 1
            leaf_off[e] = nl
            if p >= end:
                break
            cur = child_by_byte(cur, data[p], child_ptr, child_label, child_node)
            p += 1
            if cur < 0:
                break
        off[r + 1] = e
    return off, node[:e], leaf_off[: e + 1], leaf[:nl]


@_njit
def _draft_steps(off, m_node, leaf_off, m_leaf, leaf_token, weights, i, end, K, log_thr):
    """The draft's steps (``draft``) on the walks' log-masses: candidates are (row, bytes
    read on it, weight); the beam's candidates start on rows ``0..len(weights)``, a context
    made at ``p`` on row ``len(weights) + p - i - 1``. Each step mirrors ``read._select``:
    read (``w += m(child) - m(node)``), drop below the threshold share, keep the ``K``
    heaviest (stable), the full-support rescue, then the kept candidates' finite
    extensions in read order, made past the threshold share of the kept weight (the
    heaviest always). Returns each context made: its parent (``-1 - c`` for candidate ``c``
    of the beam, else an earlier context), token and end position."""
    n0 = len(weights)
    row = np.arange(n0)
    depth = np.zeros(n0, np.int64)
    w = weights.copy()
    origin = -1 - np.arange(n0)
    parent = np.empty(64, np.int64)
    token = np.empty(64, np.int64)
    pos = np.empty(64, np.int64)
    n_made = 0
    for p in range(i + 1, end + 1):  # after reading the byte at p - 1
        n = len(row)
        read = np.empty(n, np.int64)
        nw = np.empty(n)
        n_read = 0
        for c in range(n):
            e = off[row[c]] + depth[c]
            if e + 1 < off[row[c] + 1]:
                v = w[c] + m_node[e + 1] - m_node[e]
                if np.isfinite(v):
                    read[n_read], nw[n_read] = c, v
                    n_read += 1
        if n_read == 0:
            break
        read, nw = read[:n_read], nw[:n_read]
        lr = _logsumexp_at(nw, np.arange(n_read))
        can_extend = np.zeros(n_read, np.bool_)
        for k in range(n_read):
            e = off[row[read[k]]] + depth[read[k]] + 1
            for j in range(leaf_off[e], leaf_off[e + 1]):
                if np.isfinite(nw[k] + m_leaf[j] - m_node[e]):
                    can_extend[k] = True
        passes = np.flatnonzero(nw - lr > log_thr)
        order = passes[np.argsort(-nw[passes], kind="mergesort")][:K]
        kept = np.empty(len(order) + 1, np.int64)
        kept[: len(order)] = order
        n_kept = len(order)
        if not can_extend[order].any():  # full support: the heaviest that can end a token
            best = -1
            for k in range(n_read):
                if can_extend[k] and (best < 0 or nw[k] > nw[best]):
                    best = k
            if best >= 0:
                kept[n_kept] = best
                n_kept += 1
        kept = kept[:n_kept]
        lt = _logsumexp_at(nw, kept)
        is_kept = np.zeros(n_read, np.bool_)
        is_kept[kept] = True
        n_ext = 0
        for k in kept:
            e = off[row[read[k]]] + depth[read[k]] + 1
            n_ext += leaf_off[e + 1] - leaf_off[e]
        ext_k, ext_j, ext_w = np.empty(n_ext, np.int64), np.empty(n_ext, np.int64), np.empty(n_ext)
        n_ext = 0
        for k in range(n_read):  # the kept candidates' finite extensions, in read order
            if is_kept[k]:
                e = off[row[read[k]]] + depth[read[k]] + 1
                for j in range(leaf_off[e], leaf_off[e + 1]):
                    v = nw[k] + m_leaf[j] - m_node[e]
                    if np.isfinite(v):
                        ext_k[n_ext], ext_j[n_ext], ext_w[n_ext] = k, j, v
                        n_ext += 1
        ext_k, ext_j, ext_w = ext_k[:n_ext], ext_j[:n_ext], ext_w[:n_ext]
        made = ext_w - lt > log_thr
        if n_ext and not made.any():
            made[np.argmax(ext_w)] = True
        n_new = n_kept + made.sum()
        new_row, new_depth, new_w, new_origin = (
            np.empty(n_new, np.int64),
            np.empty(n_new, np.int64),
            np.empty(n_new),
            np.empty(n_new, np.int64),
        )
        for a in range(n_kept):
            c = read[kept[a]]
            new_row[a], new_depth[a], new_w[a], new_origin[a] = row[c], depth[c] + 1, nw[kept[a]], origin[c]
        a = n_kept
        for x in np.flatnonzero(made):
            if n_made == len(parent):
                parent, token, pos = _grown(parent), _grown(token), _grown(pos)
            parent[n_made], token[n_made], pos[n_made] = origin[read[ext_k[x]]], leaf_token[ext_j[x]], p
            new_row[a], new_depth[a], new_w[a], new_origin[a] = n0 + p - i - 1, 0, ext_w[x], n_made
            n_made += 1
            a += 1
        row, depth, w, origin = new_row, new_depth, new_w, new_origin
    return parent[:n_made], token[:n_made], pos[:n_made]


#: bytes of the texts whose proxy plans a model keeps (``TokenModel.drafts``)
_TEXT_BYTES_KEPT = 1 << 20
#: proxy contexts a text keeps made (and as many along its tokenization)
_PROXIES_KEPT = 64
#: most beams read in lockstep whose step drafts (more keep ranked guesses)
MAX_DRAFTING_BEAMS = 4
#: the draft's beam width for a beam without one (``K=None``)
_UNBOUNDED_K = 64
