"""Phases 1 and 2 of a step (see :mod:`genlm_bytes_potential.beam`): every candidate of
every beam reads its beam's byte (moving to the child node, ``w += log M(n·b) - log
M(n)``), the beams are pruned (threshold, K, and the full-support rule) and the finite
extensions of the kept candidates are chosen, flat over all beams (numba kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lm_state import LMState, MassRows
from .core import Beam, _Flat, _grouped_logsumexp, _njit, _rows_by_mode


@dataclass(frozen=True)
class _Step:
    """A step's read (phase 1), flat over the candidates of all beams that read their
    byte (grouped by beam), and its pruning and extensions (phase 2).

    Read: ``bid``, ``nodes`` after the byte, ``weights``, ``rows`` in the step's mode;
    ``ext_weights``: the extension weight of every leaf below those nodes. Pruned:
    ``keep`` (indices, grouped by beam), the kept candidates' ``states``, and per beam
    ``log_read`` (log W(x·b) before pruning), ``log_total`` (after) and ``pruned`` (the
    share dropped). Extensions: the kept candidates' finite ones (``ext``: indices into the
    leaves, grouped by beam, with their beam ``ext_bid``), ``made`` (those made), the new
    ``ext_states`` of the made ones in order, and per beam ``log_skipped`` (log weight of
    those not made)."""

    bid: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    rows: MassRows
    states: list[LMState]  # of the kept candidates
    ext_weights: np.ndarray
    keep: np.ndarray
    log_read: np.ndarray
    log_total: np.ndarray
    pruned: np.ndarray
    ext: np.ndarray
    ext_bid: np.ndarray
    made: np.ndarray
    ext_states: list[LMState]
    log_skipped: np.ndarray


async def _read_and_prune(beams: list[Beam], next_bytes: list[int], modes: list[bool]) -> _Step | None:
    """Phases 1-2 of a step, flat over all beams: each candidate reads its beam's byte
    (``w += log M(n·b) - log M(n)``, the leaves at the new node get their extension
    weights; one gather for all of it), then prune (threshold, K heaviest, and the
    full-support rule) and choose the extensions. None when rows went stale while the step
    awaited the LM (the caller retries)."""
    model, trie = beams[0].model, beams[0].model.trie
    flat = _Flat(beams)
    beam_byte = np.array(next_bytes, np.int64)
    ok, child, owner, leaf, g_slot, g_node = _read_plan(
        flat.nodes,
        flat.bid,
        beam_byte,
        flat.rows.slot,
        trie.child_ptr,
        trie.child_label,
        trie.child_node,
        trie.n_leaves,
    )
    bid = flat.bid[ok]
    rows = flat.rows.take(ok)
    target = await _rows_in_mode(model, beams, modes, bid, rows, flat, ok, next_bytes)
    if target is not rows:
        if not (model.store.valid(rows).all() and model.store.valid(target).all()):
            return None
        g_slot = np.concatenate([target.slot, rows.slot, target.slot[owner]])
    m = model.log_mass(g_slot, g_node)
    K = np.array([beam.params.K if beam.params.K is not None else -1 for beam in beams], np.int64)
    log_thr = np.array([beam.params.log_threshold for beam in beams])
    w, ext_w, keep, log_read, log_total, pruned, ext, ext_owner, made = _select(
        bid, flat.weights[ok], owner, m, K, log_thr, len(beams)
    )
    ext_bid = bid[keep][ext_owner]
    tokens = trie.leaf_token[leaf[ext]]
    kstates = flat.states_at(ok[keep])
    ext_states = [model.extend(kstates[o], t) for o, t in zip(ext_owner[made].tolist(), tokens[made].tolist())]
    if model.canonical and ext_states:  # commit only canonical token sequences
        canon = np.array([model.is_canonical(s.tokens) for s in ext_states], bool)
        made[np.flatnonzero(made)[~canon]] = False
        ext_states = [s for s, c in zip(ext_states, canon) if c]
    skipped = ~made
    return _Step(
        bid=bid,
        nodes=child,
        weights=w,
        rows=target,
        states=kstates,
        ext_weights=ext_w,
        keep=keep,
        log_read=log_read,
        log_total=log_total,
        pruned=pruned,
        ext=ext,
        ext_bid=ext_bid,
        made=made,
        ext_states=ext_states,
        log_skipped=_grouped_logsumexp(ext_bid[skipped], ext_w[ext[skipped]], len(beams)),
    )


@_njit
def _read_plan(nodes, bid, beam_byte, slot, child_ptr, child_label, child_node, n_leaves):
    """Which candidates read their beam's byte (``ok``), their new nodes, the leaves below
    those (``leaf``, with the index of its candidate among the readers, ``owner``), and
    what to gather, on rows ``slot``: the new nodes' masses, the old nodes', the leaves'."""
    n = len(nodes)
    ok = np.empty(n, np.int64)
    child = np.empty(n, np.int64)
    n_ok = n_leaf = 0
    for i in range(n):
        lo, hi = child_ptr[nodes[i]], child_ptr[nodes[i] + 1]
        p = lo + np.searchsorted(child_label[lo:hi], beam_byte[bid[i]])
        if p < hi and child_label[p] == beam_byte[bid[i]]:
            ok[n_ok], child[n_ok] = i, child_node[p]
            n_leaf += n_leaves[child_node[p]]
            n_ok += 1
    ok, child = ok[:n_ok], child[:n_ok]
    owner = np.empty(n_leaf, np.int64)
    leaf = np.empty(n_leaf, np.int64)
    g_slot = np.empty(2 * n_ok + n_leaf, np.int64)
    g_node = np.empty(2 * n_ok + n_leaf, np.int64)
    k = 0
    for r in range(n_ok):
        g_slot[r] = g_slot[n_ok + r] = slot[ok[r]]
        g_node[r], g_node[n_ok + r] = child[r], nodes[ok[r]]
        for j in range(n_leaves[child[r]]):
            owner[k], leaf[k] = r, child[r] + 1 + j
            g_slot[2 * n_ok + k], g_node[2 * n_ok + k] = slot[ok[r]], child[r] + 1 + j
            k += 1
    return ok, child, owner, leaf, g_slot, g_node


@_njit
def _select(bid, prev_w, owner, m, K, log_thr, n_beams):
    """Phase 2 on the gathered log-masses ``m`` (new nodes, old nodes, leaves; see
    ``_read_plan``), per beam (``bid`` grouped): weights ``w = prev_w + m_child - m_node``
    and extension weights ``w + m_leaf - m_child``; prune: drop candidates below the
    threshold share of ``W(x·b)``, keep the ``K`` heaviest (K < 0: all; ties by order),
    and (full support) the heaviest candidate with a finite extension when no kept one
    has one; extensions: the kept candidates' finite ones, made when past the threshold
    share of the kept weight, and the heaviest always.

    Returns ``w``, the extension weights, ``keep`` (grouped by beam, heaviest first, the
    rescued candidate last), per beam ``log_read``, ``log_total`` and the pruned share,
    the kept candidates' finite extensions (leaf indices ``ext``, their index into
    ``keep``, ``made``)."""
    n, n_leaf = len(bid), len(owner)
    w = np.empty(n)
    for i in range(n):
        w[i] = prev_w[i] + m[i] - m[n + i]
    ext_w = np.empty(n_leaf)
    can_extend = np.zeros(n, np.bool_)
    for j in range(n_leaf):
        ext_w[j] = w[owner[j]] + m[2 * n + j] - m[owner[j]]
        if np.isfinite(ext_w[j]):
            can_extend[owner[j]] = True
    log_read = np.full(n_beams, -np.inf)
    log_total = np.full(n_beams, -np.inf)
    pruned = np.zeros(n_beams)
    keep = np.empty(n, np.int64)
    n_keep = 0
    lo = 0
    for g in range(n_beams):
        hi = lo
        while hi < n and bid[hi] == g:
            hi += 1
        finite = np.flatnonzero(np.isfinite(w[lo:hi])) + lo
        lr = _logsumexp_at(w, finite)
        log_read[g] = lr
        passes = finite[w[finite] - lr > log_thr[g]]
        order = passes[np.argsort(-w[passes], kind="mergesort")]
        if K[g] >= 0:
            order = order[: K[g]]
        k0 = n_keep
        has_ext = False
        for i in order:
            keep[n_keep] = i
            n_keep += 1
            has_ext = has_ext or can_extend[i]
        if not has_ext:
            best = -1
            for i in finite:
                if can_extend[i] and (best < 0 or w[i] > w[best]):
                    best = i
            if best >= 0:
                keep[n_keep] = best
                n_keep += 1
        lt = _logsumexp_at(w, keep[k0:n_keep])
        log_total[g] = lt
        if np.isfinite(lr):
            pruned[g] = -np.expm1(lt - lr)
        lo = hi
    keep = keep[:n_keep]
    pos = np.full(n, -1)
    for k in range(n_keep):
        pos[keep[k]] = k
    ext = np.empty(n_leaf, np.int64)
    n_ext = 0
    for j in range(n_leaf):  # leaves are grouped by candidate, so by beam
        if pos[owner[j]] >= 0 and np.isfinite(ext_w[j]):
            ext[n_ext] = j
            n_ext += 1
    ext = ext[:n_ext]
    ext_owner = pos[owner[ext]]
    made = np.empty(n_ext, np.bool_)
    lo = 0
    while lo < n_ext:
        g = bid[owner[ext[lo]]]
        hi, best, any_made = lo, lo, False
        while hi < n_ext and bid[owner[ext[hi]]] == g:
            e = ext_w[ext[hi]]
            made[hi] = e - log_total[g] > log_thr[g]
            any_made = any_made or made[hi]
            if e > ext_w[ext[best]]:
                best = hi
            hi += 1
        if not any_made:
            made[best] = True
        lo = hi
    return w, ext_w, keep, log_read, log_total, pruned, ext, ext_owner, made


@_njit
def _logsumexp_at(values, idx):
    """``log sum exp(values[idx])``, as one group of ``_grouped_logsumexp``."""
    return _grouped_logsumexp(np.zeros(len(idx), np.int64), values[idx], 1)[0]


async def _rows_in_mode(
    model, beams, modes, bid, rows: MassRows, flat: _Flat, ok: np.ndarray, next_bytes: list[int]
) -> MassRows:
    """The rows of the candidates ``ok`` of ``flat`` (beams ``bid``, rows ``rows``) in their
    step's mode: their own rows, except for beams read in the other mode (the last byte of
    a prompt), whose contexts get rows in the new mode (the bytes each candidate reads in
    them, its token's bytes so far and the byte, known ahead)."""
    if all(m == b.with_eos for m, b in zip(modes, beams)):
        return rows
    switch = np.array([m != b.with_eos for m, b in zip(modes, beams)])
    moved = np.flatnonzero(switch[bid])
    if not len(moved):
        return rows
    target = MassRows(rows.slot.copy(), rows.gen.copy())
    states = flat.states_at(ok[moved])
    prefix_of = model.trie.prefix_of
    ahead = {
        s: prefix_of[n] + bytes([next_bytes[b]])
        for s, n, b in zip(states, flat.nodes[ok[moved]].tolist(), bid[moved].tolist())
        if next_bytes[b] < 256
    }
    new = await _rows_by_mode(model, states, [modes[b] for b in bid[moved].tolist()], ahead=ahead)
    target.slot[moved], target.gen[moved] = new.slot, new.gen
    return target
