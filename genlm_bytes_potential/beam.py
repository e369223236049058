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
their extensions (after the threshold), every one with its masses computed. Its
next-byte distribution over the 256 bytes and EOS is

    q(a | x) = W(x·a) / sum_a' W(x·a'),   W(x·a) = sum of the weights after reading a,

so it sums to 1 at every context where the beam is not empty, and the log-probability of
a byte string is the sum of its conditionals (``Beam.logp``). Without pruning (``K=None``,
``prune_threshold=0``) ``W(x)`` is the exact probability under the token LM that its byte
output starts with ``x`` (every tokenization counted), ``sum_a W(x·a) = W(x)`` when every
token has bytes, and ``q`` is the exact byte-level conditional.

How the approximations enter:

* **Pruning** happens after each byte: candidates below ``prune_threshold`` times the
  beam's total weight are dropped, then all but the ``K`` heaviest; extensions below the
  threshold share of that total are not made (except the heaviest, when no candidate
  could read another byte without it). ``q`` is then the
  conditional under the surviving candidates only, still normalized.
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

* **Healing** is not part of ``q``. A byte that no candidate can read has ``q = 0`` and
  leaves an empty beam. With ``heal=True``, advancing by such a byte instead tries to
  re-tokenize the end of one candidate (back off at most ``heal_max_backoff`` bytes into
  its current token, commit the shorter token, replay the rest with at most
  ``heal_max_splits`` further commits); the healed beam carries on, the step is counted in
  ``stats.heals`` and its log-probability is the healed weight over the beam's total
  weight, an estimate outside the normalized distribution. Prefill and scoring use it; a
  contract-exact potential does not.

All candidates of all beams advanced together that need an LM call are sent in one
``batch_next_token_logprobs`` call, and their masses come from one trie batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import numpy as np

from .lm_state import LMState, TokenModel
from .trie import EOS

N_OUTCOMES = 257  # bytes 0..255, then EOS


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
        heals: steps that needed token healing.
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
    """Candidates for a byte prefix, with their masses (see the module docstring).

    Attributes:
        nodes, weights: trie node and log weight of each candidate.
        states: LM state of each candidate.
        blocks, block_of, rows: candidate ``i``'s scaled masses are
            ``blocks[block_of[i]][rows[i]]`` (rows of the trie batches that made them).
        block_nodes: per block, None when its rows hold every node, else the sorted
            nodes its columns hold (a scoring beam keeps only the nodes along the text).
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
    blocks: tuple[np.ndarray, ...]
    block_of: np.ndarray
    rows: np.ndarray
    block_nodes: tuple[np.ndarray | None, ...] | None = None  # None: all blocks full
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
        rows = self.rows[cand]
        if len(self.blocks) == 1:
            out = self.blocks[0][rows, self._columns(0, node)]
        else:
            out = np.empty(len(cand))
            which = self.block_of[cand]
            for g in np.flatnonzero(np.bincount(which, minlength=len(self.blocks))):
                sel = which == g
                out[sel] = self.blocks[g][rows[sel], self._columns(g, node[sel])]
        with np.errstate(divide="ignore"):
            return np.log(out)

    def _columns(self, g: int, node: np.ndarray) -> np.ndarray:
        """Columns of block ``g`` holding ``node``."""
        kept = self.block_nodes[g] if self.block_nodes is not None else None
        if kept is None:
            return node
        col = np.minimum(np.searchsorted(kept, node), len(kept) - 1)
        if not np.array_equal(kept[col], node):
            bad = node[kept[col] != node][0]
            raise ValueError(
                f"node {bad} ({self.model.trie.prefix_of[bad]!r}) is not among the nodes this beam "
                f"kept masses for: a beam advanced with ahead_only=True reads only the bytes ahead"
            )
        return col

    def log_mass_ratio(self, cand: np.ndarray, node: np.ndarray, base: np.ndarray) -> np.ndarray:
        """``log M_c(node) - log M_c(base)``, both read in one gather."""
        m = self.log_mass(np.concatenate([cand, cand]), np.concatenate([node, base]))
        return m[: len(cand)] - m[len(cand) :]

    def next_logprobs(self) -> np.ndarray:
        """``log q(a | x)`` for a = 0..255 and EOS (index 256); all -inf when empty."""
        if not self._dist:
            self._dist.append(_next_logprobs([self])[0])
        return self._dist[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the mass rows this beam refers to (rows shared with other beams are
        counted by each): the beam's memory footprint, dominated by its root candidates."""
        if not len(self):
            return 0
        used = np.unique(np.stack([self.block_of, self.rows]), axis=1)[0]
        return int(sum(self.blocks[g].shape[1] for g in used)) * 8

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


def _next_logprobs(beams: list[Beam]) -> np.ndarray:
    """Next-byte log-probs ``[len(beams), 257]`` for several beams in one pass.

    ``W(x·a)`` sums, over candidates ``c``, ``w_c + log M_c(child_a) - log M_c(node_c)``:
    a ``[candidates, 257]`` table (a node has one child per label), reduced by a
    logsumexp per column, each column shifted by its own maximum."""
    out = []
    for beam in beams:
        trie = beam.model.trie  # per beam: gathers vectorized over all its candidates' children
        owner, label, child = trie.children_of(beam.nodes)
        table = np.full((len(beam), N_OUTCOMES), -np.inf)
        table[owner, np.where(label == EOS, 256, label)] = (
            beam.weights[owner] + beam.log_mass_ratio(owner, child, beam.nodes[owner]))
        row = _logsumexp_columns(table)
        out.append(row - beam.log_norm if np.isfinite(beam.log_norm) else row)
    return np.stack(out) if out else np.zeros((0, N_OUTCOMES))


def _logsumexp_columns(table: np.ndarray) -> np.ndarray:
    """logsumexp of each column (-inf for a column of -inf)."""
    mx = table.max(axis=0) if len(table) else np.full(table.shape[1], -np.inf)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(table - safe).sum(axis=0)) + safe


async def initial_beam(
    model: TokenModel,
    params: BeamParams,
    prompt_tokens: tuple[int, ...] | list[int] = (),
    with_eos: bool = True,
) -> Beam:
    """The beam before any byte: one candidate at the root after ``prompt_tokens``."""
    state = model.initial_state(prompt_tokens)
    calls = model.stats.batch_calls
    block = await model.masses([state], with_eos)
    return Beam(
        model=model,
        params=params,
        nodes=np.array([model.trie.root]),
        weights=np.zeros(1),
        states=(state,),
        blocks=(block,),
        block_of=np.zeros(1, np.int64),
        rows=np.zeros(1, np.int64),
        with_eos=with_eos,
        stats=BeamStats(lm_calls=model.stats.batch_calls - calls, lm_contexts=1),
    )


async def advance(beams: list[Beam], next_bytes: list[int], with_eos: bool | None = None,
                  ahead: list[bytes] | None = None, ahead_only: bool = False) -> list[Beam]:
    """Advance each beam by its byte: read, prune, extend. All extensions of all beams
    share one LM batch call and one trie batch.

    Args:
        beams: beams over the same model.
        next_bytes: one byte (0..255) or EOS (257) per beam.
        with_eos: trie mode for the new candidates' masses; default: each beam's own.
        ahead: per beam, bytes known to follow its byte. With the model's ``lookahead``
            on, a step that calls the LM also asks for the contexts that reading them
            may need (:func:`speculative_contexts`); results are unchanged.
        ahead_only: the new beams will read only (a prefix of) ``ahead`` (scoring): their
            new candidates keep masses at the nodes along those bytes only
            (``TokenByteTrie.path_nodes``), a fraction of a row to copy and hold. Such a
            beam cannot give ``next_logprobs`` or read other bytes (ValueError).
    """
    if len(beams) != len(next_bytes):
        raise ValueError(f"{len(beams)} beams but {len(next_bytes)} bytes; expected one byte per beam")
    if ahead_only and ahead is None:
        raise ValueError("ahead_only=True needs ahead (the bytes the new beams will read)")
    next_bytes = [_check_byte(b) for b in next_bytes]
    if not beams:
        return []
    model = beams[0].model
    trie = model.trie

    read = []  # per beam: kept (candidate indices, nodes, weights), pruned share, log W(x·b) before and after
    for beam, b in zip(beams, next_bytes):
        child = trie.child(beam.nodes, b)
        idx = np.nonzero(child >= 0)[0]
        w = beam.weights[idx] + beam.log_mass_ratio(idx, child[idx], beam.nodes[idx])
        keep = np.isfinite(w)
        read.append(_prune(beam.params, idx[keep], child[idx][keep], w[keep]))

    # Extensions of every beam's surviving candidates, in one batch.
    ext_plan = []
    requests: list[LMState] = []
    for beam, (idx, nodes, w, _, _, log_total) in zip(beams, read):
        owner, leaf = trie.leaves_of(nodes)
        ew = w[owner] + beam.log_mass_ratio(idx[owner], leaf, nodes[owner])
        made = _keep_extensions(beam.params, trie, nodes, log_total, ew)
        ok = np.flatnonzero(made)
        states = [beam.states[idx[owner[j]]].extend(trie.leaf_token[leaf[j]]) for j in ok]
        if model.canonical and states:  # commit only canonical token sequences
            keep = np.array([model.is_canonical(s.tokens) for s in states], bool)
            made[ok[~keep]] = False
            states = [s for s, k in zip(states, keep) if k]
        skipped = ew[np.isfinite(ew) & ~made]
        ext_plan.append((ew[made], len(requests), len(states), _logsumexp(skipped)))
        requests.extend(states)

    prefetch = []
    if ahead is not None and model.lookahead and model.would_call(requests):
        budget = model.max_prefetch - len(requests)
        for beam, b, more in zip(beams, next_bytes, ahead):
            if b != EOS and len(more) and budget > 0:
                extra = speculative_contexts(beam, bytes([b]) + bytes(more[: model.lookahead]), budget)
                prefetch.extend(extra)
                budget -= len(extra)

    kept_nodes = None
    if ahead_only:
        kept_nodes = np.unique(np.concatenate([trie.path_nodes(more) for more in ahead]))
    modes = {beam.with_eos if with_eos is None else with_eos for beam in beams}
    blocks_by_mode = {}
    calls_before = model.stats.batch_calls
    for mode in modes:
        sel = [
            j
            for beam, (_, start, n, _) in zip(beams, ext_plan)
            if (beam.with_eos if with_eos is None else with_eos) == mode
            for j in range(start, start + n)
        ]
        if sel:
            blocks_by_mode[mode] = (await model.masses([requests[j] for j in sel], mode, prefetch, kept_nodes), sel)
            prefetch = []
    calls = model.stats.batch_calls - calls_before

    out = []
    for k, (beam, b) in enumerate(zip(beams, next_bytes)):
        idx, nodes, w, pruned, log_read, log_total = read[k]
        ew, start, n, log_skipped = ext_plan[k]
        mode = beam.with_eos if with_eos is None else with_eos
        stats = replace(
            beam.stats,
            pruned_mass=beam.stats.pruned_mass + pruned,
            lm_calls=beam.stats.lm_calls + (calls if n else 0),
            lm_contexts=beam.stats.lm_contexts + n,
        )
        if len(idx) == 0:
            new = await _empty_or_healed(beam, b, mode, stats)
            out.append(new)
            continue
        logp = beam.logp + log_read - beam.log_norm
        new_blocks = list(beam.blocks)
        block_nodes = beam.block_nodes
        block_of = beam.block_of[idx]
        rows = beam.rows[idx]
        states = tuple(beam.states[i] for i in idx)
        if n:
            block, sel = blocks_by_mode[mode]
            pos = sel.index(start)
            if len(block) > n:  # own rows only, so evicting this beam frees them
                block, pos = block[pos : pos + n].copy(), 0
            new_blocks.append(block)
            if kept_nodes is not None or block_nodes is not None:
                block_nodes = (block_nodes or (None,) * len(beam.blocks)) + (kept_nodes,)
            block_of = np.concatenate([block_of, np.full(n, len(new_blocks) - 1)])
            rows = np.concatenate([rows, np.arange(pos, pos + n)])
            states = states + tuple(requests[start : start + n])
            nodes = np.concatenate([nodes, np.full(n, trie.root)])
            w = np.concatenate([w, ew])
        out.append(_compact(Beam(
            model=model, params=beam.params, nodes=nodes, weights=w, states=states,
            blocks=tuple(new_blocks), block_of=block_of, rows=rows, block_nodes=block_nodes, logp=logp,
            log_total=log_total, log_norm=_log_minus(log_total, log_skipped), with_eos=mode, stats=stats,
        )))
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


def _prune(params: BeamParams, idx, nodes, w):
    """Threshold, then the K heaviest. Returns kept (idx, nodes, w), the pruned share,
    and the logs of the total weight before and after pruning."""
    if len(w) == 0:
        return idx, nodes, w, 0.0, -math.inf, -math.inf
    total = _logsumexp(w)
    keep = w - total > params.log_threshold
    if keep.all() and (params.K is None or len(w) <= params.K):
        return idx, nodes, w, 0.0, total, total
    order = np.argsort(-w[keep], kind="stable")
    if params.K is not None:
        order = order[: params.K]
    kept = np.nonzero(keep)[0][order]
    kept_total = _logsumexp(w[kept])
    return idx[kept], nodes[kept], w[kept], 1.0 - math.exp(kept_total - total), total, kept_total


def _keep_extensions(params: BeamParams, trie, nodes, log_total: float, ew) -> np.ndarray:
    """Extensions whose share of the candidates' total weight ``log_total`` (which
    already includes them) passes the threshold; the heaviest is kept when no candidate
    could otherwise read another byte."""
    ok = np.isfinite(ew) & (ew - log_total > params.log_threshold)
    if len(ew) and not ok.any() and np.isfinite(ew).any():
        if not (trie.child_ptr[nodes + 1] > trie.child_ptr[nodes]).any():
            ok[np.argmax(ew)] = True
    return ok


def _compact(beam: Beam) -> Beam:
    """Drop mass blocks no candidate refers to any more."""
    used = np.unique(beam.block_of)
    if len(used) == len(beam.blocks):
        return beam
    remap = np.full(len(beam.blocks), -1, np.int64)
    remap[used] = np.arange(len(used))
    kept = beam.block_nodes
    return replace(beam, blocks=tuple(beam.blocks[g] for g in used), block_of=remap[beam.block_of],
                   block_nodes=None if kept is None else tuple(kept[g] for g in used), _dist=[])


def _empty(beam: Beam, mode: bool, stats: BeamStats) -> Beam:
    return Beam(
        model=beam.model, params=beam.params, nodes=np.zeros(0, np.int64), weights=np.zeros(0),
        states=(), blocks=(), block_of=np.zeros(0, np.int64), rows=np.zeros(0, np.int64),
        logp=-math.inf, log_total=-math.inf, log_norm=-math.inf, with_eos=mode, stats=stats,
    )


async def _empty_or_healed(beam: Beam, b: int, mode: bool, stats: BeamStats) -> Beam:
    if beam.params.heal and not beam.is_empty and b != EOS:
        healed = await _heal(beam, b, mode)
        if healed is not None:
            node, weight, state, block, calls = healed
            return await _expand_single(beam, node, weight, state, block, mode, replace(
                stats, heals=stats.heals + 1, lm_calls=stats.lm_calls + calls,
                lm_contexts=stats.lm_contexts + calls,
            ))
    return _empty(beam, mode, stats)


async def _heal(beam: Beam, b: int, mode: bool):
    """Token healing for a byte no candidate can read: for candidates by decreasing
    weight, back off k bytes into the current token (longest prefix first), commit the
    token spelled by the rest, replay the backed-off bytes and ``b`` from the root,
    committing again when stuck (at most ``heal_max_splits`` times). Returns
    (node, weight, state, masses row, LM calls) of the first success, else None."""
    trie, model, params = beam.model.trie, beam.model, beam.params
    calls = 0
    for i in np.argsort(-beam.weights, kind="stable"):
        partial = beam.partial(i)
        node_i = int(beam.nodes[i])
        base = beam.weights[i] - beam.log_mass(np.array([i]), np.array([node_i]))[0]
        min_k = 0 if params.heal_max_backoff is None else max(0, len(partial) - params.heal_max_backoff)
        for k in range(len(partial), min_k - 1, -1):
            node_k = trie.node_of(partial[:k])
            leaves = np.arange(node_k + 1, node_k + 1 + trie.n_leaves[node_k])
            for leaf, log_mass in zip(leaves.tolist(), beam.log_mass(np.full(len(leaves), i), leaves)):
                weight = base + log_mass
                if not np.isfinite(weight):
                    continue
                state = beam.states[i].extend(trie.leaf_token[leaf])
                masses = (await model.masses([state], mode))[0]
                calls += 1
                res = await _replay(model, params, partial[k:] + bytes([b]), state, masses, weight, mode)
                calls += res[-1]
                if res[0] is not None:
                    return (*res[:4], calls)
    return None


async def _replay(model, params, data: bytes, state, masses, weight, mode):
    """Read ``data`` from the root of ``state``; when stuck, commit a token ending at the
    current node (at most ``heal_max_splits`` times) and continue."""
    trie = model.trie
    node, splits, calls = trie.root, 0, 0
    for byte in data:
        child = int(trie.child(np.array([node]), byte)[0])
        if child >= 0 and masses[child] > 0:
            weight += math.log(masses[child]) - math.log(masses[node])
            node = child
            continue
        if params.heal_max_splits is not None and splits >= params.heal_max_splits:
            return None, None, None, None, calls
        splits += 1
        for leaf in range(node + 1, node + 1 + trie.n_leaves[node]):
            if masses[leaf] <= 0:
                continue
            new_state = state.extend(trie.leaf_token[leaf])
            new_masses = (await model.masses([new_state], mode))[0]
            calls += 1
            child = int(trie.child(np.array([trie.root]), byte)[0])
            if child >= 0 and new_masses[child] > 0:
                weight += math.log(masses[leaf]) - math.log(masses[node])
                weight += math.log(new_masses[child]) - math.log(new_masses[trie.root])
                state, masses, node = new_state, new_masses, child
                break
        else:
            return None, None, None, None, calls
    return node, weight, state, masses, calls


async def _expand_single(beam: Beam, node, weight, state, masses, mode, stats) -> Beam:
    """A beam of one healed candidate, extended like any other step."""
    seed = Beam(
        model=beam.model, params=beam.params, nodes=np.array([node]), weights=np.array([weight]),
        states=(state,), blocks=(masses[None],), block_of=np.zeros(1, np.int64),
        rows=np.zeros(1, np.int64), logp=beam.logp, log_total=beam.log_total, with_eos=mode,
        stats=stats,
    )
    trie = beam.model.trie
    owner, leaf = trie.leaves_of(seed.nodes)
    ew = weight + seed.log_mass_ratio(owner, leaf, seed.nodes[owner])
    ok = _keep_extensions(beam.params, trie, seed.nodes, weight, ew)
    log_norm = _log_minus(weight, _logsumexp(ew[np.isfinite(ew) & ~ok]))
    leaf, ew = leaf[ok], ew[ok]
    new_states = tuple(state.extend(trie.leaf_token[l]) for l in leaf)
    logp = beam.logp + weight - beam.log_total
    if not new_states:
        return replace(seed, logp=logp, log_total=weight, log_norm=log_norm)
    block = await beam.model.masses(list(new_states), mode)
    n = len(new_states)
    return replace(
        seed,
        nodes=np.concatenate([seed.nodes, np.full(n, trie.root)]),
        weights=np.concatenate([seed.weights, ew]),
        states=seed.states + new_states,
        blocks=seed.blocks + (block,),
        block_of=np.concatenate([seed.block_of, np.ones(n, np.int64)]),
        rows=np.concatenate([seed.rows, np.arange(n)]),
        logp=logp,
        log_total=weight,
        log_norm=log_norm,
        stats=replace(stats, lm_calls=stats.lm_calls + 1, lm_contexts=stats.lm_contexts + n),
    )


async def prefill(beam: Beam, data: bytes, with_eos: bool = True) -> Beam:
    """Read ``data`` (e.g. a prompt) with EOS tokens as ordinary text; the last step's
    extensions get masses in mode ``with_eos``, ready for generation."""
    for i, b in enumerate(data):
        (beam,) = await advance([beam], [b], with_eos=with_eos if i == len(data) - 1 else False,
                                ahead=[memoryview(data)[i + 1 :]])
    return beam
