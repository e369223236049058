"""Token contexts and batched calls to a token-level LM.

An :class:`LMState` is an immutable token context. :class:`TokenModel` wraps any object
with genlm-backend's ``AsyncLM`` interface (``byte_vocab`` and
``batch_next_token_logprobs``) and turns a list of states into their trie log-masses with
exactly one LM batch call and one trie batch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from . import collector, threads
from .transfer import device_done, event_done, to_device, to_host, to_host_queued
from .trie import TokenByteTrie


class TokenContext(tuple):
    """A context's token ids: a tuple that computes its hash once, and knows the context
    it extends. Backends key their caches by the contexts they are given and look one up
    several times a call, and its prefix too; a plain tuple hashes all its tokens each
    time (about 1 µs for 600 tokens) and a prefix is a new slice to hash.

    ``prefix``: the context this one was made from by ``extended`` (the same object, its
    hash kept), or None: for contexts made from a sequence, and once a context two tokens
    longer is made through it (links stay at most two deep: a beam's extension and a
    prefetched chain find their prefixes, and a context never keeps its whole line of
    ancestors, O(n^2) tokens for n of them, alive).

    ``extended`` computes the child's hash from its parent's in O(1): the very value
    ``tuple.__hash__`` gives (CPython's tuple hash folds the items' hashes one at a time
    into a state, then mixes in the length; :func:`_fold` and :func:`_finish`), so a
    context and an equal plain tuple find the same dict entries. Where the interpreter's
    tuple hash differs (checked at import), the child's tokens are hashed as before."""

    def __new__(cls, tokens=()):
        self = super().__new__(cls, tokens)
        self._hash = tuple.__hash__(self)
        self._state = None  # the tuple hash's state before the length (once extended)
        self.prefix = None
        return self

    def extended(self, token: int) -> TokenContext:
        """This context followed by ``token``."""
        child = tuple.__new__(TokenContext, self + (token,))
        if _FOLDED_HASH:
            state = self._state
            if state is None:  # a context made from a sequence: fold its tokens once
                state = self._state = _fold_all(self)
            child._state = _fold(state, token)
            child._hash = _finish(child._state, len(child))
        else:
            child._state, child._hash = None, tuple.__hash__(child)
        child.prefix = self
        if self.prefix is not None:
            self.prefix.prefix = None
        return child

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        return TokenContext, (tuple(self),)


# CPython's tuple hash (Objects/tupleobject.c, an xxHash variant, unchanged since 3.8)
_MASK = (1 << 64) - 1
_PRIME_1, _PRIME_2, _PRIME_5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _fold(state: int, item) -> int:
    """The tuple hash's state after one more item."""
    state = (state + (hash(item) & _MASK) * _PRIME_2) & _MASK
    state = ((state << 31) | (state >> 33)) & _MASK
    return (state * _PRIME_1) & _MASK


def _fold_all(items) -> int:
    """The tuple hash's state after all of ``items``."""
    state = _PRIME_5
    for item in items:
        state = _fold(state, item)
    return state


def _finish(state: int, n: int) -> int:
    """The hash of a tuple of ``n`` items whose folded state is ``state``."""
    h = (state + (n ^ (_PRIME_5 ^ 3527539))) & _MASK
    if h == _MASK:
        return 1546275796
    return h - (1 << 64) if h >> 63 else h


#: whether this interpreter's tuple hash is the one folded here (else TokenContext hashes
#: each new context's tokens)
_FOLDED_HASH = all(
    _finish(_fold_all(t), len(t)) == hash(t) for t in ((), (0,), (-1,), (1, 2, 3), (2**62, -(2**62), 49151))
)


class LMState:
    """A token context. Extending returns a new state; tokens are never changed (only a
    ``TokenContext``'s ``prefix`` link is cut, see there). The hash is computed once
    (states key the mass store, and their ``tokens``, a :class:`TokenContext`, the LM's
    caches)."""

    __slots__ = ("tokens", "_hash")

    def __init__(self, tokens: tuple[int, ...]):
        self.tokens = tokens if type(tokens) is TokenContext else TokenContext(tokens)
        self._hash = hash(self.tokens)

    def extend(self, token: int) -> LMState:
        return LMState(self.tokens.extended(int(token)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, LMState) and self._hash == other._hash and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"LMState({self.tokens!r})"


@dataclass
class LMStats:
    """Counters of the work a model did: batch calls and contexts evaluated."""

    batch_calls: int = 0
    contexts: int = 0


#: a device table's first size (then doubling: device memory is taken when allocated)
_FIRST_TABLE_BYTES = 2**25
#: a host table is allocated for ``max_rows`` at once, up to these bytes and rows (see
#: ``MassStore._grow``; the rows bound the per-slot bookkeeping of small vocabularies)
_HOST_FIRST_BYTES, _HOST_FIRST_ROWS = 2**31, 2**13
#: host-held masses of a full-rows table allocated at first (``MassStore._grow_held``)
_HELD_FIRST_BYTES = 2**26

#: extensions ``TokenModel.extend`` remembers, and the tokens they hold: the memo is
#: cleared when either is reached (its tuples then hold at most ~8 MB of references)
_EXTENSIONS_KEPT = 1024
#: bytes a draft reads ahead by default (``TokenModel.draft_window``)
DRAFT_WINDOW = 16
_EXTENSION_TOKENS_KEPT = 2**20


@dataclass(slots=True)
class MassRows:
    """Where candidates' trie masses live: row ``slot[i]`` of a :class:`MassStore`, valid
    while the store's generation of that slot is still ``gen[i]`` (a reused slot holds
    another context). The arrays are refreshed in place when rows are recomputed."""

    slot: np.ndarray
    gen: np.ndarray

    @staticmethod
    def empty() -> MassRows:
        return MassRows(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def take(self, idx: np.ndarray) -> MassRows:
        return MassRows(self.slot[idx], self.gen[idx])

    def concat(self, other: MassRows) -> MassRows:
        return MassRows(np.concatenate([self.slot, other.slot]), np.concatenate([self.gen, other.gen]))


class MassStore:
    """The trie masses of token contexts: one row per (EOS mode, context), computed once
    and kept where the trie batch ran. On the host a row is the context's token weights
    with a few cached masses (``TokenByteTrie.weight_rows``), and a node's mass is read as
    the sum of its subtree's columns (a contiguous range): only the masses a step reads are
    summed. On a GPU a row holds every node's mass (``TokenByteTrie.masses``) and never
    travels whole: readers gather the few entries they need, and the host holds copies of
    the entries the next reads will want, so that they wait for no copy from the GPU:

    * with each new row's finiteness check (``send_paths``, queued behind the row's
      computation, then ``keep_paths``): when the bytes after its context are known
      (scoring, prompts), the masses reading them visits; otherwise its *root front*
      (``TokenByteTrie.root_front``: what a candidate at the root reads next);
    * the fronts of candidates whose next byte is unknown (sampling), copied while the LM
      runs (``fetch``, then ``hold``).

    ``gather`` looks there first and copies only what it lacks. ``full_rows=True`` keeps
    such rows on the host too (a torch table on the CPU).

    Reuse (see ``allocate``): rows idle for a while are reused first; once ``max_bytes``
    of rows exist, any row not used since the previous allocation (so a step's own rows
    are never taken by its own allocations; the table grows past ``max_bytes`` when a
    step needs more rows than that), and never a row that is ``pinned`` (rows a call is
    still computing while it awaits the GPU). Readers holding :class:`MassRows` check
    ``valid`` and recompute stale rows."""

    IDLE = 16  # allocations after which an unused row is reused before new rows are taken

    def __init__(self, trie: TokenByteTrie, max_bytes: float, full_rows: bool = False):
        self.trie = trie
        self.max_bytes = max_bytes
        self.full_rows = full_rows  # rows of every node's mass also when the LM's rows are on the CPU
        self.width = trie.row_width  # floats per row: host weight rows until a device table exists
        self.table = None  # [capacity, width] float64: numpy weight rows, or a torch table of full rows
        #: per slot of a full-rows table, masses held on the host: the root front
        #: (``front_mass``, valid where ``has_front``), and up to ``HELD_WIDTH`` more
        #: (``held_node``, sorted, and ``held_mass``; ``held_n`` of them)
        self.front_mass = self.held_node = self.held_mass = None
        self.has_front = np.zeros(0, bool)
        self.held_n = np.zeros(0, np.int64)
        self._front_col = None  # per trie node: its column in a root front, -1 if none
        self._front_nodes = None  # the root front's nodes on the table's device
        self.copies = 0  # copies from a full-rows table to the host
        self.gen = np.zeros(0, np.int64)
        self.last_used = np.zeros(0, np.int64)
        self.in_use = np.zeros(0, bool)  # per slot: holds a key's row
        self.pins = np.zeros(0, np.int64)  # per slot: calls computing its row now (see pinned)
        self.clock = 1
        self._slots: dict[tuple[bool, LMState], int] = {}
        self._key_of: list = []  # per slot in use: its key, None when free

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key) -> bool:
        return key in self._slots

    @property
    def max_rows(self) -> int:
        """Rows that fit in ``max_bytes``."""
        return max(1, int(self.max_bytes // self.row_bytes))

    @property
    def row_bytes(self) -> int:
        return 8 * self.width

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in use."""
        return len(self._slots) * self.row_bytes

    def clear(self) -> None:
        self._slots.clear()
        self._key_of = [None] * len(self._key_of)
        self.in_use[:] = False
        self.gen += 1  # rows held by readers are all stale

    def discard(self, keys: list) -> None:
        """Forget ``keys`` (rows whose computation failed)."""
        for key in keys:
            s = self._slots.pop(key, None)
            if s is not None:
                self.gen[s] += 1
                self._key_of[s] = None
                self.in_use[s] = False
                self._forget_held(s)

    def find(self, keys: list) -> np.ndarray:
        """Slot of each key (-1 where absent); found rows count as used now."""
        get = self._slots.get
        out = np.fromiter((get(k, -1) for k in keys), np.int64, len(keys))
        self.touch(out[out >= 0])
        return out

    def touch(self, slots: np.ndarray) -> None:
        self.last_used[slots] = self.clock

    def valid(self, rows: MassRows) -> np.ndarray:
        return self.gen[rows.slot] == rows.gen

    @contextmanager
    def pinned(self, slots: np.ndarray):
        """No allocation takes ``slots`` inside this block (a call awaiting the GPU while
        it writes their rows; other calls may read them meanwhile: their reads queue
        behind the writes)."""
        np.add.at(self.pins, slots, 1)
        try:
            yield
        finally:
            np.subtract.at(self.pins, slots, 1)

    def allocate(self, keys: list, like) -> np.ndarray:
        """Slots for ``keys`` (absent from the store), in this order of preference: free
        slots; rows idle for ``IDLE`` allocations (least recently used first); new rows
        while fewer than ``max_rows`` exist; rows not used since the previous allocation;
        new rows past ``max_rows``. Reusing idle rows before taking new ones keeps the
        table's touched memory near the working set (first touches of fresh memory cost
        about as much as computing the row). The table lives on ``like``'s device."""
        picked, n_new = _pick_slots(
            self.in_use,
            self.pins,
            self.last_used,
            len(self._key_of),
            len(keys),
            self.clock - self.IDLE,
            self.clock,
            self.max_rows,
        )
        for s in picked.tolist():
            self._slots.pop(self._key_of[s], None)
        start = len(self._key_of)
        if n_new:
            self._grow(start + n_new, like)
        slots = np.concatenate([picked, np.arange(start, start + n_new)]) if n_new else picked
        self.gen[slots] += 1
        self.in_use[slots] = True
        self._forget_held(slots)
        self.clock += 1
        self.touch(slots)
        for key, s in zip(keys, slots.tolist()):
            self._slots[key] = s
            self._key_of[s] = key
        return slots

    def _grow(self, rows: int, like) -> None:
        """At least ``rows`` slots in use. A host table is allocated for ``max_rows`` at
        once (up to ``_HOST_FIRST_BYTES`` and ``_HOST_FIRST_ROWS``, then doubling): its rows
        take memory only when first written. Doubling from a small table copied every row
        (and faulted fresh pages) at each growth: 3-9 ms a step of a new store's first
        32-particle SMC run on SmolLM2's vocabulary (2-core CPU). A device table (whose
        memory is taken when allocated) starts at ``_FIRST_TABLE_BYTES`` and doubles up
        to ``max_rows``. Idle rows are reused before new ones are taken, so the memory
        written stays near the working set."""
        cap = 0 if self.table is None else self.table.shape[0]
        if rows > cap:
            on_device = torch.is_tensor(like) and like.device.type != "cpu"
            full = on_device or self.full_rows
            if self.table is None:
                self.width = self.trie.n_nodes if full else self.trie.row_width
            device = like.device if on_device else "cpu"
            first = max(64, _FIRST_TABLE_BYTES // self.row_bytes)  # a device (or refused host) table
            host_first = max(64, min(_HOST_FIRST_ROWS, _HOST_FIRST_BYTES // self.row_bytes))
            new_cap = max(rows, min(self.max_rows, max(first if on_device else host_first, 2 * cap)))
            try:
                table = self._new_table(new_cap, full, device)
            except (MemoryError, RuntimeError):  # a host refusing the address space: doubling
                if on_device:
                    raise
                new_cap = max(rows, min(self.max_rows, max(first, 2 * cap)))
                table = self._new_table(new_cap, full, device)
            if full:
                self._grow_held(new_cap, device)
            if cap:
                table[:cap] = self.table
            self.table = table
            self.gen = np.concatenate([self.gen, np.zeros(new_cap - cap, np.int64)])
            self.last_used = np.concatenate([self.last_used, np.zeros(new_cap - cap, np.int64)])
            self.in_use = np.concatenate([self.in_use, np.zeros(new_cap - cap, bool)])
            self.pins = np.concatenate([self.pins, np.zeros(new_cap - cap, np.int64)])
        self._key_of.extend([None] * (rows - len(self._key_of)))

    def _new_table(self, rows: int, full: bool, device):
        """An uninitialized ``[rows, width]`` float64 table: torch for full rows, else numpy."""
        if full:
            return torch.empty((rows, self.width), dtype=torch.float64, device=device)
        return np.empty((rows, self.width))

    def _grow_held(self, new_cap: int, device) -> None:
        """The host-held masses of a full-rows table, for at least ``new_cap`` slots, at
        first for ``max_rows`` at once (at most ``_HELD_FIRST_BYTES``; then doubling): rows
        of a new array take no memory until written, where doubling from the table's first
        size copied and faulted every row again (SmolLM2, up to 1,024 rows on the 2-core
        CPU: 2.3 against 6.0 ms, medians)."""
        if self._front_col is None:
            front = self.trie.root_front
            self._front_col = np.full(self.trie.n_nodes, -1, np.int64)
            self._front_col[front] = np.arange(len(front))
            self._front_nodes = torch.as_tensor(front, device=device)
        have = len(self.held_n)
        if new_cap <= have:
            return
        row_bytes = 8 * (len(self._front_nodes) + 2 * HELD_WIDTH)
        rows = max(new_cap, 2 * have, min(self.max_rows, _HELD_FIRST_BYTES // row_bytes))
        grown = (
            np.empty((rows, len(self._front_nodes))),
            np.empty((rows, HELD_WIDTH), np.int64),
            np.empty((rows, HELD_WIDTH)),
        )
        if have:
            for new, old in zip(grown, (self.front_mass, self.held_node, self.held_mass)):
                new[:have] = old
        self.front_mass, self.held_node, self.held_mass = grown
        self.has_front = np.concatenate([self.has_front, np.zeros(rows - have, bool)])
        self.held_n = np.concatenate([self.held_n, np.zeros(rows - have, np.int64)])

    def _forget_held(self, slots) -> None:
        if self.front_mass is not None:
            self.has_front[slots] = False
            self.held_n[slots] = 0

    def gather(self, slot: np.ndarray, node: np.ndarray) -> np.ndarray:
        """Scaled masses of ``node[i]`` under row ``slot[i]`` on the host (float64); the
        rows count as used now."""
        self.last_used[slot] = self.clock
        if isinstance(self.table, np.ndarray):
            return self.trie.masses_at(self.table, slot, node)
        mass, missing = _held_masses(
            self._front_col, self.has_front, self.front_mass, self.held_node, self.held_mass, self.held_n, slot, node
        )
        if len(missing):
            mass[missing] = self._copied(slot[missing], node[missing])
        return mass

    def send_paths(self, slots: np.ndarray, nodes: np.ndarray, fronts: np.ndarray) -> PathCopy:
        """Start copying to the host, in one copy queued behind the work that writes the
        rows (the host does not wait), the masses of ``nodes[i]`` (a row of
        ``TokenByteTrie.path_nodes``: the root first, -1 for none) under row ``slots[i]`` of
        a full-rows table and, for the rows ``fronts`` (new rows whose next byte is
        unknown), their root fronts. ``keep_paths`` then puts them where ``gather`` finds
        them. The host's part is two kernels (``_keep_plan``, ``_keep_unpack``) around one
        gather on the device, where each root front is expanded from its row's offset."""
        sent, n_front_rows, path_row, path_node = _keep_plan(slots, nodes, fronts, self._front_col, self.width)
        index = to_device(sent, self.table.device)
        if n_front_rows:
            front = (index[:n_front_rows, None] + self._front_nodes).view(-1)
            index = torch.cat([front, index[n_front_rows:]]) if len(path_row) else front
        masses, event = to_host_queued(self.table.view(-1)[index])
        self.copies += 1
        return PathCopy(slots, fronts, path_row, path_node, masses, event)

    def keep_paths(self, copy: PathCopy) -> np.ndarray:
        """Hold the masses of ``copy`` (``send_paths``, whose event has passed) on the
        host; returns its rows' root masses."""
        if copy.event is not None:
            copy.event.synchronize()
        return _keep_unpack(
            copy.masses.numpy(),
            copy.slots,
            copy.fronts,
            copy.path_row,
            copy.path_node,
            self.front_mass,
            self.has_front,
            self.held_node,
            self.held_mass,
            self.held_n,
        )

    def fetch(self, slots: np.ndarray, nodes: np.ndarray) -> HeldCopy:
        """Start copying the masses of ``nodes[i]`` under rows ``slots[i]`` of a full-rows
        table to the host: queued behind the GPU's work, the host does not wait. ``hold``
        then puts them where ``gather`` finds them."""
        got, event = to_host_queued(self._entries(slots, nodes))
        self.copies += 1
        return HeldCopy(slots, nodes, self.gen[slots], got, event)

    async def hold(self, copy: HeldCopy) -> None:
        """Hold the masses of ``copy`` (``fetch``) on the host, once copied; those of rows
        reused since are dropped."""
        if copy.event is not None:
            await event_done(copy.event)
        fresh = self.gen[copy.slots] == copy.gens
        _hold(
            self.held_node,
            self.held_mass,
            self.held_n,
            copy.slots[fresh],
            copy.nodes[fresh],
            copy.masses.numpy()[fresh],
        )

    def _copied(self, slot: np.ndarray, node: np.ndarray) -> np.ndarray:
        """Entries ``(slot[i], node[i])`` of the torch table, copied to the host."""
        self.copies += 1
        return to_host(self._entries(slot, node))

    def _entries(self, slot: np.ndarray, node: np.ndarray) -> torch.Tensor:
        """Entries ``(slot[i], node[i])`` of the torch table, gathered where it lives."""
        return self.table.view(-1)[to_device(slot * self.width + node, self.table.device)]

    def row(self, slot: int) -> np.ndarray:
        """The masses of every node under one row, on the host."""
        if isinstance(self.table, np.ndarray):
            n = self.trie.n_nodes
            return self.trie.masses_at(self.table, np.full(n, slot), np.arange(n))
        return to_host(self.table[slot])


#: masses a full row keeps on the host for the bytes known after its context (nodes and
#: leaves; ``MassStore.keep_paths``): the nodes of the longest tokens are read from the GPU
PATH_WIDTH = 48

#: masses a full row holds on the host besides its root front (paths, candidates'
#: fronts: a front has at most 222 masses on SmolLM2's vocabulary, 17 on average one
#: byte from the root); new masses that do not fit replace those held before
HELD_WIDTH = 512


@dataclass(frozen=True, slots=True)
class PathCopy:
    """New rows' path masses and root fronts on their way to the host
    (``MassStore.send_paths``): rows ``slots``, which of them send their root fronts
    (``fronts``), each path entry's row index and node, into ``masses`` (host memory once
    ``event`` has passed; None: copied already)."""

    slots: np.ndarray
    fronts: np.ndarray
    path_row: np.ndarray
    path_node: np.ndarray
    masses: torch.Tensor
    event: Any


@dataclass(frozen=True, slots=True)
class HeldCopy:
    """A copy of table entries on its way to the host (``MassStore.fetch``): rows
    ``slots`` at generations ``gens``, nodes ``nodes``, into ``masses`` (host memory
    once ``event`` has passed; None: copied already)."""

    slots: np.ndarray
    nodes: np.ndarray
    gens: np.ndarray
    masses: torch.Tensor
    event: Any


@numba.njit(cache=True, nogil=True)
def _held_masses(front_col, has_front, front_mass, held_node, held_mass, held_n, slot, node):
    """``MassStore.gather``'s masses held on the host: ``(mass, missing)``, ``mass[i]``
    found in slot ``slot[i]``'s root front or held list (``missing``: the indices not
    found)."""
    mass = np.empty(len(slot))
    missing = np.empty(len(slot), np.int64)
    n_missing = 0
    for i in range(len(slot)):
        s, n = slot[i], node[i]
        col = front_col[n]
        if col >= 0 and has_front[s]:
            mass[i] = front_mass[s, col]
            continue
        k = np.searchsorted(held_node[s, : held_n[s]], n)
        if k < held_n[s] and held_node[s, k] == n:
            mass[i] = held_mass[s, k]
        else:
            missing[n_missing] = i
            n_missing += 1
    return mass, missing[:n_missing]


@numba.njit(cache=True, nogil=True)
def _hold(held_node, held_mass, held_n, slot, node, mass):
    """Merge the entries ``(slot[i], node[i], mass[i])`` into each slot's held list (sorted
    by node, each node once: a node held already keeps its mass). When the list would
    outgrow its width, the new entries replace it (the smallest nodes first, if they
    alone do not fit)."""
    width = held_node.shape[1]
    order = np.argsort(slot * (1 << 32) + node)
    buf_node = np.empty(width, np.int64)
    buf_mass = np.empty(width)
    i, n = 0, len(order)
    while i < n:
        s = slot[order[i]]
        end = i
        while end < n and slot[order[end]] == s:
            end += 1
        n_old = held_n[s] if held_n[s] + end - i <= width else 0
        a, b, k = 0, i, 0
        while k < width and (a < n_old or b < end):
            if b < end and (a == n_old or node[order[b]] < held_node[s, a]):
                v, m = node[order[b]], mass[order[b]]
                b += 1
            else:
                v, m = held_node[s, a], held_mass[s, a]
                a += 1
                while b < end and node[order[b]] == v:
                    b += 1
            if k == 0 or buf_node[k - 1] != v:
                buf_node[k], buf_mass[k] = v, m
                k += 1
        held_node[s, :k], held_mass[s, :k] = buf_node[:k], buf_mass[:k]
        held_n[s] = k
        i = end


@numba.njit(cache=True, nogil=True)
def _keep_plan(slots, nodes, fronts, front_col, width):
    """``MassStore.send_paths``'s copy: the flat table offsets to send (first each front
    row's ``slot * width``, then each path entry's ``slot * width + node``), the number of
    front rows, and each path entry's row and node. A front row's nodes that its root
    front holds are not path entries."""
    n, w = nodes.shape
    front_offset = np.empty(n, np.int64)
    path_row = np.empty(n * w, np.int64)
    path_node = np.empty(n * w, np.int64)
    f = p = 0
    for i in range(n):
        if fronts[i]:
            front_offset[f] = slots[i] * width
            f += 1
        for j in range(w):
            v = nodes[i, j]
            if v >= 0 and not (fronts[i] and front_col[v] >= 0):
                path_row[p], path_node[p] = i, v
                p += 1
    path_row, path_node = path_row[:p], path_node[:p]
    sent = np.concatenate((front_offset[:f], slots[path_row] * width + path_node))
    return sent, f, path_row, path_node


@numba.njit(cache=True, nogil=True)
def _keep_unpack(got, slots, fronts, path_row, path_node, front_mass, has_front, held_node, held_mass, held_n):
    """Put ``send_paths``'s copy ``got`` (the front rows' root fronts, then the path
    entries of ``_keep_plan``) where ``gather`` finds it; returns each row's root mass
    (its front's first entry, or its path's first: the root)."""
    width = front_mass.shape[1]
    root = np.empty(len(slots))
    f = 0
    for i in range(len(slots)):
        if fronts[i]:
            s = slots[i]
            front_mass[s, :] = got[f * width : (f + 1) * width]
            has_front[s] = True
            root[i] = got[f * width]
            f += 1
    path = got[f * width :]
    last = -1
    for p in range(len(path_row)):
        if path_row[p] != last:  # a row's first path entry is its root
            last = path_row[p]
            if not fronts[last]:
                root[last] = path[p]
    _hold(held_node, held_mass, held_n, slots[path_row], path_node, path)
    return root


@numba.njit(cache=True, nogil=True)
def _pick_slots(in_use, pins, last_used, n_slots, need, idle_before, now, max_rows):
    """``MassStore.allocate``'s choice of ``need`` rows among the ``n_slots`` existing
    ones: free slots; then rows last used before ``idle_before``, least recently used
    first; then new rows while fewer than ``max_rows`` exist; then rows last used before
    ``now``, least recently used first; then new rows past ``max_rows``. Pinned rows
    (``pins > 0``) are never picked. Returns the existing slots picked, in that order,
    and the number of new rows."""
    picked = np.empty(need, np.int64)
    k = 0
    for s in range(n_slots):
        if k < need and not in_use[s] and pins[s] == 0:
            picked[k] = s
            k += 1
    used, last = in_use[:n_slots] & (pins[:n_slots] == 0), last_used[:n_slots]
    if k < need:
        idle = np.flatnonzero(used & (last < idle_before))
        idle = idle[np.argsort(last[idle], kind="mergesort")][: need - k]
        picked[k : k + len(idle)] = idle
        k += len(idle)
    n_new = min(need - k, max(0, max_rows - n_slots))
    if k + n_new < need:  # every idle row is taken: rows not used since the last allocation
        old = np.flatnonzero(used & (last < now) & (last >= idle_before))
        old = old[np.argsort(last[old], kind="mergesort")][: need - k - n_new]
        picked[k : k + len(old)] = old
        k += len(old)
        n_new = need - k
    return picked[:k], n_new


def lm_context_limit(lm: Any) -> int | None:
    """The most tokens ``lm`` can take as a context, when it says: its own
    ``max_context_length``, vLLM's ``max_model_len`` (minus the position of the next
    token), or a Hugging Face model's ``config.max_position_embeddings``."""
    value = getattr(lm, "max_context_length", None)
    if value is None and getattr(lm, "max_model_len", None) is not None:
        value = int(lm.max_model_len) - 1
    if value is None:
        config = getattr(getattr(lm, "model", None), "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        return None
    return int(value)


def _special_id(lm: Any, name: str) -> int | None:
    value = getattr(lm, name, None)
    if value is None and getattr(lm, "tokenizer", None) is not None:
        value = getattr(lm.tokenizer, name, None)
    return None if value is None else int(value)


@dataclass
class TokenModel:
    """A token LM, its trie, and how contexts are presented to it.

    Args:
        lm: an ``AsyncLM``-like object (``byte_vocab``, ``batch_next_token_logprobs``).
        eos_tokens: byte strings that mean end-of-sequence. ``None`` takes the LM's EOS
            token (``eos_token_id`` of the LM or its tokenizer) when there is one.
        max_context_length: the most tokens the LM sees (states keep their full
            context). The LM's own limit (see :func:`lm_context_limit`) caps it, so a
            context or prompt longer than the model's window never reaches the model.
            Truncation rule: a context longer than the window is cut to its first token,
            when that is the start token (BOS, or EOS used as document start; see
            ``initial_state``), followed by its most recent tokens, ``window`` tokens in
            all (a window of 1 keeps only the last token).
        device: where trie masses are computed (``"cpu"``, ``"cuda"``); default: where
            the LM returns its log-probs.
        canonical: keep only canonical tokenizations (as in Phan et al. 2024 and
            ByteSampler): a token is committed only if the tokenizer's own encoding of
            the bytes of the last ``canonical_window`` committed tokens (the window
            stops at special tokens such as BOS) is exactly those tokens. Needs
            ``lm.tokenizer`` (a Hugging Face tokenizer). With the default window of 2 this
            is the bigram test, which decides canonicity for plain BPE merges (Vieira et
            al. 2025); pretokenizer context wider than the window is not seen, and windows
            whose bytes are not valid UTF-8 (a character split across tokens) cannot be
            encoded and are accepted unchecked. Mass of tokens still being read is not
            filtered, only commits are; healed tokens are not checked.
        canonical_window: tokens checked per commit (>= 1).
        lookahead: when the bytes ahead are known (scoring, prefill, a potential's
            context), a batch that has to call the LM also asks for the contexts the next
            ``lookahead`` bytes may need (see ``beam.advance``), so that later steps find
            them in the LM's cache: fewer, larger LM calls, same values. Only for LMs that
            cache log-probs and say so (``lm.has_logprobs(token_ids) -> bool``); 0: off.
        max_prefetch: most contexts one LM call asks for, when it prefetches.
        draft_window: when the bytes ahead are a known text (scoring up to four texts in
            lockstep, prefill), a step that prefetches takes the contexts that a draft of each
            beam makes reading this many bytes ahead on stand-in rows
            (:mod:`~genlm_bytes_potential.beam.draft`), up to ``4 * max_prefetch`` a beam, instead of guesses ranked ``lookahead`` bytes ahead
            (0: guesses only). Same values. The default, 16, took W1 (K=8, SmolLM2, the
            whole held-out text) from 596 to 251 forward passes and ~900 to ~1,550 B/s on
            an H200 (benchmarks/HISTORY.md, session 28).
        mass_bytes: bytes of trie-mass rows the model keeps (:class:`MassStore`; on the
            device where masses are computed). Rows are recomputed when needed again.

    Making one raises Python's young-generation collection threshold for the process
    (:func:`~genlm_bytes_potential.collector.raise_young_threshold`); its first LM call
    that returns log-probs on a GPU sets torch to one CPU thread unless ``OMP_NUM_THREADS``
    is set (:func:`~genlm_bytes_potential.threads.for_gpu_inference`).
    """

    lm: Any
    eos_tokens: list[bytes] | None = None
    max_context_length: int | None = None
    device: str | None = None
    canonical: bool = False
    canonical_window: int = 2
    lookahead: int = 4
    max_prefetch: int = 64
    draft_window: int = DRAFT_WINDOW
    mass_bytes: float = 2**31
    trie: TokenByteTrie = field(init=False)
    stats: LMStats = field(init=False, default_factory=LMStats)

    def __post_init__(self):
        m = self.max_context_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, Integral) or m < 1):
            raise ValueError(f"max_context_length={m!r}; expected a positive int or None")
        limit = lm_context_limit(self.lm)
        #: tokens the LM sees at most: ``max_context_length`` capped by the LM's own limit
        self.window = min((x for x in (m, limit) if x is not None), default=None)
        vocab = vocabulary(self.lm.byte_vocab).tokens
        self.bos_token_id = _special_id(self.lm, "bos_token_id")
        self.eos_token_id = _special_id(self.lm, "eos_token_id")
        self.start_token_id = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        if self.eos_tokens is None:
            self.eos_tokens = [vocab[self.eos_token_id]] if self.eos_token_id is not None else []
        self.trie = cached_trie(self.lm.byte_vocab, self.eos_tokens)
        collector.raise_young_threshold()  # byte steps make many short-lived containers
        self._vocab = vocab
        self.lookahead = self._resolve_lookahead()
        self.store = MassStore(self.trie, self.mass_bytes)
        self._extensions: dict[tuple[LMState, int], LMState] = {}  # see extend
        #: the proxy contexts of recently drafted texts (``beam.draft._Proxies``), by text
        self.drafts: dict[bytes, Any] = {}
        self._extension_tokens = 0
        if self.canonical:
            w = self.canonical_window
            if isinstance(w, bool) or not isinstance(w, Integral) or w < 1:
                raise ValueError(f"canonical_window={w!r}; expected an int >= 1")
            tok = getattr(self.lm, "tokenizer", None)
            if tok is None or not hasattr(tok, "encode"):
                raise ValueError(
                    f"canonical=True needs the LM's tokenizer (lm.tokenizer with .encode); "
                    f"{type(self.lm).__name__} has {'none' if tok is None else type(tok).__name__}"
                )
            self._tokenizer = tok
            self._special = frozenset(int(t) for t in getattr(tok, "all_special_ids", ()) or ())
            self._canonical_memo: dict[tuple[int, ...], bool] = {}

    def _resolve_lookahead(self) -> int:
        for name in ("lookahead", "max_prefetch", "draft_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 0:
                raise ValueError(f"{name}={v!r}; expected an int >= 0")
        return int(self.lookahead) if callable(getattr(self.lm, "has_logprobs", None)) else 0

    def extend(self, state: LMState, token: int) -> LMState:
        """``state`` followed by ``token``: the object made the last time it was asked for,
        while the memo of recent extensions (``_EXTENSIONS_KEPT``) holds it. A scoring step's
        speculation asks again for most of the contexts the previous one asked for, and
        the beam then for those it keeps (47% of a W1 run's extensions repeat one); a repeat
        copies and hashes no tokens, and lookups of the same object compare by identity."""
        key = (state, token)
        child = self._extensions.get(key)
        if child is None:
            n = len(state.tokens) + 1
            if len(self._extensions) >= _EXTENSIONS_KEPT or self._extension_tokens + n > _EXTENSION_TOKENS_KEPT:
                self._extensions.clear()
                self._extension_tokens = 0
            child = self._extensions[key] = state.extend(token)
            self._extension_tokens += n
        return child

    def would_call(self, states: list[LMState], with_eos: bool) -> bool:
        """Whether ``rows(states, with_eos)`` may need an LM forward pass: some state has
        no stored row and the (caching) LM lacks its log-probs."""
        missing = [s for s in states if (with_eos, s) not in self.store]
        return bool(missing) and (not self.lookahead or not all(self._cached(s) for s in missing))

    def _cached(self, state: LMState) -> bool:
        """Whether the (caching) LM holds ``state``'s log-probs."""
        return self.lm.has_logprobs(self.model_input(state))

    def is_canonical(self, tokens: tuple[int, ...]) -> bool:
        """Whether the last committed token of ``tokens`` passes the canonicity check
        (see ``canonical``): the tokenizer re-encodes the trailing window to itself. A
        window starting inside a UTF-8 character widens left to the character's start
        (at most 3 tokens); one ending inside a character is left to the next commit."""
        tail: list[int] = []
        for t in reversed(tokens):
            if t in self._special or len(tail) == self.canonical_window + 3:
                break
            tail.append(t)
        tail.reverse()
        key = tuple(tail)
        hit = self._canonical_memo.get(key)
        if hit is None:
            hit = self._check_window(key)
            if len(self._canonical_memo) >= 1 << 20:
                self._canonical_memo.clear()
            self._canonical_memo[key] = hit
        return hit

    def _check_window(self, tail: tuple[int, ...]) -> bool:
        n = min(self.canonical_window, len(tail))
        while 0 < n <= len(tail):
            window = tail[len(tail) - n :]
            data = b"".join(self._vocab[t] for t in window)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and e.end >= len(data):
                    return True  # ends inside a character: checked at the next commit
                n += 1  # starts inside a character (or invalid bytes): widen left
                continue
            return list(self._tokenizer.encode(text, add_special_tokens=False)) == list(window)
        return True  # no encodable window: unchecked

    def initial_state(self, prompt_tokens: list[int] | tuple[int, ...] = ()) -> LMState:
        """The context a byte string starts from: ``prompt_tokens``, after BOS when the
        tokenizer has one. A tokenizer without BOS starts from its EOS token (the usual
        document separator, e.g. GPT-2, Qwen) and, lacking both, from the bare prompt."""
        prompt = tuple(int(t) for t in prompt_tokens)
        for t in prompt:
            if not 0 <= t < self.trie.vocab_size:
                raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {self.trie.vocab_size})")
        start = self.start_token_id
        if start is not None and (not prompt or prompt[0] != start):
            prompt = (start,) + prompt
        return LMState(prompt)

    def model_input(self, state: LMState) -> tuple[int, ...]:
        """The tokens the LM sees for ``state`` (see the truncation rule above): the
        state's own tuple when it fits (no copy: contexts are long, and backends keep
        tuples as they are)."""
        tokens, n = state.tokens, self.window
        if n is not None and len(tokens) > n:
            if n >= 2 and self.start_token_id is not None and tokens[0] == self.start_token_id:
                return (tokens[0], *tokens[len(tokens) - n + 1 :])
            return tokens[-n:]
        return tokens

    async def rows(
        self,
        states: list[LMState],
        with_eos: bool,
        prefetch: list[LMState] = (),
        ahead: Mapping[LMState, bytes | memoryview] | None = None,
    ) -> MassRows:
        """Stored mass rows of the states' next-token distributions: rows already stored are
        found; the rest come from one LM batch call over the distinct missing contexts and
        one trie batch written into the store. Within a row, mass ratios are exact.

        ``prefetch``: contexts asked for in the same LM call (see ``lookahead``), so that
        later steps find them in the LM's cache; when masses are computed on a GPU, their
        rows are computed in the same trie batch and stored too (later steps then skip the
        LM). On the host only the asked-for rows are computed: most prefetched contexts
        are never read, and a row costs a pass over the trie.

        ``ahead``: the bytes known to follow some of these contexts (the rest of a text
        being scored or a prompt being read): a full row (on a GPU) brings the masses that
        reading them visits to the host with it (``MassStore.keep_paths``)."""
        keys = [(with_eos, s) for s in states]
        store = self.store
        slot = store.find(keys)
        gen = np.zeros(len(slot), np.int64)
        found = slot >= 0
        gen[found] = store.gen[slot[found]]  # as found: a row reused while this call awaits reads as stale
        missing = np.flatnonzero(slot < 0)
        if len(missing):
            todo: dict[tuple[bool, LMState], None] = dict.fromkeys(keys[i] for i in missing.tolist())
            n_asked = len(todo)
            if self.lookahead:  # prefetched rows must not crowd out the store
                limit = max(store.max_rows, n_asked)
                for s in prefetch:
                    if len(todo) >= limit:
                        break
                    key = (with_eos, s)
                    if key not in store and key not in todo and not self._cached(s):
                        todo[key] = None
            new = await self._compute(list(todo), with_eos, n_asked, ahead or {})
            slot[missing], gen[missing] = zip(*(new[keys[i]] for i in missing.tolist()))
        return MassRows(slot, gen)

    async def _compute(self, keys: list, with_eos: bool, n_asked: int, ahead: Mapping) -> dict:
        """One LM call for ``keys`` (absent from the store) and one trie batch for the
        first ``n_asked`` of them (for all on a GPU), written into the store, full rows
        with the masses along the bytes ``ahead`` of their contexts held on the host.
        Returns the ``(slot, generation)`` of each key given a row.

        The GPU's work runs while other tasks run (the grammar of a product, another batch
        of particles): masses computed on the host await the forward pass before any row is
        allocated; masses kept on the GPU are queued behind it into pinned rows, with the
        copy of what the host holds of them (``send_paths``) behind those, and the call
        awaits the copy: one wait for all three, the host planning the copy meanwhile."""
        inputs = [self.model_input(s) for _, s in keys]
        store = self.store
        allocations = store.clock  # the store's allocations so far
        try:
            logprobs = await self.lm.batch_next_token_logprobs(inputs)
        except Exception as e:  # not CancelledError: cancellation passes through as is
            raise RuntimeError(
                f"LM call failed: {type(self.lm).__name__}.batch_next_token_logprobs on "
                f"{len(inputs)} token contexts ({self._describe(inputs[0])}): {type(e).__name__}: {e}"
            ) from e
        self.stats.batch_calls += 1
        self.stats.contexts += len(inputs)
        collector.lm_called()
        if not torch.is_tensor(logprobs):
            logprobs = torch.as_tensor(np.asarray(logprobs))
        self._check_shape(logprobs, inputs)
        if logprobs.device.type != "cpu":
            threads.for_gpu_inference()
        on_host = torch.device(self.device or logprobs.device).type == "cpu"  # where the masses are computed
        if on_host:  # (a copy to the host would block the event loop while the GPU works)
            await device_done(logprobs.device)
        if self.device is not None:
            logprobs = logprobs.to(self.device)
        if on_host:  # host rows: numpy from here on
            if logprobs.dtype not in (torch.float32, torch.float64):
                logprobs = logprobs.to(torch.float64)
            keys, logprobs = keys[:n_asked], logprobs.numpy()[:n_asked]
        out = {}
        if store.clock != allocations:  # a concurrent call stored rows while this one awaited the LM
            known = store.find(keys)
            out = {k: (int(s), int(store.gen[s])) for k, s in zip(keys, known.tolist()) if s >= 0}
        if out:
            new = np.flatnonzero(known < 0)
            keys, inputs = [keys[i] for i in new.tolist()], [inputs[i] for i in new.tolist()]
            logprobs = logprobs[
                new if isinstance(logprobs, np.ndarray) else torch.as_tensor(new, device=logprobs.device)
            ]
        if keys:
            slots = store.allocate(keys, logprobs)
            gens = store.gen[slots]  # as allocated: rows cleared while this call awaits read as stale
            try:
                if isinstance(store.table, np.ndarray):
                    self.trie.weight_rows(logprobs, with_eos, store.table, slots)
                    root_mass = store.gather(slots, np.full(len(slots), self.trie.root))
                else:
                    self.trie.masses(logprobs, with_eos=with_eos, out=store.table, out_rows=slots)
                    known = [ahead.get(s) for _, s in keys]
                    fronts = np.fromiter((not k for k in known), bool, len(known))
                    copy = store.send_paths(slots, self.trie.path_nodes(known, PATH_WIDTH), fronts)
                    if copy.event is not None:  # the forward pass, the masses, the copy
                        with store.pinned(slots):
                            await event_done(copy.event)
                    root_mass = store.keep_paths(copy)
                self._check_finite(root_mass, inputs)
            except BaseException:
                store.discard(keys)
                raise
            out.update(zip(keys, zip(slots.tolist(), gens.tolist())))
        return out

    async def ensure(self, rows: MassRows, states: tuple[LMState, ...], with_eos: bool) -> None:
        """Make every row of ``rows`` valid, recomputing (in place) those the store reused;
        all of them count as used now."""
        valid = self.store.valid(rows)
        self.store.touch(rows.slot[valid])
        stale = np.flatnonzero(~valid)
        if len(stale):
            fresh = await self.rows([states[i] for i in stale.tolist()], with_eos)
            rows.slot[stale], rows.gen[stale] = fresh.slot, fresh.gen

    def log_mass(self, slot: np.ndarray, node: np.ndarray) -> np.ndarray:
        """``log M(node[i])`` under the stored row ``slot[i]`` (scaled: only ratios within a
        row are meaningful); -inf where the mass is 0."""
        with np.errstate(divide="ignore"):
            return np.log(self.store.gather(slot, node))

    def _describe(self, tokens: tuple[int, ...]) -> str:
        tail = list(tokens[-8:])
        vocab = self.lm.byte_vocab
        text = b"".join(bytes(vocab[t]) for t in tail if 0 <= t < len(vocab))
        return f"first context: {len(tokens)} tokens, ending {tail} = {text!r}"

    def _check_shape(self, logprobs: torch.Tensor, inputs: list[tuple[int, ...]]) -> None:
        """The LM's answer must be ``[len(inputs), V]``."""
        want = (len(inputs), self.trie.vocab_size)
        if tuple(logprobs.shape) != want:
            raise RuntimeError(
                f"{type(self.lm).__name__}.batch_next_token_logprobs returned shape "
                f"{tuple(logprobs.shape)} for {len(inputs)} contexts; expected {list(want)} "
                f"(one row per context, one column per token of byte_vocab)"
            )

    def _check_finite(self, root_mass: np.ndarray, inputs: list[list[int]]) -> None:
        """A NaN or +inf log-prob anywhere in a row makes its root mass NaN (the trie sums
        every token into the root), so checking one number per row checks them all."""
        bad = np.nonzero(~np.isfinite(root_mass))[0]
        if len(bad):
            row = int(bad[0])
            raise RuntimeError(
                f"{type(self.lm).__name__}.batch_next_token_logprobs returned NaN or +inf "
                f"log-probabilities for context {row} of {len(inputs)} "
                f"({self._describe(inputs[row]).removeprefix('first context: ')})"
            )


class Vocabulary(NamedTuple):
    """An LM's tokens as ``bytes`` (``tokens[i]`` is token ``i``) and a digest of them
    (their lengths and their concatenation, which together spell the vocabulary)."""

    tokens: list[bytes]
    digest: bytes


_VOCABS: OrderedDict[int, tuple[Any, Vocabulary]] = OrderedDict()
_TRIES: OrderedDict[tuple, TokenByteTrie] = OrderedDict()
_TRIES_KEPT = 4  # vocabularies (and tries) kept


def vocabulary(byte_vocab) -> Vocabulary:
    """``byte_vocab`` (an LM's tokens as bytes-like objects) read once per object: a model
    made again on the same LM (a new potential, ``spawn``) neither converts nor hashes
    SmolLM2's 49,152 tokens again (~10 ms). The memo holds each object it keys, so no
    other object takes its id; a vocabulary changed in place after its first read is
    seen only if its length changed."""
    key = id(byte_vocab)
    hit = _VOCABS.get(key)
    if hit is None or len(hit[1].tokens) != len(byte_vocab):
        tokens = [bytes(t) for t in byte_vocab]
        digest = hashlib.blake2b(np.fromiter(map(len, tokens), np.int64, len(tokens)).tobytes(), digest_size=16)
        digest.update(b"".join(tokens))
        hit = _VOCABS[key] = (byte_vocab, Vocabulary(tokens, digest.digest()))
        while len(_VOCABS) > _TRIES_KEPT:
            _VOCABS.popitem(last=False)
    _VOCABS.move_to_end(key)
    return hit[1]


def cached_trie(byte_vocab, eos_tokens) -> TokenByteTrie:
    """The trie of a vocabulary (see :func:`vocabulary`) and EOS set, built once per
    process (the last ``_TRIES_KEPT`` are kept): a potential over SmolLM2's vocabulary
    no longer rebuilds its ~0.9 s trie on every construction. Equal vocabularies in
    different objects share one trie."""
    vocab = vocabulary(byte_vocab)
    key = (vocab.digest, len(vocab.tokens), frozenset(bytes(e) for e in eos_tokens))
    trie = _TRIES.get(key)
    if trie is None:
        trie = _TRIES[key] = TokenByteTrie(vocab.tokens, eos_tokens)
        while len(_TRIES) > _TRIES_KEPT:
            _TRIES.popitem(last=False)
    _TRIES.move_to_end(key)
    return trie
