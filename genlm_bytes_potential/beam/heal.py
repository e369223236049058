"""Token healing (not part of ``q``): when no candidate can read a byte, re-tokenize the
end of one candidate so the beam carries on (see :mod:`genlm_bytes_potential.beam`)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..lm_state import LMState, MassRows, TokenModel
from ..trie import EOS
from .core import Beam, BeamStats, _ensure, _log_minus, _logsumexp


def _empty(beam: Beam, mode: bool, stats: BeamStats) -> Beam:
    return Beam(
        model=beam.model,
        params=beam.params,
        nodes=np.zeros(0, np.int64),
        weights=np.zeros(0),
        states=(),
        rows=MassRows.empty(),
        logp=-math.inf,
        log_total=-math.inf,
        log_norm=-math.inf,
        with_eos=mode,
        stats=stats,
    )


async def _empty_or_healed(beam: Beam, b: int, mode: bool, stats: BeamStats) -> Beam:
    if beam.params.heal and not beam.is_empty and b != EOS:
        healed = await _heal(beam, b, mode)
        if healed is not None:
            node, weight, state, calls = healed
            return await _expand_single(
                beam,
                node,
                weight,
                state,
                mode,
                replace(
                    stats,
                    heals=stats.heals + 1,
                    lm_calls=stats.lm_calls + calls,
                    lm_contexts=stats.lm_contexts + calls,
                ),
            )
    return _empty(beam, mode, stats)


async def _host_row(model: TokenModel, state: LMState, mode: bool) -> np.ndarray:
    """One context's whole mass row, as a host copy (healing reads rows whole)."""
    rows = await model.rows([state], mode)
    return np.array(model.store.row(int(rows.slot[0])))


async def _heal(beam: Beam, b: int, mode: bool):
    """Token healing for a byte no candidate can read: for candidates by decreasing
    weight, back off k bytes into the current token (longest prefix first), commit the
    token spelled by the rest, replay the backed-off bytes and ``b`` from the root,
    committing again when stuck (at most ``heal_max_splits`` times). Returns
    (node, weight, state, LM calls) of the first success, else None. Reads host copies
    of the candidates' rows, taken before any LM call."""
    trie, model, params = beam.model.trie, beam.model, beam.params
    await _ensure([beam])
    copies = [np.array(model.store.row(int(s))) for s in beam.rows.slot.tolist()]
    calls = 0
    for i in np.argsort(-beam.weights, kind="stable").tolist():
        partial = beam.partial(i)
        masses = copies[i]
        with np.errstate(divide="ignore"):
            base = beam.weights[i] - math.log(masses[beam.nodes[i]]) if masses[beam.nodes[i]] > 0 else -math.inf
        min_k = 0 if params.heal_max_backoff is None else max(0, len(partial) - params.heal_max_backoff)
        for k in range(len(partial), min_k - 1, -1):
            node_k = trie.node_of(partial[:k])
            for leaf in range(node_k + 1, node_k + 1 + int(trie.n_leaves[node_k])):
                if masses[leaf] <= 0 or not np.isfinite(base):
                    continue
                weight = base + math.log(masses[leaf])
                state = model.extend(beam.states[i], int(trie.leaf_token[leaf]))
                row = await _host_row(model, state, mode)
                calls += 1
                node, weight, state, more = await _replay(
                    model, params, partial[k:] + bytes([b]), state, row, weight, mode
                )
                calls += more
                if node is not None:
                    return node, weight, state, calls
    return None


async def _replay(model, params, data: bytes, state, masses, weight, mode):
    """Read ``data`` from the root of ``state``; when stuck, commit a token ending at the
    current node (at most ``heal_max_splits`` times) and continue. Returns (node, weight,
    state, LM calls), node None on failure."""
    trie = model.trie
    node, splits, calls = trie.root, 0, 0
    for byte in data:
        child = int(trie.child(np.array([node]), byte)[0])
        if child >= 0 and masses[child] > 0:
            weight += math.log(masses[child]) - math.log(masses[node])
            node = child
            continue
        if params.heal_max_splits is not None and splits >= params.heal_max_splits:
            return None, None, None, calls
        splits += 1
        for leaf in range(node + 1, node + 1 + trie.n_leaves[node]):
            if masses[leaf] <= 0:
                continue
            new_state = model.extend(state, int(trie.leaf_token[leaf]))
            new_masses = await _host_row(model, new_state, mode)
            calls += 1
            child = int(trie.child(np.array([trie.root]), byte)[0])
            if child >= 0 and new_masses[child] > 0:
                weight += math.log(masses[leaf]) - math.log(masses[node])
                weight += math.log(new_masses[child]) - math.log(new_masses[trie.root])
                state, masses, node = new_state, new_masses, child
                break
        else:
            return None, None, None, calls
    return node, weight, state, calls


async def _expand_single(beam: Beam, node, weight, state, mode, stats) -> Beam:
    """A beam of one healed candidate, extended like any other step (the threshold, and
    always the heaviest extension)."""
    model, trie = beam.model, beam.model.trie
    rows = await model.rows([state], mode)
    seed = Beam(
        model=model,
        params=beam.params,
        nodes=np.array([node]),
        weights=np.array([weight]),
        states=(state,),
        rows=rows,
        logp=beam.logp + weight - beam.log_total,
        log_total=weight,
        log_norm=weight,
        with_eos=mode,
        stats=stats,
    )
    owner, leaf = trie.leaves_of(seed.nodes)
    ew = weight + seed.log_mass_ratio(owner, leaf, seed.nodes[owner])
    finite = np.isfinite(ew)
    ok = finite & (ew - weight > beam.params.log_threshold)
    if finite.any() and not ok.any():
        ok[np.argmax(ew)] = True
    log_norm = _log_minus(weight, _logsumexp(ew[finite & ~ok]))
    new_states = [state.extend(trie.leaf_token[l]) for l in leaf[ok].tolist()]
    if not new_states:
        return replace(seed, log_norm=log_norm)
    new_rows = await model.rows(new_states, mode)
    n = len(new_states)
    return replace(
        seed,
        nodes=np.concatenate([seed.nodes, np.full(n, trie.root)]),
        weights=np.concatenate([seed.weights, ew[ok]]),
        states=seed.states + tuple(new_states),
        rows=rows.concat(new_rows),
        log_norm=log_norm,
        stats=replace(stats, lm_calls=stats.lm_calls + 1, lm_contexts=stats.lm_contexts + n),
    )
