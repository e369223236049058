"""A step of several beams: :func:`advance` reads and prunes (:mod:`.read`), extends the
kept candidates by the tokens that end at their nodes (one LM batch and one trie batch for
all beams, with prefetched contexts, :mod:`.prefetch`), heals beams left empty
(:mod:`.heal`) and assembles the new beams; :func:`prefill` reads a prompt."""

from __future__ import annotations

import numpy as np

from ..lm_state import HeldCopy, MassRows
from ..trie import EOS
from .core import Beam, BeamStats, _check_byte, _ensure, _log_minus, _njit, _rows_by_mode
from .heal import _empty_or_healed
from .prefetch import _prefetch
from .read import _read_and_prune, _Step


async def advance(
    beams: list[Beam], next_bytes: list[int], with_eos: bool | None = None, ahead: list[bytes] | None = None
) -> list[Beam]:
    """Advance each beam by its byte: read, prune, extend. All beams are read and pruned
    as flat arrays, and all their extensions share one LM batch call and one trie batch.

    Args:
        beams: beams over the same model.
        next_bytes: one byte (0..255) or EOS (257) per beam.
        with_eos: EOS mode of the new beams; default: each beam's own. A beam read in
            the other mode switches its candidates to their contexts' masses in that mode.
        ahead: per beam, bytes known to follow its byte. With the model's ``lookahead``
            on, a step that calls the LM also asks for the contexts that reading them
            may need (:func:`speculative_contexts`); results are unchanged.
    """
    if len(beams) != len(next_bytes):
        raise ValueError(f"{len(beams)} beams but {len(next_bytes)} bytes; expected one byte per beam")
    if not all(type(b) is int and (0 <= b <= 255 or b == EOS) for b in next_bytes):
        next_bytes = [_check_byte(b) for b in next_bytes]  # raises, naming the bad byte
    if not beams:
        return []
    model = beams[0].model
    modes = [beam.with_eos if with_eos is None else with_eos for beam in beams]
    step = None
    while step is None:  # None: rows went stale while the mode switch awaited the LM
        await _ensure(beams)
        step = await _read_and_prune(beams, next_bytes, modes)
    ext_bid = step.ext_bid[step.made]
    fronts = _fetch_fronts(model, step, ahead)
    prefetch = await _prefetch(beams, next_bytes, ahead, step.ext_states, modes, ext_bid)
    known = dict(prefetch)  # bytes known to follow each new context
    if ahead is not None:
        known.update((s, ahead[b]) for s, b in zip(step.ext_states, ext_bid.tolist()) if len(ahead[b]))
    calls_before = model.stats.batch_calls
    ext_modes = [modes[b] for b in ext_bid.tolist()]
    ext_rows = await _rows_by_mode(model, step.ext_states, ext_modes, list(prefetch), known)
    calls = model.stats.batch_calls - calls_before
    if fronts is not None:
        await model.store.hold(fronts)
    return await _assemble(beams, next_bytes, modes, step, ext_bid, ext_rows, calls)


def _fetch_fronts(model, step: _Step, ahead: list[bytes] | None) -> HeldCopy | None:
    """On a full-rows table (a GPU's), start copying the masses that the next step of the
    kept candidates of beams whose next byte is unknown reads (``TokenByteTrie.front_nodes``;
    new candidates at the root have them in their rows' root fronts): they travel while
    the LM runs, so that the next-byte distribution and the next read copy nothing."""
    store = model.store
    if isinstance(store.table, np.ndarray) or not len(step.keep):
        return None
    kept = step.keep
    if ahead is not None:
        unknown = np.fromiter((len(a) == 0 for a in ahead), bool, len(ahead))
        kept = kept[unknown[step.bid[kept]]]
    slots, nodes = model.trie.front_nodes(step.rows.slot[kept], step.nodes[kept])
    return store.fetch(slots, nodes) if len(slots) else None


async def _assemble(beams, next_bytes, modes, step: _Step, ext_bid, ext_rows: MassRows, calls: int) -> list[Beam]:
    """Phase 4: the new beams, each its kept candidates then its extensions, as slices of
    one flat layout."""
    model = beams[0].model
    kbid = step.bid[step.keep]
    start, kpos, epos = _layout(kbid, ext_bid, len(beams))
    total = int(start[-1])
    nodes = np.full(total, model.trie.root, np.int64)  # extensions start at the root
    nodes[kpos] = step.nodes[step.keep]
    weights = np.empty(total)
    weights[kpos] = step.weights[step.keep]
    weights[epos] = step.ext_weights[step.ext[step.made]]
    slot, gen = np.empty(total, np.int64), np.empty(total, np.int64)
    slot[kpos], gen[kpos] = step.rows.slot[step.keep], step.rows.gen[step.keep]
    slot[epos], gen[epos] = ext_rows.slot, ext_rows.gen
    k_start = np.searchsorted(kbid, np.arange(len(beams) + 1)).tolist()
    e_start = np.searchsorted(ext_bid, np.arange(len(beams) + 1)).tolist()
    start = start.tolist()
    log_read, log_total = step.log_read.tolist(), step.log_total.tolist()
    pruned, log_skipped = step.pruned.tolist(), step.log_skipped.tolist()
    out = []
    for j, (beam, b) in enumerate(zip(beams, next_bytes)):
        k0, k1, e0, e1 = k_start[j], k_start[j + 1], e_start[j], e_start[j + 1]
        s = beam.stats
        stats = BeamStats(
            s.pruned_mass + pruned[j], s.heals, s.lm_calls + (calls if e1 > e0 else 0), s.lm_contexts + e1 - e0
        )
        if k0 == k1:
            out.append(await _empty_or_healed(beam, b, modes[j], stats))
            continue
        lo, hi = start[j], start[j + 1]
        out.append(
            Beam(
                model=model,
                params=beam.params,
                nodes=nodes[lo:hi],
                weights=weights[lo:hi],
                states=tuple(step.states[k0:k1]) + tuple(step.ext_states[e0:e1]),
                rows=MassRows(slot[lo:hi], gen[lo:hi]),
                logp=beam.logp + log_read[j] - beam.log_norm,
                log_total=log_total[j],
                log_norm=_log_minus(log_total[j], log_skipped[j]),
                with_eos=modes[j],
                stats=stats,
            )
        )
    return out


@_njit
def _layout(kbid, ebid, n_beams):
    """Positions in the new beams' flat layout (each beam: its kept candidates, then its
    extensions) of the kept candidates and extensions (both grouped by beam), and each
    beam's start (``n_beams + 1`` entries)."""
    count = np.zeros(n_beams + 1, np.int64)
    for g in kbid:
        count[g + 1] += 1
    for g in ebid:
        count[g + 1] += 1
    start = np.cumsum(count)
    kpos = np.empty(len(kbid), np.int64)
    epos = np.empty(len(ebid), np.int64)
    fill = start[:-1].copy()
    for i in range(len(kbid)):
        kpos[i] = fill[kbid[i]]
        fill[kbid[i]] += 1
    for i in range(len(ebid)):
        epos[i] = fill[ebid[i]]
        fill[ebid[i]] += 1
    return start, kpos, epos


async def prefill(beam: Beam, data: bytes, with_eos: bool = True) -> Beam:
    """Read ``data`` (e.g. a prompt) with EOS tokens as ordinary text; the step that reads
    its last byte switches every candidate to mode ``with_eos``, ready for generation."""
    for i, b in enumerate(data):
        (beam,) = await advance(
            [beam], [b], with_eos=with_eos if i == len(data) - 1 else False, ahead=[memoryview(data)[i + 1 :]]
        )
    return beam
