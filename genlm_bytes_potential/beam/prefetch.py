"""Prefetching: when the bytes ahead are known, the contexts that reading them may ask
the LM for, computed in the LM call a step makes anyway (a guess for the LM's cache,
never part of the beam's arithmetic)."""

from __future__ import annotations

import numpy as np

from ..lm_state import LMState
from ..trie import EOS
from .core import Beam


def _prefetch(beams, next_bytes, ahead, requests, modes, req_bid) -> list[LMState]:
    """Contexts to compute in this step's LM call for the steps ahead (phase 3), when the
    step calls the LM anyway."""
    model = beams[0].model
    if ahead is None or not model.lookahead or not requests or not any(len(a) for a in ahead):
        return []
    mode = modes[int(req_bid[0])]
    if not model.would_call([s for s, b in zip(requests, req_bid.tolist()) if modes[b] == mode], mode):
        return []
    budget = model.max_prefetch - len(requests)
    out: list[LMState] = []
    for beam, b, more in zip(beams, next_bytes, ahead):
        if b != EOS and len(more) and budget > 0:
            extra = speculative_contexts(beam, bytes([b]) + bytes(more[: model.lookahead]), budget)
            out.extend(extra)
            budget -= len(extra)
    return out


def speculative_contexts(beam: Beam, data: bytes, limit: int, depth: int = 3) -> list[LMState]:
    """Token contexts that reading ``data`` from ``beam`` may ask the LM for, at most
    ``limit``, ranked by a guess of their weight.

    After reading ``data[:e]``, candidate ``c`` extends its state by a token spelled by its
    partial token and ``data[:e]``, with log weight ``w_c + log M_c(leaf) - log M_c(node_c)``
    (exact, before pruning); such a context extends again (up to ``depth`` tokens deep) by
    a token spelled by the bytes after it up to ``e``, its weight guessed as its parent's
    plus ``_LEVEL_PENALTY``. The rank is that weight plus ``_BYTE_PENALTY * e`` (the further
    ahead, the likelier pruned first); a child ranks below its parent, so the set is
    prefix-closed. Which contexts are asked for depends on pruning: this is a guess for the
    LM's cache, never part of the beam's arithmetic."""
    if limit <= 0 or beam.is_empty:
        return []
    trie = beam.model.trie
    n = len(data)
    # A found context is its parent (candidate i as -1 - i, or an earlier found context)
    # extended by the token of one leaf, spelled up to byte ``end`` of data. Contexts that
    # end at the same byte extend alike: by the tokens data spells from there (``spelled``).
    spelled: list[list[tuple[int, int]]] = []
    for start in range(n):
        found = []
        for end in range(start + 1, n + 1):
            leaves = trie.leaves_spelling(data[start:end])
            if leaves is None:
                break
            found.extend((end, leaf) for leaf in leaves)
        spelled.append(found)
    found: list[tuple[int, int, int, int]] = []  # (parent, leaf, level, end)
    for i in range(len(beam)):
        partial = trie.prefix_of[beam.nodes[i]]
        for end in range(1, n + 1):
            leaves = trie.leaves_spelling(partial + data[:end])
            if leaves is None:
                break
            found.extend((-1 - i, leaf, 1, end) for leaf in leaves)
    k = 0
    while k < len(found):  # breadth first: parents come before their children
        _, _, lev, start = found[k]
        if lev < depth and start < n:
            found.extend((k, leaf, lev + 1, end) for end, leaf in spelled[start])
        k += 1
    if not found:
        return []
    parent, leaf, level, ends = np.array(found, np.int64).T
    est = np.empty(len(found))
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
    for k, token in zip(keep.tolist(), trie.leaf_token[leaf[keep]].tolist()):
        src = found[k][0]
        states[k] = extend(beam.states[-1 - src] if src < 0 else states[src], token)
    return list(states.values())


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
