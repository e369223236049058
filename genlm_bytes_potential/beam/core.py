"""The beam's types and what a beam says by itself: :class:`Beam` (candidates as flat
arrays, pointing at rows of the model's mass store), its parameters and counters, the
first beam, and the next-byte distribution ``q(. | x)`` of many beams at once (numba kernels
over the candidates' children, reading host weight rows in place, or one gather of masses
from a device table)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate
from numbers import Integral, Real

import numba
import numpy as np

from ..lm_state import LMState, MassRows, TokenModel
from ..trie import EOS, mass_in_row

N_OUTCOMES = 257  # bytes 0..255, then EOS

_njit = numba.njit(cache=True, nogil=True)


def _check_byte(b) -> int:
    if isinstance(b, bool) or not isinstance(b, Integral):
        raise TypeError(f"byte {b!r} has type {type(b).__name__}; expected an int in 0..255 or EOS (257)")
    if not (0 <= b <= 255 or b == EOS):
        raise ValueError(f"byte {b!r} is outside 0..255 and is not EOS (257)")
    return int(b)


@dataclass(frozen=True)
class BeamParams:
    """Beam parameters.

    Args:
        K: beam width, the most candidates kept after each byte; ``None`` for no limit.
        prune_threshold: drop candidates whose share of the beam's weight is below this
            (0 keeps all).
        heal: re-tokenize when a byte cannot be read (see the module docstring).
        heal_max_backoff: most bytes a healing may back off into the current token.
        heal_max_splits: most extra token commits while a healing replays bytes.
    """

    K: int | None = 8
    prune_threshold: float = 0.0
    heal: bool = True
    heal_max_backoff: int | None = None
    heal_max_splits: int | None = None

    def __post_init__(self):
        if self.K is not None:
            if isinstance(self.K, bool) or not isinstance(self.K, Integral):
                raise TypeError(f"K={self.K!r} has type {type(self.K).__name__}; expected an int >= 1 or None")
            if self.K < 1:
                raise ValueError(f"K={self.K!r}; expected an int >= 1 or None (no limit)")
        if isinstance(self.prune_threshold, bool) or not isinstance(self.prune_threshold, Real):
            raise TypeError(f"prune_threshold={self.prune_threshold!r}; expected a float in [0, 1)")
        if not 0 <= self.prune_threshold < 1:
            raise ValueError(f"prune_threshold={self.prune_threshold!r}; expected a float in [0, 1)")
        for name in ("heal_max_backoff", "heal_max_splits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, Integral) or v < 0):
                raise ValueError(f"{name}={v!r}; expected an int >= 0 or None (no limit)")

    @property
    def log_threshold(self) -> float:
        return math.log(self.prune_threshold) if self.prune_threshold > 0 else -math.inf


@dataclass(slots=True)
class BeamStats:
    """Diagnostics accumulated along the bytes a beam has read (never changed once made:
    each step makes new ones).

    Attributes:
        pruned_mass: probability share of the beam's weight dropped by pruning, summed
            over steps.
        heals: steps that needed token healing. With full support (module docstring)
            only a byte that begins no token, or a step whose extensions canonical
            filtering removed, needs it: on byte-complete vocabularies it stays 0.
        lm_calls: LM batch calls made by the steps that built this beam (a batch shared
            by several beams counts for each).
        lm_contexts: token contexts whose next-token distribution those calls computed.
    """

    pruned_mass: float = 0.0
    heals: int = 0
    lm_calls: int = 0
    lm_contexts: int = 0


@dataclass(eq=False, slots=True)
class Beam:
    """Candidates for a byte prefix (see the module docstring). A beam is never changed
    once made (each step makes new ones; cached beams are shared): not frozen only because
    a frozen dataclass of its 12 fields costs ~1.2 µs more to build (1.8 vs 0.6 µs), once
    per particle and byte.

    Attributes:
        nodes, weights: trie node and log weight of each candidate.
        states: LM state of each candidate.
        rows: where each candidate's masses live (rows of ``model.store`` in the beam's
            EOS mode).
        logp: log-probability of the bytes read so far (sum of conditionals).
        log_total: log of the candidates' total weight before extension, ``log W(x)``.
        log_norm: ``log sum_a W(x·a)``, the normalizer of ``q(· | x)``: ``W(x)`` less the
            extensions not made (``sum_a M_c(n·a) = M_c(n) - sum of M_c(leaves at n)``
            turns the sum over outcomes into one over candidates).
        with_eos: whether EOS tokens end the byte string (False during prefill).
    """

    model: TokenModel
    params: BeamParams
    nodes: np.ndarray
    weights: np.ndarray
    states: tuple[LMState, ...]
    rows: MassRows
    logp: float = 0.0
    log_total: float = 0.0
    log_norm: float = 0.0
    with_eos: bool = True
    stats: BeamStats = field(default_factory=BeamStats)
    _dist: list = field(default_factory=list, repr=False)  # memo of next_logprobs

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def is_empty(self) -> bool:
        return len(self.nodes) == 0

    def log_mass(self, cand: np.ndarray, node: np.ndarray) -> np.ndarray:
        """``log M_c(node)`` for candidate indices ``cand`` and nodes (same length)."""
        return self.model.log_mass(self.rows.slot[cand], node)

    def log_mass_ratio(self, cand: np.ndarray, node: np.ndarray, base: np.ndarray) -> np.ndarray:
        """``log M_c(node) - log M_c(base)``, both read in one gather."""
        m = self.log_mass(np.concatenate([cand, cand]), np.concatenate([node, base]))
        return m[: len(cand)] - m[len(cand) :]

    def next_logprobs(self) -> np.ndarray:
        """``log q(a | x)`` for a = 0..255 and EOS (index 256); all -inf when empty. The
        beam's rows must still be stored (``await next_byte_logprobs([beam])`` recomputes
        rows the store has reused)."""
        if not self._dist:
            if not self.model.store.valid(self.rows).all():
                raise RuntimeError(
                    "this beam's mass rows were reused by the model's store (mass_bytes too small "
                    "for the beams kept); use `await next_byte_logprobs([beam])`, which recomputes them"
                )
            self._dist.append(_next_logprobs([self])[0])
        return self._dist[0]

    @property
    def nbytes(self) -> int:
        """Bytes this beam holds: its candidate arrays and token contexts (masses live in
        the model's store, shared by every beam). A context is an ``LMState`` (48 bytes),
        its ``TokenContext`` (48 + 8 a token) and that tuple's attribute dict (184 bytes),
        counted once however many candidates share it; so are the contexts its
        ``TokenContext.prefix`` links keep (at most two: an upper bound, as other beams
        may hold those too)."""
        arrays = self.nodes.nbytes + self.weights.nbytes + self.rows.slot.nbytes + self.rows.gen.nbytes
        states = {id(s): s for s in self.states}
        contexts = {}
        for s in states.values():
            t = s.tokens
            while t is not None and id(t) not in contexts:
                contexts[id(t)] = t
                t = t.prefix
        return arrays + 48 * len(states) + sum(232 + 8 * len(t) for t in contexts.values())

    def partial(self, i: int) -> bytes:
        """Bytes of the token candidate ``i`` is in the middle of."""
        return self.model.trie.prefix_of[self.nodes[i]]

    def __repr__(self) -> str:
        vocab = self.model.lm.byte_vocab
        lines = [f"Beam(logp={self.logp:.4f}, {len(self)} candidates)"]
        for i in np.argsort(-self.weights)[:16]:
            toks = "|".join(repr(bytes(vocab[t]))[2:-1] for t in self.states[i].tokens[-6:])
            lines.append(f"  {self.weights[i]:9.4f}  ...{toks}|{self.partial(i)!r}")
        return "\n".join(lines)


async def next_byte_logprobs(beams: list[Beam]) -> np.ndarray:
    """``log q(· | x)`` of several beams, ``[len(beams), 257]``: rows the store reused are
    recomputed first, then every beam not yet memoized is done in one pass (``_next_logprobs``)."""
    if not beams:
        return np.zeros((0, N_OUTCOMES))
    await _ensure(beams)
    todo = list({id(b): b for b in beams if not b._dist}.values())  # a beam asked twice: once
    if todo:
        for beam, row in zip(todo, _next_logprobs(todo)):
            beam._dist.append(row)
    return np.stack([b._dist[0] for b in beams])


def _next_logprobs(beams: list[Beam]) -> np.ndarray:
    """Next-byte log-probs ``[len(beams), 257]`` of beams over one model, in one pass.

    ``W(x·a)`` sums, over candidates ``c``, ``exp(w_c) M_c(child_a) / M_c(node_c)`` (see
    ``_outcome_logprobs``). On host weight rows the masses are read inside the kernel
    (``_outcome_sums_in_rows``: no index arrays, no gather); sums that need the log-space
    redo, and device tables, go through one gather of all children's masses."""
    model, trie = beams[0].model, beams[0].model.trie
    flat = _Flat(beams)
    norm = np.array([b.log_norm for b in beams])
    table = model.store.table
    if isinstance(table, np.ndarray):
        top, acc, count = _outcome_sums_in_rows(
            table,
            flat.nodes,
            flat.rows.slot,
            flat.weights,
            flat.bid,
            len(beams),
            trie.child_ptr,
            trie.child_node,
            trie.child_label,
            trie.seg_lo,
            trie.seg_hi,
            trie.mass_col,
        )
        out, redo = _outcome_logs(acc, count, top)
        if not redo.any():
            return _less_norm(out, norm)
    owner, pos, g_slot, g_node = _children_plan(flat.nodes, flat.rows.slot, trie.child_ptr, trie.child_node)
    mass = model.store.gather(g_slot, g_node)
    return _outcome_logprobs(owner, trie.child_label[pos], mass, flat.weights, flat.bid, norm)


@_njit
def _grown(a):
    """``a`` in an array twice as long (the rest uninitialized)."""
    out = np.empty(2 * len(a), a.dtype)
    out[: len(a)] = a
    return out


@_njit
def _grouped_logsumexp(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """``out[g] = log sum exp(values[group == g])`` (-inf for an empty group), each group
    shifted by its own maximum; terms add in array order. A group's result does not depend
    on the other groups. A group of one value is that value (``log(exp(0)) == 0``
    exactly), so it skips the ``exp`` and ``log``."""
    shift = np.full(n_groups, -np.inf)
    count = np.zeros(n_groups, np.int64)
    for i in range(len(values)):
        g, v = group[i], values[i]
        count[g] += 1
        if v > shift[g] or v != v:  # NaN propagates, as np.maximum
            shift[g] = v
    out = shift.copy()
    for g in range(n_groups):
        if count[g] > 1:
            if not np.isfinite(shift[g]):
                shift[g] = 0.0
            out[g] = 0.0
    for i in range(len(values)):
        g = group[i]
        if count[g] > 1:
            out[g] += np.exp(values[i] - shift[g])
    for g in range(n_groups):
        if count[g] > 1:
            out[g] = np.log(out[g]) + shift[g]
    return out


@_njit
def _children_plan(nodes, slot, child_ptr, child_node):
    """The byte/EOS children of candidates at ``nodes`` (rows ``slot``), flattened: each
    child's candidate (``owner``) and position in the trie's child arrays, and what to
    gather: the children's masses, then the candidates' own nodes'."""
    n = len(nodes)
    total = 0
    for i in range(n):
        total += child_ptr[nodes[i] + 1] - child_ptr[nodes[i]]
    owner = np.empty(total, np.int64)
    pos = np.empty(total, np.int64)
    g_slot = np.empty(total + n, np.int64)
    g_node = np.empty(total + n, np.int64)
    k = 0
    for i in range(n):
        for p in range(child_ptr[nodes[i]], child_ptr[nodes[i] + 1]):
            owner[k], pos[k], g_slot[k], g_node[k] = i, p, slot[i], child_node[p]
            k += 1
    g_slot[total:] = slot
    g_node[total:] = nodes
    return owner, pos, g_slot, g_node


# A (beam, outcome) sum below this, in units of the beam's largest term, is redone in log
# space: terms lost to underflow could then matter.
_LINEAR_MIN = 1e-280


@_njit
def _outcome_logprobs(owner, label, mass, weights, bid, norm):
    """``log q(a | x)`` per beam and outcome, ``[len(norm), 257]``, from the gathered scaled
    masses (the children's, then the candidates' own nodes').

    ``W(x·a) = sum_c exp(w_c) M_c(child_a) / M_c(node_c)``, summed in linear space per beam:
    with ``s_c = w_c - log M_c(node_c)`` and ``S`` the beam's largest ``s_c``, ``log W(x·a)
    = S + log sum_c exp(s_c - S) M_c(child_a)`` (one exp per candidate, one log per
    outcome, every term at most the largest mass). A sum below ``_LINEAR_MIN`` (where
    underflow could lose terms) is recomputed in log space, shifted by its own maximum.
    Less the beam's normalizer."""
    n_child, nb = len(owner), len(norm)
    top, scale = _candidate_scales(mass[n_child:], weights, bid, nb)
    n_groups = nb * N_OUTCOMES
    acc = np.zeros(n_groups)
    count = np.zeros(n_groups, np.int64)
    key = np.empty(n_child, np.int64)
    for k in range(n_child):
        c = owner[k]
        g = bid[c] * N_OUTCOMES + (256 if label[k] == EOS else label[k])
        key[k] = g
        if mass[k] != 0.0:  # a zero mass adds nothing (in log space: -inf)
            acc[g] += scale[c] * mass[k]
            count[g] += 1
    out, redo = _outcome_logs(acc, count, top)
    if redo.any():
        sel = np.flatnonzero(redo[key])
        vals = np.empty(len(sel))
        for i in range(len(sel)):
            k = sel[i]
            vals[i] = weights[owner[k]] + np.log(mass[k]) - np.log(mass[n_child + owner[k]])
        redone = _grouped_logsumexp(key[sel], vals, n_groups)
        for g in range(n_groups):
            if redo[g]:
                out[g] = redone[g]
    return _less_norm(out, norm)


@_njit
def _outcome_sums_in_rows(
    table, nodes, slot, weights, bid, nb, child_ptr, child_node, child_label, seg_lo, seg_hi, mass_col
):
    """``_outcome_logprobs``'s per-beam sums (``top``, ``acc``, ``count``) with each mass
    read from the candidate's host weight row ``table[slot[c]]`` where it is used: the
    same terms, added in the same order."""
    n = len(nodes)
    own = np.empty(n)
    for c in range(n):
        own[c] = mass_in_row(table[slot[c]], nodes[c], seg_lo, seg_hi, mass_col)
    top, scale = _candidate_scales(own, weights, bid, nb)
    acc = np.zeros(nb * N_OUTCOMES)
    count = np.zeros(nb * N_OUTCOMES, np.int64)
    for c in range(n):
        row = table[slot[c]]
        base = bid[c] * N_OUTCOMES
        for p in range(child_ptr[nodes[c]], child_ptr[nodes[c] + 1]):
            m = mass_in_row(row, child_node[p], seg_lo, seg_hi, mass_col)
            if m != 0.0:
                g = base + (256 if child_label[p] == EOS else child_label[p])
                acc[g] += scale[c] * m
                count[g] += 1
    return top, acc, count


@_njit
def _candidate_scales(own_mass, weights, bid, nb):
    """Per beam the largest ``s_c = w_c - log M_c(node_c)`` (``top``), and each candidate's
    ``exp(s_c - top)`` (0 in a beam whose ``top`` is not finite)."""
    n = len(weights)
    s = np.empty(n)
    top = np.full(nb, -np.inf)
    for c in range(n):
        s[c] = weights[c] - np.log(own_mass[c])
        if s[c] > top[bid[c]]:
            top[bid[c]] = s[c]
    scale = np.zeros(n)
    for c in range(n):
        if np.isfinite(top[bid[c]]):
            scale[c] = np.exp(s[c] - top[bid[c]])
    return top, scale


@_njit
def _outcome_logs(acc, count, top):
    """``log acc + top`` per (beam, outcome) group with nonzero terms (``count``); -inf for
    a group without; ``redo`` marks sums below ``_LINEAR_MIN`` (or not finite: terms may
    have underflowed), left -inf here."""
    out = np.full(len(acc), -np.inf)
    redo = np.zeros(len(acc), np.bool_)
    for g in range(len(acc)):
        if count[g]:
            b = g // N_OUTCOMES
            if acc[g] >= _LINEAR_MIN and acc[g] < np.inf and np.isfinite(top[b]):
                out[g] = np.log(acc[g]) + top[b]
            else:
                redo[g] = True
    return out, redo


@_njit
def _less_norm(out, norm):
    """``out`` as ``[len(norm), 257]``, each beam's row less its finite normalizer."""
    out = out.reshape(len(norm), N_OUTCOMES)
    for b in range(len(norm)):
        if np.isfinite(norm[b]):
            out[b] -= norm[b]
    return out


class _Flat:
    """The candidates of several beams as flat arrays; ``bid`` is each one's beam. States
    are looked up only for the candidates that need them (``states_at``)."""

    __slots__ = ("beams", "nodes", "weights", "rows", "bid", "first")

    def __init__(self, beams: list[Beam]):
        self.beams = beams
        if len(beams) == 1:
            b = beams[0]
            self.nodes, self.weights, self.rows = b.nodes, b.weights, b.rows
            self.bid = np.zeros(len(b), np.int64)
            self.first = [0]
            return
        counts = [len(b) for b in beams]
        self.nodes = np.concatenate([b.nodes for b in beams])
        self.weights = np.concatenate([b.weights for b in beams])
        self.rows = MassRows(np.concatenate([b.rows.slot for b in beams]), np.concatenate([b.rows.gen for b in beams]))
        self.bid = np.repeat(np.arange(len(beams)), counts)
        self.first = [0, *accumulate(counts)]

    def __len__(self) -> int:
        return len(self.nodes)

    def states_at(self, idx: np.ndarray) -> list[LMState]:
        """The states of candidates ``idx``."""
        beams, first, bid = self.beams, self.first, self.bid
        return [beams[b].states[i - first[b]] for i, b in zip(idx.tolist(), bid[idx].tolist())]


async def _ensure(beams: list[Beam]) -> None:
    """Every candidate row of ``beams`` valid (rows the store reused are recomputed) and
    marked used. Recomputing awaits the LM, while which concurrent callers may reuse rows
    found valid before: so it checks again until all are valid with no await in between
    (a caller gathers right after, before the next allocation can reuse them)."""
    model = beams[0].model
    while True:
        if len(beams) == 1:
            rows = beams[0].rows
        else:
            rows = MassRows(np.concatenate([b.rows.slot for b in beams]), np.concatenate([b.rows.gen for b in beams]))
        if model.store.valid(rows).all():
            model.store.touch(rows.slot)
            return
        for mode in (False, True):
            group = [b for b in beams if b.with_eos == mode and len(b)]
            if not group:
                continue
            flat = _Flat(group)
            await model.ensure(flat.rows, flat.states_at(np.arange(len(flat))), mode)
            if len(group) > 1:  # _Flat copied the rows: write them back
                start = 0
                for b in group:
                    end = start + len(b)
                    b.rows.slot[:], b.rows.gen[:] = flat.rows.slot[start:end], flat.rows.gen[start:end]
                    start = end


async def initial_beam(
    model: TokenModel,
    params: BeamParams,
    prompt_tokens: tuple[int, ...] | list[int] = (),
    with_eos: bool = True,
    ahead: bytes = b"",
) -> Beam:
    """The beam before any byte: one candidate at the root after ``prompt_tokens``.
    ``ahead``: the bytes known to come first (a prompt; see ``TokenModel.rows``)."""
    state = model.initial_state(prompt_tokens)
    calls = model.stats.batch_calls
    rows = await model.rows([state], with_eos, ahead={state: ahead} if ahead else None)
    return Beam(
        model=model,
        params=params,
        nodes=np.array([model.trie.root]),
        weights=np.zeros(1),
        states=(state,),
        rows=rows,
        with_eos=with_eos,
        stats=BeamStats(lm_calls=model.stats.batch_calls - calls, lm_contexts=1),
    )


def _logsumexp(x: np.ndarray) -> float:
    if len(x) == 0:
        return -math.inf
    m = np.max(x)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(x - m))))


def _log_minus(a: float, b: float) -> float:
    """``log(exp(a) - exp(b))`` for ``b <= a`` (-inf when they are equal)."""
    if b == -math.inf:
        return a
    return a + math.log1p(-math.exp(b - a)) if b < a else -math.inf


async def _rows_by_mode(model, states: list[LMState], modes: list[bool], prefetch=(), ahead=None) -> MassRows:
    """Rows of ``states``, each in its mode: one ``TokenModel.rows`` call per mode present
    (the first one also carries ``prefetch``; ``ahead``: see ``TokenModel.rows``)."""
    if not states:
        return MassRows.empty()
    if all(m == modes[0] for m in modes):
        return await model.rows(states, modes[0], prefetch, ahead)
    slot = np.zeros(len(states), np.int64)
    gen = np.zeros(len(states), np.int64)
    modes_arr = np.array(modes, bool)
    for mode in sorted(set(modes)):
        sel = np.flatnonzero(modes_arr == mode)
        got = await model.rows([states[i] for i in sel.tolist()], mode, prefetch, ahead)
        prefetch = ()
        slot[sel], gen[sel] = got.slot, got.gen
    return MassRows(slot, gen)
