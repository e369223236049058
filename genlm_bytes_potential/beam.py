"""The byte beam: a normalized autoregressive byte distribution from a token LM.

A *candidate* is a partial tokenization of the bytes read so far: the tokens it has
committed (an :class:`~genlm_bytes_potential.lm_state.LMState`), a trie node (the bytes of
the token it is in the middle of) and a log weight ``w`` = log of the LM probability of the
committed tokens times the mass of the node under the LM's next-token distribution. With
``M_c`` the trie masses of candidate ``c``'s state:

* reading byte ``b`` moves ``c`` to its child ``n·b`` with ``w += log M_c(n·b) - log M_c(n)``;
* extending (end of token, EOT) at a node with tokens ``t`` ending there gives a new
  candidate at the root with state ``c + t`` and ``w += log M_c(leaf t) - log M_c(n)``.

A :class:`Beam` for bytes ``x`` holds the candidates that read ``x`` (after pruning) and
their extensions. Its next-byte distribution over the 256 bytes and EOS is

    q(a | x) = W(x·a) / sum_a' W(x·a'),   W(x·a) = sum of the weights after reading a,

so it sums to 1 at every context where the beam is not empty, and the log-probability of
a byte string is the sum of its conditionals (``Beam.logp``). Without pruning (``K=None``,
``prune_threshold=0``) ``W(x)`` is the exact probability under the token LM that its byte
output starts with ``x`` (every tokenization counted), ``sum_a W(x·a) = W(x)`` when every
token has bytes, and ``q`` is the exact byte-level conditional.

Candidates hold no masses: a candidate's masses are a row of the model's
:class:`~genlm_bytes_potential.lm_state.MassStore` (one per context and EOS mode, kept
where the trie batch ran), and each step gathers the few masses it reads (on the host,
summing them from the row's token weights).

How the approximations enter:

* **Pruning** happens after each byte: candidates below ``prune_threshold`` times the
  beam's total weight are dropped, then all but the ``K`` heaviest; extensions below the
  threshold share of that total are not made. ``q`` is then the conditional under the
  surviving candidates only, still normalized.
* **Full support (the rule).** Pruning also keeps the heaviest candidate at which a token
  can end (a finite extension weight), when none of the kept ones can; and the heaviest
  finite extension is always made, whatever the threshold. So a beam holds up to ``K + 1``
  candidates before extension, and whenever any candidate that read ``x`` could end a
  token, the beam has a candidate at the root. A root candidate gives every byte that
  begins a token of positive LM probability (and EOS, when the LM gives an EOS token
  positive probability) ``q > 0``. Hence:

  - *byte-complete vocabularies* (every single byte is a token: GPT-2, Llama-3, Qwen):
    the root candidate reads any byte ``b`` into the node of the token ``b``, where a token
    ends; so by induction every beam has a root candidate, ``q(a | x) > 0`` for every byte
    ``a`` (given the LM's softmax gives every token positive probability) and ``prefix(x)``
    is finite for every byte string;
  - *other vocabularies*: ``q(a | x) > 0`` for every byte that begins a token, at every
    ``x`` after which some candidate that read ``x`` can end a token. A byte that no token
    begins with (e.g. 21 byte values in SmolLM2's vocabulary, among them 0x04, 0xfe, 0xff)
    can only be read inside a token, and has ``q = 0`` wherever no candidate is inside
    such a token: that is the model's support, not the pruning's.
  - canonical mode commits only canonical tokens: when every extension of a step is
    non-canonical, no root candidate exists after it.
* **What holds after pruning.** Write ``W(x) = exp(Beam.log_total)`` for the surviving
  weight and ``P(x)`` for the exact marginal (the token LM's probability that its byte
  output starts with ``x``, every tokenization counted). Then, for a beam read from
  :func:`initial_beam` without healing:

  1. ``W(x) <= P(x)``: the candidates are disjoint sets of token sequences, and pruning
     and skipped extensions only drop non-negative terms.
  2. ``logp(x) = log W(x) + sum_t [-log(1 - rho_t) - log(1 - delta_t)]``, where ``rho_t``
     is the share of weight pruned after byte ``t`` (``BeamStats.pruned_mass`` adds them
     up) and ``delta_t`` the share of the beam's weight in extensions the threshold did
     not make (0 when ``prune_threshold=0``). Each step's normalizer is the previous
     surviving weight minus the skipped extensions, so the conditionals telescope.
  3. Hence ``logp(x) >= log W(x)``, and ``logp(x) <= log P(x) + sum_t [...]``; but the
     normalized ``logp(x)`` can *exceed* ``log P(x)``: pruning removes weight from the
     denominators as well as from the numerators, so a pruned beam may give a byte
     string more probability than the exact distribution does (and, per string, less).
     Neither ``q(a | x) <= p(a | x)`` nor the reverse holds in general.
  4. Without pruning all the ``rho_t``, ``delta_t`` are 0 and ``logp(x) = log W(x) =
     log P(x)``.

* **EOS modes.** A prompt is read with EOS tokens as text (``with_eos=False``); the step
  that reads its last byte switches every candidate to the with-EOS masses of its own
  context (``w += log M^eos_c(n·b) - log M^text_c(n)``), so after a prompt no candidate can
  finish an EOS token as text.
* **Healing** is not part of ``q``. A byte that no candidate can read has ``q = 0`` and
  leaves an empty beam. With ``heal=True``, advancing by such a byte instead tries to
  re-tokenize the end of one candidate (back off at most ``heal_max_backoff`` bytes into
  its current token, commit the shorter token, replay the rest with at most
  ``heal_max_splits`` further commits); the healed beam carries on, the step is counted in
  ``stats.heals`` and its log-probability is the healed weight over the beam's total
  weight, an estimate outside the normalized distribution. Prefill and scoring use it; a
  contract-exact potential does not. With full support, healing is needed only for a
  byte that begins no token (non-byte-complete vocabularies) or after canonical filtering
  removed every extension: on byte-complete vocabularies ``stats.heals`` stays 0.

All candidates of all beams advanced together are read, pruned and extended as flat
arrays (one gather of masses per step), and all extensions that need masses share one
``batch_next_token_logprobs`` call and one trie batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import accumulate
from numbers import Integral, Real

import numba
import numpy as np

from .lm_state import LMState, MassRows, TokenModel
from .trie import EOS

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


@dataclass(frozen=True)
class BeamStats:
    """Diagnostics accumulated along the bytes a beam has read.

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


@dataclass(frozen=True, eq=False)
class Beam:
    """Candidates for a byte prefix (see the module docstring).

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
        the model's store, shared by every beam)."""
        arrays = self.nodes.nbytes + self.weights.nbytes + self.rows.slot.nbytes + self.rows.gen.nbytes
        return arrays + sum(56 + 8 * len(s.tokens) for s in self.states)

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
    recomputed first, then every beam not yet memoized is done in one gather."""
    if not beams:
        return np.zeros((0, N_OUTCOMES))
    await _ensure(beams)
    todo = [b for b in beams if not b._dist]
    if todo:
        for beam, row in zip(todo, _next_logprobs(todo)):
            beam._dist.append(row)
    return np.stack([b._dist[0] for b in beams])


def _next_logprobs(beams: list[Beam]) -> np.ndarray:
    """Next-byte log-probs ``[len(beams), 257]`` of beams over one model, in one pass.

    ``W(x·a)`` sums, over candidates ``c``, ``exp(w_c) M_c(child_a) / M_c(node_c)`` (see
    ``_outcome_logprobs``)."""
    model, trie = beams[0].model, beams[0].model.trie
    flat = _Flat(beams)
    owner, pos, g_slot, g_node = _children_plan(flat.nodes, flat.rows.slot, trie.child_ptr, trie.child_node)
    mass = model.store.gather(g_slot, g_node)
    norm = np.array([b.log_norm for b in beams])
    return _outcome_logprobs(owner, trie.child_label[pos], mass, flat.weights, flat.bid, norm)


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
    n_child, n, nb = len(owner), len(weights), len(norm)
    s = np.empty(n)
    top = np.full(nb, -np.inf)
    for c in range(n):
        s[c] = weights[c] - np.log(mass[n_child + c])
        if s[c] > top[bid[c]]:
            top[bid[c]] = s[c]
    scale = np.zeros(n)
    for c in range(n):
        if np.isfinite(top[bid[c]]):
            scale[c] = np.exp(s[c] - top[bid[c]])
    n_groups = nb * N_OUTCOMES
    acc = np.zeros(n_groups)
    count = np.zeros(n_groups, np.int64)
    key = np.empty(n_child, np.int64)
    for k in range(n_child):
        c = owner[k]
        g = bid[c] * N_OUTCOMES + (256 if label[k] == EOS else label[k])
        key[k] = g
        acc[g] += scale[c] * mass[k]
        count[g] += 1
    out = np.full(n_groups, -np.inf)
    redo = np.zeros(n_groups, np.bool_)
    n_redo = 0
    for g in range(n_groups):
        if count[g]:
            b = g // N_OUTCOMES
            if acc[g] >= _LINEAR_MIN and acc[g] < np.inf and np.isfinite(top[b]):
                out[g] = np.log(acc[g]) + top[b]
            else:
                redo[g] = True
                n_redo += 1
    if n_redo:
        sel = np.flatnonzero(redo[key])
        vals = np.empty(len(sel))
        for i in range(len(sel)):
            k = sel[i]
            vals[i] = weights[owner[k]] + np.log(mass[k]) - np.log(mass[n_child + owner[k]])
        redone = _grouped_logsumexp(key[sel], vals, n_groups)
        for g in range(n_groups):
            if redo[g]:
                out[g] = redone[g]
    out = out.reshape(nb, N_OUTCOMES)
    for b in range(nb):
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
) -> Beam:
    """The beam before any byte: one candidate at the root after ``prompt_tokens``."""
    state = model.initial_state(prompt_tokens)
    calls = model.stats.batch_calls
    rows = await model.rows([state], with_eos)
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
    prefetch = _prefetch(beams, next_bytes, ahead, step.ext_states, modes, ext_bid)
    calls_before = model.stats.batch_calls
    ext_rows = await _rows_by_mode(model, step.ext_states, [modes[b] for b in ext_bid.tolist()], prefetch)
    calls = model.stats.batch_calls - calls_before
    return await _assemble(beams, next_bytes, modes, step, ext_bid, ext_rows, calls)


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
    target = await _rows_in_mode(model, beams, modes, bid, rows, flat, ok)
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
    ext_states = [kstates[o].extend(t) for o, t in zip(ext_owner[made].tolist(), tokens[made].tolist())]
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


async def _rows_in_mode(model, beams, modes, bid, rows: MassRows, flat: _Flat, ok: np.ndarray) -> MassRows:
    """The rows of the candidates ``ok`` of ``flat`` (beams ``bid``, rows ``rows``) in their
    step's mode: their own rows, except for beams read in the other mode (the last byte of
    a prompt), whose contexts get rows in the new mode."""
    if all(m == b.with_eos for m, b in zip(modes, beams)):
        return rows
    switch = np.array([m != b.with_eos for m, b in zip(modes, beams)])
    moved = np.flatnonzero(switch[bid])
    if not len(moved):
        return rows
    target = MassRows(rows.slot.copy(), rows.gen.copy())
    new = await _rows_by_mode(model, flat.states_at(ok[moved]), [modes[b] for b in bid[moved].tolist()])
    target.slot[moved], target.gen[moved] = new.slot, new.gen
    return target


async def _rows_by_mode(model, states: list[LMState], modes: list[bool], prefetch=()) -> MassRows:
    """Rows of ``states``, each in its mode: one ``TokenModel.rows`` call per mode present
    (the first one also carries ``prefetch``)."""
    if not states:
        return MassRows.empty()
    if all(m == modes[0] for m in modes):
        return await model.rows(states, modes[0], prefetch)
    slot = np.zeros(len(states), np.int64)
    gen = np.zeros(len(states), np.int64)
    modes_arr = np.array(modes, bool)
    for mode in sorted(set(modes)):
        sel = np.flatnonzero(modes_arr == mode)
        got = await model.rows([states[i] for i in sel.tolist()], mode, prefetch)
        prefetch = ()
        slot[sel], gen[sel] = got.slot, got.gen
    return MassRows(slot, gen)


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
    for k, token in zip(keep.tolist(), trie.leaf_token[leaf[keep]].tolist()):
        src = found[k][0]
        states[k] = (beam.states[-1 - src] if src < 0 else states[src]).extend(token)
    return list(states.values())


# Rank of a speculative context (see speculative_contexts), in nats; chosen on SmolLM2
# scoring of benchmarks/data/heldout.txt (K = 5, 8): fewest LM forward passes per byte
# (0.17 / 0.21 with 6 bytes and 128 contexts per call, 1.0 without prefetching).
_LEVEL_PENALTY = -2.0
_BYTE_PENALTY = -3.0


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
                state = beam.states[i].extend(trie.leaf_token[leaf])
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
            new_state = state.extend(trie.leaf_token[leaf])
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


async def prefill(beam: Beam, data: bytes, with_eos: bool = True) -> Beam:
    """Read ``data`` (e.g. a prompt) with EOS tokens as ordinary text; the step that reads
    its last byte switches every candidate to mode ``with_eos``, ready for generation."""
    for i, b in enumerate(data):
        (beam,) = await advance(
            [beam], [b], with_eos=with_eos if i == len(data) - 1 else False, ahead=[memoryview(data)[i + 1 :]]
        )
    return beam
