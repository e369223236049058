"""Token-byte trie as flat arrays in depth-first order, with batched log-masses.

Nodes are the distinct byte prefixes of the vocabulary's tokens (the root is the empty
prefix), one *leaf* per token id (the end-of-token edge, EOT = 256, from the node of the
token's bytes), and one EOS node (edge EOS = 257 from the root). Nodes are numbered in
depth-first preorder: a node is followed by its leaves (ascending token id), then by its
byte children (ascending byte) and their subtrees. The subtree of node ``n`` is therefore
the contiguous range ``[n, end[n])``.

The *mass* of a node under a next-token distribution ``p`` is

    mass(n) = sum of p(t) over the tokens t whose leaf lies in the subtree of n,

so ``mass(child) / mass(n)`` is the probability of the next byte given that the token
being read starts with the prefix of ``n``. Two modes treat the EOS tokens (a set of byte
strings) differently:

* ``with_eos=True``: EOS tokens leave their byte path; their mass goes to the EOS node
  (and so to the root), where reading EOS ends the byte string.
* ``with_eos=False``: EOS tokens are ordinary text and the EOS node has mass 0. Prefill
  reads prompts this way.

``masses`` and ``log_masses`` compute every node for a batch of distributions at once. Sums
run in float64 on ``p / max(p)``, so every token whose log-prob is at least -700 below
the row's largest contributes (float64 keeps ``exp(-700)`` normal) and every node's mass
is a sum of non-negative terms: relative error at most ~depth * 2**-52.

On the host, a context's masses are read lazily instead (``weight_rows``, ``masses_at``):
its row holds each token's weight ``p / max(p)`` in its leaf's column (DFS order), the EOS
node's mass, and the cached masses of the root and its byte children; a node's subtree is
a contiguous range of those columns, so any other node's mass is that range's sum (relative
error at most ~(tokens below the node) * 2**-52), summed only when a step reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch

from .transfer import capture_graph, to_device

EOT = 256
EOS = 257


def _token_bytes(token, name: str, i: int) -> bytes:
    """``token`` (bytes, or a bytes subclass such as genlm-backend's ``Token``) as bytes."""
    if not isinstance(token, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"{name}[{i}]={token!r} has type {type(token).__name__}; expected bytes"
            + (f" (e.g. {token.encode()!r})" if isinstance(token, str) else "")
        )
    return bytes(token)


class TokenByteTrie:
    """Flat DFS-ordered trie over a byte vocabulary.

    Args:
        byte_vocab: ``byte_vocab[i]`` is the byte string of token id ``i``. Tokens with an
            empty byte string cannot be read and are left out.
        eos_tokens: byte strings whose tokens mean end-of-sequence in ``with_eos`` mode.
            Every one must be the bytes of some token.

    Attributes (numpy arrays indexed by node unless stated):
        end: end of the node's subtree range (exclusive).
        depth: number of bytes in the node's prefix (leaves: their token's length).
        parent: parent node (-1 for the root).
        leaf_token: token id of a leaf, -1 for other nodes.
        n_leaves: number of tokens whose bytes are exactly the node's prefix; those
            leaves are nodes ``n + 1 .. n + n_leaves[n]``.
        child_ptr, child_label, child_node: byte children (and the root's EOS edge) in
            CSR form; children of ``n`` are ``child_ptr[n]:child_ptr[n + 1]``.
        token_leaf: (by token id) the token's leaf node, -1 if left out.
    """

    def __init__(self, byte_vocab: Sequence[bytes], eos_tokens: Iterable[bytes] = ()):
        for name, items in (("byte_vocab", byte_vocab), ("eos_tokens", eos_tokens)):
            if isinstance(items, (str, bytes, bytearray)):
                raise TypeError(f"{name}={items[:40]!r}; expected a list of byte strings")
        vocab = [_token_bytes(b, "byte_vocab", i) for i, b in enumerate(byte_vocab)]
        if not vocab:
            raise ValueError("byte_vocab is empty; expected at least one token")
        self.vocab_size = len(vocab)
        eos_tokens = {_token_bytes(e, "eos_tokens", i) for i, e in enumerate(eos_tokens)}
        present = set(vocab)
        for e in eos_tokens:
            if e not in present:
                raise ValueError(f"EOS token {e!r} is not the bytes of any token in the vocabulary")
        self.eos_tokens = frozenset(eos_tokens)
        self.eos_token_ids = np.array([i for i, b in enumerate(vocab) if b in eos_tokens], dtype=np.int64)
        self._build(vocab)

    def _build(self, vocab: list[bytes]) -> None:
        tokens_of: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b:
                tokens_of.setdefault(b, []).append(i)
        prefixes = {b""}
        for b in tokens_of:
            prefixes.update(b[:k] for k in range(1, len(b) + 1))
        # Lexicographic order of byte strings is the trie's preorder (a prefix sorts first).
        ordered = sorted(prefixes)
        n = len(ordered) + sum(len(t) for t in tokens_of.values()) + 1
        depth = np.zeros(n, np.int64)
        parent = np.full(n, -1, np.int64)
        label = np.full(n, -1, np.int64)
        leaf_token = np.full(n, -1, np.int64)
        n_leaves = np.zeros(n, np.int64)
        index: dict[bytes, int] = {}
        prefix_of: list[bytes] = []
        i = 0
        for p in ordered:
            index[p] = i
            prefix_of.append(p)
            depth[i] = len(p)
            if p:
                parent[i] = index[p[:-1]]
                label[i] = p[-1]
            node = i
            i += 1
            for t in tokens_of.get(p, ()):
                prefix_of.append(p)
                depth[i], parent[i], label[i], leaf_token[i] = len(p), node, EOT, t
                n_leaves[node] += 1
                i += 1
        self.eos_node = i
        prefix_of.append(b"")
        depth[i], parent[i], label[i] = 0, 0, EOS
        self.root = 0
        self.n_nodes = n
        self.depth, self.parent, self.label = depth, parent, label
        self.leaf_token, self.n_leaves = leaf_token, n_leaves
        self.prefix_of = prefix_of
        self._node_of_prefix = index  # every byte prefix's node (leaves and EOS excluded)

        # Subtree ends: children close their parents' ranges (reverse preorder).
        end = np.arange(1, n + 1, dtype=np.int64)
        for node in range(n - 1, 0, -1):
            p = parent[node]
            if end[node] > end[p]:
                end[p] = end[node]
        self.end = end

        # Byte children (and the root's EOS edge) in CSR form, sorted by label.
        is_child = (label >= 0) & (label != EOT)
        kids = np.nonzero(is_child)[0]
        order = np.lexsort((label[kids], parent[kids]))
        kids = kids[order]
        self.child_node = kids
        self.child_label = label[kids]
        counts = np.bincount(parent[kids], minlength=n)
        self.child_ptr = np.concatenate([[0], np.cumsum(counts)])
        self._child_key = parent[kids] * 258 + label[kids]

        leaves = np.nonzero(leaf_token >= 0)[0]
        self.leaf_nodes = leaves  # DFS order
        self.token_leaf = np.full(self.vocab_size, -1, np.int64)
        self.token_leaf[leaf_token[leaves]] = leaves
        is_eos_leaf = np.isin(leaf_token[leaves], self.eos_token_ids)
        self._leaf_tokens = leaf_token[leaves]
        self._eos_leaf_pos = np.nonzero(is_eos_leaf)[0]
        # With EOS: EOS tokens' leaves carry nothing (marked -1); their mass is the EOS node's.
        self._leaf_tokens_eos = np.where(is_eos_leaf, -1, self._leaf_tokens)
        self._torch_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        #: ``masses`` into a table on CUDA through captured graphs (``_masses_into``)
        self.cuda_graphs = True
        self._mass_graphs: dict[tuple, _MassGraph] = {}
        self._mass_graph_lock = threading.Lock()  # (their inputs and outputs are static)

        # Weight rows (``weight_rows``): a column per leaf (DFS order), then the EOS node,
        # then the cached masses of the root and its byte children. Node n's leaves and EOS
        # node are the columns [seg_lo[n], seg_hi[n]).
        is_col = (leaf_token >= 0) | (np.arange(n) == self.eos_node)
        before = np.concatenate([[0], np.cumsum(is_col)])
        self.seg_lo, self.seg_hi = before[:n], before[end]
        cached = np.flatnonzero((depth <= 1) & ~is_col)
        self.mass_col = np.full(n, -1, np.int64)
        self.mass_col[cached] = len(leaves) + 1 + np.arange(len(cached))
        self._cached_nodes = cached
        self.row_width = len(leaves) + 1 + len(cached)
        self._scratch = _Scratch()
        self._root_front: np.ndarray | None = None

    # ------------------------------------------------------------------ lookups
    def child(self, nodes: np.ndarray, label: int) -> np.ndarray:
        """Child of each node along edge ``label`` (a byte or EOS); -1 where absent."""
        keys = np.asarray(nodes, np.int64) * 258 + label
        pos = np.searchsorted(self._child_key, keys)
        pos = np.minimum(pos, len(self._child_key) - 1)
        found = self._child_key[pos] == keys
        return np.where(found, self.child_node[pos], -1)

    def children_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All byte/EOS children of ``nodes`` flattened: (owner index, label, child node)."""
        nodes = np.asarray(nodes, np.int64)
        lo, hi = self.child_ptr[nodes], self.child_ptr[nodes + 1]
        counts = hi - lo
        owner = np.repeat(np.arange(len(nodes)), counts)
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        flat = starts + np.arange(counts.sum())
        return owner, self.child_label[flat], self.child_node[flat]

    def leaves_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All leaves directly under ``nodes`` flattened: (owner index, leaf node)."""
        nodes = np.asarray(nodes, np.int64)
        counts = self.n_leaves[nodes]
        owner = np.repeat(np.arange(len(nodes)), counts)
        first = np.repeat(nodes + 1 - np.cumsum(counts) + counts, counts)
        return owner, first + np.arange(counts.sum())

    def path_nodes(self, paths: Sequence[bytes | memoryview | None], width: int) -> np.ndarray:
        """The nodes whose masses a row is read at when the bytes after its context are
        known: ``[len(paths), width]``, -1 where none. Row ``i``: the root, then for each
        byte of ``paths[i]`` (None: no bytes) the node it leads to and that node's leaves,
        until no token continues the bytes or ``width`` nodes are listed. A candidate that
        starts at the root of this context and reads these bytes reads exactly these
        masses (the node it is at, its child, the leaves there)."""
        cut = [b"" if p is None else p[:width] for p in paths]
        ptr = np.zeros(len(paths) + 1, np.int64)
        ptr[1:] = np.cumsum(np.fromiter(map(len, cut), np.int64, len(cut)))
        flat = np.frombuffer(b"".join(cut), np.uint8)
        return _path_nodes(
            flat, ptr, width, self.root, self.child_ptr, self.child_label, self.child_node, self.n_leaves
        )

    def front_nodes(self, slots: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The masses the next step of a candidate at ``nodes[i]`` (on row ``slots[i]``)
        reads, as ``(slot, node)`` pairs: the node, each of its children, and each
        child's leaves; the next-byte distribution reads the node and its children, and
        reading a byte its child and the leaves there. Candidates at the root are left
        out: theirs are the row's ``root_front``."""
        return _front_nodes(
            np.asarray(slots, np.int64),
            np.asarray(nodes, np.int64),
            self.root,
            self.child_ptr,
            self.child_node,
            self.n_leaves,
        )

    @property
    def root_front(self) -> np.ndarray:
        """``front_nodes`` of a candidate at the root (the root first), computed once."""
        if self._root_front is None:
            root = np.array([self.root])  # (no node is -1: the root is not left out)
            self._root_front = _front_nodes(root, root, -1, self.child_ptr, self.child_node, self.n_leaves)[1]
        return self._root_front

    def leaves_spelling(self, prefix: bytes) -> range | None:
        """Leaves of the tokens whose bytes are exactly ``prefix`` (often none); None
        when no token starts with ``prefix``."""
        node = self._node_of_prefix.get(prefix)
        return None if node is None else range(node + 1, node + 1 + int(self.n_leaves[node]))

    def node_of(self, prefix: bytes) -> int:
        """Node of a byte prefix, -1 if no token starts with it."""
        return self._node_of_prefix.get(bytes(prefix), -1)

    # ------------------------------------------------------------------ masses
    def masses(self, logprobs, with_eos: bool = True, out=None, out_rows=None):
        """Node masses for a batch of next-token distributions, scaled per row.

        Args:
            logprobs: ``[B, V]`` token log-probabilities (numpy or torch, CPU or CUDA);
                they need not be normalized.
            with_eos: EOS tokens' mass goes to the EOS node (True) or stays on their
                byte paths (False).

        Returns:
            ``(scaled, shift)``: ``scaled[b, n] * exp(shift[b])`` is the mass of node
            ``n`` under row ``b``; ``shift[b]`` is the row's largest log-prob. Both float64;
            numpy for CPU input, torch on the input's device for CUDA input. Ratios of
            masses in one row (all the beam needs) are ratios of ``scaled`` entries.
            With ``out`` (a ``[rows, n_nodes]`` float64 table of the same kind, or for
            CPU input a CPU tensor) and ``out_rows`` (one index per input row), row ``b``
            is written to ``out[out_rows[b]]`` instead, and ``(out, shift)`` is returned.
        """
        if torch.is_tensor(logprobs) and logprobs.device.type != "cpu":
            self._check_shape(logprobs.shape)
            if out is not None and self.cuda_graphs and logprobs.device.type == "cuda" and len(logprobs):
                return out, self._masses_into(logprobs, with_eos, out, out_rows)
            scaled, shift = self._masses_torch(logprobs, with_eos)
            if out is None:
                return scaled, shift
            out[to_device(np.asarray(out_rows, np.int64), scaled.device)] = scaled  # no wait for the GPU
            return out, shift
        lp = logprobs.numpy() if torch.is_tensor(logprobs) else np.asarray(logprobs)
        if lp.dtype not in (np.float32, np.float64):
            lp = lp.astype(np.float64)
        lp = np.ascontiguousarray(lp)
        self._check_shape(lp.shape)
        shift = np.empty(lp.shape[0])
        if out is None:
            out, out_rows = np.empty((lp.shape[0], self.n_nodes)), np.arange(lp.shape[0])
        _subtree_sums(
            lp,
            shift,
            self._leaf_tokens_eos if with_eos else self._leaf_tokens,
            self.leaf_nodes,
            self._eos_tokens_or_none(with_eos),
            self.eos_node,
            self.parent,
            out.numpy() if torch.is_tensor(out) else out,
            np.asarray(out_rows, np.int64),
        )
        return out, shift

    def weight_rows(self, logprobs: np.ndarray, with_eos: bool, out: np.ndarray, out_rows: np.ndarray) -> None:
        """Host rows from which node masses are read as segment sums (``masses_at``):
        ``out[out_rows[b]]`` gets, scaled as ``masses`` scales, each token's weight
        ``exp(lp[b, t] - shift[b])`` in its leaf's column (0 for EOS tokens with EOS), the
        EOS node's mass, and the masses of the root and its byte children (the nodes every
        new context reads first). ``out`` is ``[rows, row_width]`` float64. The weights
        are one vectorized exp over the batch (in a per-thread scratch buffer); a kernel
        puts them in leaf order and sums the cached masses."""
        lp = np.asarray(logprobs)
        self._check_shape(lp.shape)
        shift = lp.max(axis=1).astype(np.float64)  # NaN if any entry is NaN, as in masses
        shift[~np.isfinite(shift)] = 0.0
        weights = self._scratch.take(lp.shape)
        np.subtract(lp, shift[:, None], out=weights)
        np.exp(weights, out=weights)
        _place_weights(
            weights,
            self._leaf_tokens_eos if with_eos else self._leaf_tokens,
            self._eos_tokens_or_none(with_eos),
            self._cached_nodes,
            self.seg_lo,
            self.seg_hi,
            self.mass_col,
            out,
            np.asarray(out_rows, np.int64),
        )

    def masses_at(self, table: np.ndarray, rows: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """``M(nodes[i])`` (scaled) under weight row ``table[rows[i]]`` (``weight_rows``):
        the sum of the node's columns in order, or its cached mass (the same sum)."""
        return _masses_at(table, rows, nodes, self.seg_lo, self.seg_hi, self.mass_col)

    def log_masses(self, logprobs, with_eos: bool = True):
        """Log-masses of every node: ``[B, n_nodes]`` float64 (numpy for CPU input,
        torch on the device otherwise); -inf exactly where a mass is 0. Leaves carry
        their token's log-prob unchanged."""
        scaled, shift = self.masses(logprobs, with_eos)
        if torch.is_tensor(scaled):
            out = torch.log(scaled) + shift[:, None]
            lp = torch.as_tensor(logprobs).to(torch.float64)
            leaf_nodes, leaf_tokens = self._torch_tables(lp.device)[:2]
            out[:, leaf_nodes] = lp[:, leaf_tokens]
            if with_eos and len(self.eos_token_ids):
                out[:, leaf_nodes[self._eos_leaf_pos]] = float("-inf")
            return out
        with np.errstate(divide="ignore"):
            out = np.log(scaled)
        out += shift[:, None]
        lp = logprobs.numpy() if torch.is_tensor(logprobs) else np.asarray(logprobs)
        leaf_lp = lp[:, self._leaf_tokens].astype(np.float64)
        if with_eos and len(self.eos_token_ids):
            leaf_lp[:, self._eos_leaf_pos] = -np.inf
        out[:, self.leaf_nodes] = leaf_lp
        return out

    def _eos_tokens_or_none(self, with_eos: bool) -> np.ndarray:
        return self.eos_token_ids if with_eos else self.eos_token_ids[:0]

    def _check_shape(self, shape) -> None:
        if len(shape) != 2 or shape[1] != self.vocab_size:
            raise ValueError(
                f"logprobs has shape {tuple(shape)}; expected [B, {self.vocab_size}] "
                f"(one column per token of the vocabulary)"
            )

    def _torch_tables(self, device) -> tuple:
        key = str(device)
        if key not in self._torch_cache:
            t = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
            self._torch_cache[key] = (t(self.leaf_nodes), t(self._leaf_tokens), {})
        return self._torch_cache[key]

    def _reachability(self, device, with_eos: bool) -> torch.Tensor:
        """Sparse ``[n_nodes, L]`` float64 matrix: entry (n, j) is 1 when leaf j (DFS
        order) lies below node n. With EOS, EOS leaves count at the EOS node and the root
        only. Masses are then one sparse-dense product: every node sums its own leaves
        directly (no differences, so no cancellation)."""
        cache = self._torch_tables(device)[2]
        if with_eos not in cache:
            cols, rows = [], []
            j = np.arange(len(self.leaf_nodes))
            is_eos = np.zeros(len(j), bool)
            if with_eos:
                is_eos[self._eos_leaf_pos] = True
                for node in (self.eos_node, self.root):
                    rows.append(np.full(is_eos.sum(), node))
                    cols.append(j[is_eos])
            cur, keep = self.leaf_nodes.copy(), j[~is_eos]
            cur = cur[~is_eos]
            while len(cur):  # the leaf, then each ancestor up to the root
                rows.append(cur)
                cols.append(keep)
                up = cur != self.root
                cur, keep = self.parent[cur[up]], keep[up]
            rows, cols = np.concatenate(rows), np.concatenate(cols)
            coo = torch.sparse_coo_tensor(
                torch.as_tensor(np.stack([rows, cols]), device=device),
                torch.ones(len(rows), dtype=torch.float64, device=device),
                (self.n_nodes, len(self.leaf_nodes)),
            )
            cache[with_eos] = coo.coalesce().to_sparse_csr()
        return cache[with_eos]

    def _masses_into(self, logprobs: torch.Tensor, with_eos: bool, out: torch.Tensor, out_rows) -> torch.Tensor:
        """``masses`` into ``out[out_rows]`` through CUDA graphs of ``_masses_torch`` (one
        per batch size rounded up to a power of two, batches past ``_GRAPH_ROWS`` in
        pieces): a copy in, a replay and a copy out per piece, where the operators one by
        one cost the host ~0.35 ms a call on an H200. Returns ``shift``. Calls from several
        threads take turns queueing (on the device's current stream, as ``PagedTokenLM``'s
        graphs do)."""
        rows = to_device(np.asarray(out_rows, np.int64), logprobs.device)
        shifts = []
        with self._mass_graph_lock:
            for lo in range(0, logprobs.shape[0], _GRAPH_ROWS):
                part = logprobs[lo : lo + _GRAPH_ROWS]
                n = part.shape[0]
                graph = self._mass_graph(1 << (n - 1).bit_length(), part.dtype, part.device, with_eos)
                graph.inputs[:n].copy_(part)
                graph.replay()
                out.index_copy_(0, rows[lo : lo + n], graph.scaled[:n])
                shifts.append(graph.shift[:n].clone())
        return shifts[0] if len(shifts) == 1 else torch.cat(shifts)

    def _mass_graph(self, rows: int, dtype, device, with_eos: bool) -> _MassGraph:
        """The captured ``_masses_torch`` of ``rows`` rows (made on first use)."""
        key = (str(device), dtype, rows, with_eos)
        graph = self._mass_graphs.get(key)
        if graph is None:
            graph = self._mass_graphs[key] = _capture_masses(
                self._masses_torch, rows, self.vocab_size, dtype, device, with_eos
            )
        return graph

    def _masses_torch(self, logprobs: torch.Tensor, with_eos: bool):
        lp = logprobs.to(torch.float64)
        _, leaf_tokens, _ = self._torch_tables(lp.device)
        shift = lp.max(dim=1).values
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        leaf_w = torch.exp(lp[:, leaf_tokens] - shift[:, None])  # [B, L]
        w = torch.sparse.mm(self._reachability(lp.device, with_eos), leaf_w.T.contiguous())
        return w.T.contiguous(), shift


#: most rows of one captured ``_masses_torch`` (its output holds ``rows x n_nodes`` float64)
_GRAPH_ROWS = 64


class _MassGraph(NamedTuple):
    """A captured ``_masses_torch``: ``replay()`` computes ``scaled`` and ``shift`` of the
    rows in ``inputs`` (all three static tensors; the outputs are read right after the
    replay, before another graph of the shared pool replays)."""

    replay: Callable[[], None]
    inputs: torch.Tensor
    scaled: torch.Tensor
    shift: torch.Tensor


_MASS_GRAPH_POOL: dict[str, object] = {}  # per device: one memory pool for every trie's mass graphs


def _capture_masses(masses_torch, rows: int, V: int, dtype, device, with_eos: bool) -> _MassGraph:
    """``masses_torch`` of ``rows`` rows captured as a CUDA graph, after a warm-up on a
    side stream (the trie's tables and cuSPARSE's workspace are made there, not in the
    graph). Graphs share one memory pool: they replay one at a time, in stream order."""
    inputs = torch.zeros((rows, V), dtype=dtype, device=device)
    pool = _MASS_GRAPH_POOL.setdefault(str(device), torch.cuda.graph_pool_handle())
    graph, (scaled, shift) = capture_graph(lambda: masses_torch(inputs, with_eos), device, pool)
    return _MassGraph(graph.replay, inputs, scaled, shift)


def _subtree_sums_py(lp, shift, leaf_tokens, leaf_nodes, eos_tokens, eos_node, parent, out, out_rows):
    """out[out_rows[b], n] = sum of exp(lp[b, t] - shift[b]) over the leaves t below n,
    with shift[b] (written here) the row's largest log-prob (0 when not finite); EOS
    tokens (when given) count at the EOS node instead of their leaves. One
    reverse-preorder pass per row: every node adds its total into its parent."""
    B = lp.shape[0]
    n_nodes = out.shape[1]
    for b in numba.prange(B):
        row = out[out_rows[b]]
        row[:] = 0.0
        s = -np.inf
        for t in range(lp.shape[1]):
            if lp[b, t] > s or lp[b, t] != lp[b, t]:
                s = lp[b, t]
        s = s if np.isfinite(s) else 0.0
        shift[b] = s
        for j in range(leaf_nodes.shape[0]):
            t = leaf_tokens[j]
            if t >= 0:
                row[leaf_nodes[j]] = np.exp(lp[b, t] - s)
        for t in eos_tokens:
            row[eos_node] += np.exp(lp[b, t] - s)
        for node in range(n_nodes - 1, 0, -1):
            row[parent[node]] += row[node]


# Rows are independent: threads help big batches, but for a few rows the OpenMP barrier
# costs more than the work (badly so on a loaded machine), so small batches run serially.
_subtree_sums_parallel = numba.njit(parallel=True, cache=True, nogil=True)(_subtree_sums_py)
_subtree_sums_serial = numba.njit(cache=True, nogil=True)(_subtree_sums_py)
_SERIAL_MAX_ROWS = 4


def _subtree_sums(lp, shift, leaf_tokens, leaf_nodes, eos_tokens, eos_node, parent, out, out_rows):
    kernel = _subtree_sums_serial if lp.shape[0] <= _SERIAL_MAX_ROWS else _subtree_sums_parallel
    kernel(lp, shift, leaf_tokens, leaf_nodes, eos_tokens, eos_node, parent, out, out_rows)


@numba.njit(cache=True, nogil=True)
def child_by_byte(node, byte, child_ptr, child_label, child_node):
    """The child of ``node`` by ``byte``, -1 if none."""
    lo, hi = child_ptr[node], child_ptr[node + 1]
    p = lo + np.searchsorted(child_label[lo:hi], byte)
    return child_node[p] if p < hi and child_label[p] == byte else -1


@numba.njit(cache=True, nogil=True)
def _front_nodes(slots, nodes, root, child_ptr, child_node, n_leaves):
    """``TokenByteTrie.front_nodes`` (candidates at ``root`` left out)."""
    total = 0
    for i in range(len(nodes)):
        n = nodes[i]
        if n != root:
            total += 1
            for p in range(child_ptr[n], child_ptr[n + 1]):
                total += 1 + n_leaves[child_node[p]]
    out_slot = np.empty(total, np.int64)
    out_node = np.empty(total, np.int64)
    k = 0
    for i in range(len(nodes)):
        n = nodes[i]
        if n == root:
            continue
        out_slot[k], out_node[k] = slots[i], n
        k += 1
        for p in range(child_ptr[n], child_ptr[n + 1]):
            c = child_node[p]
            for j in range(1 + n_leaves[c]):  # the child, then its leaves
                out_slot[k], out_node[k] = slots[i], c + j
                k += 1
    return out_slot, out_node


@numba.njit(cache=True, nogil=True)
def _path_nodes(data, ptr, width, root, child_ptr, child_label, child_node, n_leaves):
    """``TokenByteTrie.path_nodes`` of the paths ``data[ptr[i]:ptr[i + 1]]``."""
    out = np.full((len(ptr) - 1, width), -1, np.int64)
    for i in range(len(ptr) - 1):
        out[i, 0] = node = root
        k = 1
        for j in range(ptr[i], ptr[i + 1]):
            node = child_by_byte(node, data[j], child_ptr, child_label, child_node)
            if node < 0 or k + 1 + n_leaves[node] > width:
                break
            out[i, k] = node
            for leaf in range(n_leaves[node]):
                out[i, k + 1 + leaf] = node + 1 + leaf
            k += 1 + n_leaves[node]
    return out


@numba.njit(cache=True, nogil=True)
def _segment_sum(row, lo, hi):
    """``sum(row[lo:hi])``, added in order."""
    acc = 0.0
    for j in range(lo, hi):
        acc += row[j]
    return acc


@numba.njit(cache=True, nogil=True)
def _place_weights(weights, leaf_tokens, eos_tokens, cached, seg_lo, seg_hi, mass_col, table, rows):
    """``TokenByteTrie.weight_rows`` into ``table[rows[b]]`` from the scaled token weights
    ``weights[b, t]``: each leaf's token weight (0 for leaves whose token is -1: EOS
    tokens with EOS), the EOS node's mass (its tokens' weights, added in order), then each
    cached node's segment sum (``_segment_sums``)."""
    n_leaves = len(leaf_tokens)
    for b in range(len(rows)):
        row = table[rows[b]]
        w = weights[b]
        for j in range(n_leaves):
            t = leaf_tokens[j]
            row[j] = w[t] if t >= 0 else 0.0
        acc = 0.0
        for t in eos_tokens:
            acc += w[t]
        row[n_leaves] = acc
    _segment_sums(table, rows, cached, seg_lo, seg_hi, mass_col)


@numba.njit(cache=True, nogil=True)
def _segment_sums(table, rows, cached, seg_lo, seg_hi, mass_col):
    """Each cached node's mass column of the rows ``table[rows]``: the sum of its segment,
    added in order. Four rows at a time: four independent sums in flight where one sum's
    additions wait on each other (``_place_weights`` of 80 rows of a 653-token vocabulary:
    175 -> 54 µs, warm caches); each row's sum is added in the same order: the same value."""
    n4 = len(rows) - len(rows) % 4
    for b in range(0, n4, 4):
        r0, r1, r2, r3 = table[rows[b]], table[rows[b + 1]], table[rows[b + 2]], table[rows[b + 3]]
        for i in range(len(cached)):
            n = cached[i]
            a0 = a1 = a2 = a3 = 0.0
            for j in range(seg_lo[n], seg_hi[n]):
                a0 += r0[j]
                a1 += r1[j]
                a2 += r2[j]
                a3 += r3[j]
            c = mass_col[n]
            r0[c], r1[c], r2[c], r3[c] = a0, a1, a2, a3
    for b in range(n4, len(rows)):
        row = table[rows[b]]
        for i in range(len(cached)):
            n = cached[i]
            row[mass_col[n]] = _segment_sum(row, seg_lo[n], seg_hi[n])


class _Scratch(threading.local):
    """A float64 buffer per thread, grown as needed: fresh large arrays cost page faults
    on every call."""

    buffer = np.empty(0)

    def take(self, shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1]
        if self.buffer.size < n:
            self.buffer = np.empty(max(n, 2 * self.buffer.size))
        return self.buffer[:n].reshape(shape)


@numba.njit(cache=True, nogil=True)
def mass_in_row(row, node, seg_lo, seg_hi, mass_col):
    """``M(node)`` (scaled) under one weight row (``TokenByteTrie.weight_rows``): its
    cached column, or the sum of its columns in order."""
    col = mass_col[node]
    return row[col] if col >= 0 else _segment_sum(row, seg_lo[node], seg_hi[node])


@numba.njit(cache=True, nogil=True)
def _masses_at(table, rows, nodes, seg_lo, seg_hi, mass_col):
    out = np.empty(len(nodes))
    for i in range(len(nodes)):
        out[i] = mass_in_row(table[rows[i]], nodes[i], seg_lo, seg_hi, mass_col)
    return out
