"""Prefetching: when the bytes ahead are known, the contexts that reading them may ask
the LM for, computed in the LM call a step makes anyway (a guess for the LM's cache,
never part of the beam's arithmetic)."""

from __future__ import annotations

import numpy as np

from ..lm_state import LMState
from ..trie import EOS, child_by_byte
from .core import Beam, _grown, _njit
from .draft import MAX_DRAFTING_BEAMS, compute_stand_ins, drafted_contexts


async def _prefetch(beams, next_bytes, ahead, requests, modes, req_bid) -> dict[LMState, memoryview]:
    """Contexts to compute in this step's LM call for the steps ahead (phase 3), when the
    step calls the LM anyway, in rank order, each with the bytes known to follow it. A
    step of at most ``MAX_DRAFTING_BEAMS`` beams drafts (:func:`~.draft.drafted_contexts`,
    with the model's ``draft_window``) for each beam whose text is known as a ``bytes``
    object: each within its share of ``4 * max_prefetch`` per drafting beam, their first
    stand-ins in one call. Other beams, and the beams of larger steps, take ranked guesses
    (:func:`speculative_contexts`): drafts for every beam took ``batch_score`` of 4
    documents from 1,046 to 1,592 B/s, but of 16 from 3,069 to ~700 and of 64 from 4,227
    to 347-650 on an H200 (benchmarks/HISTORY.md, session 28)."""
    model = beams[0].model
    if ahead is None or not model.lookahead or not requests or not any(len(a) for a in ahead):
        return {}
    mode = modes[int(req_bid[0])]
    if not model.would_call([s for s, b in zip(requests, req_bid.tolist()) if modes[b] == mode], mode):
        return {}
    drafting = bool(model.draft_window) and len(beams) <= MAX_DRAFTING_BEAMS
    texts = [  # per beam, its text and the byte read, where it drafts
        (more.obj, len(more.obj) - len(more) - 1)
        if drafting and b != EOS and len(more) and isinstance(more, memoryview) and isinstance(more.obj, bytes)
        else None
        for b, more in zip(next_bytes, ahead)
    ]
    drafts = [(beam, *t) for beam, t in zip(beams, texts) if t is not None]
    if len(drafts) > 1:
        await compute_stand_ins(drafts)
    budget = (4 * len(drafts) if drafts else 1) * model.max_prefetch - len(requests)
    out: dict[LMState, memoryview] = {}
    left = len(drafts)  # beams still to draft: each within its share of the budget left
    for beam, b, more, known in zip(beams, next_bytes, ahead, texts):
        if b == EOS or not len(more) or budget <= 0:
            continue
        drafted = None
        if known is not None:
            drafted = await drafted_contexts(beam, *known, budget // left)
            left -= 1
        if drafted is not None:
            for state, rest in drafted.items():
                out.setdefault(state, rest)
            budget -= len(drafted)
        else:
            extra = speculative_contexts(beam, bytes([b]) + bytes(more[: model.lookahead]), budget)
            more = memoryview(more)
            for state, end in extra.items():  # it read b and more[: end - 1]
                out.setdefault(state, more[end - 1 :])
            budget -= len(extra)
    return out


def speculative_contexts(beam: Beam, data: bytes, limit: int, depth: int = 3) -> dict[LMState, int]:
    """Token contexts that reading ``data`` from ``beam`` may ask the LM for, at most
    ``limit``, ranked by a guess of their weight (in that order), each with the bytes of
    ``data`` it has read (its tokens end there).

    After reading ``data[:e]``, candidate ``c`` extends its state by a token spelled by its
    partial token and ``data[:e]``, with log weight ``w_c + log M_c(leaf) - log M_c(node_c)``
    (exact, before pruning); such a context extends again (up to ``depth`` tokens deep) by
    a token spelled by the bytes after it up to ``e``, its weight guessed as its parent's
    plus ``_LEVEL_PENALTY``. The rank is that weight plus ``_BYTE_PENALTY * e`` (the further
    ahead, the likelier pruned first); a child ranks below its parent, so the set is
    prefix-closed. Which contexts are asked for depends on pruning: this is a guess for the
    LM's cache, never part of the beam's arithmetic."""
    if limit <= 0 or beam.is_empty:
        return {}
    trie = beam.model.trie
    parent, leaf, level, ends = spelled_contexts(trie, beam.nodes, data, depth)
    if not len(parent):
        return {}
    est = np.empty(len(parent))
    first = np.flatnonzero(level == 1)
    cand = -1 - parent[first]
    est[first] = beam.weights[cand] + beam.log_mass_ratio(cand, leaf[first], beam.nodes[cand])
    for lev in range(2, depth + 1):
        sel = np.flatnonzero(level == lev)
        est[sel] = est[parent[sel]] + _LEVEL_PENALTY
    rank = est + _BYTE_PENALTY * ends
    keep = np.sort(np.argsort(-rank, kind="stable")[:limit])
    keep = keep[np.isfinite(est[keep])]
    states: dict[int, LMState] = {}  # kept contexts' parents rank above them: kept too
    extend = beam.model.extend
    for k, src, token in zip(keep.tolist(), parent[keep].tolist(), trie.leaf_token[leaf[keep]].tolist()):
        states[k] = extend(beam.states[-1 - src] if src < 0 else states[src], token)
    return dict(zip(states.values(), ends[list(states)].tolist()))


def spelled_contexts(trie, nodes: np.ndarray, data: bytes, depth: int) -> tuple[np.ndarray, ...]:
    """The contexts ``speculative_contexts`` ranks, breadth first (parents before their
    children), as arrays ``(parent, leaf, level, end)``: a context is its parent
    (candidate ``i``, at trie node ``nodes[i]``, as ``-1 - i``, or an earlier context)
    extended by the token of one leaf, spelled up to byte ``end`` of ``data``. Level 1:
    each candidate's partial token continued by ``data[:end]``; a context of level <
    ``depth`` ending before the data does extends by every token the data spells from its
    end (the same for all contexts ending there, computed once per start)."""
    return _spelled_contexts(
        nodes,
        np.frombuffer(data, np.uint8),
        depth,
        trie.root,
        trie.child_ptr,
        trie.child_label,
        trie.child_node,
        trie.n_leaves,
    )


@_njit
def _spelled_contexts(cand_nodes, data, depth, root, child_ptr, child_label, child_node, n_leaves):
    """``spelled_contexts`` over the trie's flat arrays."""
    n = len(data)
    # per start byte, the (end, leaf) pairs spelled from there: sp_end/sp_leaf[sp_ptr[s]:sp_ptr[s + 1]]
    sp_end, sp_leaf = np.empty(16, np.int64), np.empty(16, np.int64)
    sp_ptr = np.zeros(n + 1, np.int64)
    m = 0
    for start in range(n):
        node = root
        for end in range(start + 1, n + 1):
            node = child_by_byte(node, data[end - 1], child_ptr, child_label, child_node)
            if node < 0:
                break
            for j in range(n_leaves[node]):
                if m == len(sp_end):
                    sp_end, sp_leaf = _grown(sp_end), _grown(sp_leaf)
                sp_end[m], sp_leaf[m] = end, node + 1 + j
                m += 1
        sp_ptr[start + 1] = m
    parent, leaf, level, ends = (
        np.empty(64, np.int64),
        np.empty(64, np.int64),
        np.empty(64, np.int64),
        np.empty(64, np.int64),
    )
    k = 0
    for i in range(len(cand_nodes)):
        node = cand_nodes[i]
        for end in range(1, n + 1):
            node = child_by_byte(node, data[end - 1], child_ptr, child_label, child_node)
            if node < 0:
                break
            for j in range(n_leaves[node]):
                if k == len(parent):
                    parent, leaf, level, ends = _grown(parent), _grown(leaf), _grown(level), _grown(ends)
                parent[k], leaf[k], level[k], ends[k] = -1 - i, node + 1 + j, 1, end
                k += 1
    q = 0
    while q < k:  # breadth first: parents come before their children
        start = ends[q]
        if level[q] < depth and start < n:
            for r in range(sp_ptr[start], sp_ptr[start + 1]):
                if k == len(parent):
                    parent, leaf, level, ends = _grown(parent), _grown(leaf), _grown(level), _grown(ends)
                parent[k], leaf[k], level[k], ends[k] = q, sp_leaf[r], level[q] + 1, sp_end[r]
                k += 1
        q += 1
    return parent[:k], leaf[:k], level[:k], ends[:k]


# Rank of a speculative context (see speculative_contexts), in nats. Chosen on SmolLM2
# scoring of benchmarks/data/heldout.txt, by the LM work it leaves: forward passes and
# contexts computed, priced as on an H200 (W1, K=8: ~1.9 ms a call and ~0.11 ms a
# context, fitted to the session-7 prefetch sweep; benchmarks/HISTORY.md, session 7).
# The defaults of 4 bytes and 64 contexts a call (TokenModel) were 1.17x the older 6
# and 128 there. A level penalty of -10 instead of -2 ranks the contexts one token past
# a candidate, further ahead, above deeper guesses: on the whole text at K=8 (2-core CPU,
# fp32) 598 instead of 759 forward passes and 28,145 instead of 30,340 contexts (1.13x
# by those prices; 14.0 vs 11.2 B/s on that CPU); at K=5 on 600 bytes 132 vs 137 passes.
_LEVEL_PENALTY = -10.0
_BYTE_PENALTY = -3.0
