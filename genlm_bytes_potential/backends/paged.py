"""``AsyncLM`` for Llama-family Hugging Face models: one KV slot per token-trie node,
and CUDA graphs for one-token steps.

A byte beam asks, at every byte, for the next-token distributions of a few contexts
that each extend a context it asked for before by one token. :class:`PagedTokenLM`
makes that step cheap:

* every evaluated context is a path in a trie of token prefixes, and every trie node
  owns one slot of a preallocated key/value pool (``[layers, slots, 2 * kv_heads,
  head_dim]``). A context that extends a cached one by ``n`` tokens computes ``n``
  tokens and writes ``n`` slots; its keys are gathered by slot index, so nothing is
  copied or concatenated per context, and contexts sharing a prefix share its slots;
* all contexts of a call run as one batch (rows may even extend a token that another
  row of the same batch writes: all rows write a layer's slots before any reads them);
* one-token rows whose contexts share many of their tokens (a beam's candidates and the
  contexts prefetched for them, which may part ways anywhere, even at their first token)
  attend over one key set for the whole batch: the union of their slot paths, each slot
  once, each row seeing its own path under a mask (``_pack_tree``), so that attention
  reads the union's ``U`` keys where a row of ``S`` keys each would read ``B * S``;
* on CUDA, a batch of steps of at most ``GRAPH_TOKENS`` new tokens per row replays a
  CUDA graph captured once per (new tokens, rows, key length) bucket: the whole
  30-layer forward costs one launch;
* on CUDA (eager layer) the rotary embedding, the KV write and the query's layout are
  one Triton kernel, and the gated activation another (:mod:`.kernels`: the same values
  bit for bit, 5 kernels a layer fewer);
* with ``compile=True`` the decoder layer of those graphs is one ``torch.compile``
  program (inductor, no cudagraphs of its own), compiled once per shape class (one or
  several rows, one or several new tokens) and shared by all layers (weights are
  arguments): RMSNorm, rotary embedding, the pool write and the gated activation fuse
  into a few Triton kernels beside the cuBLAS matmuls and SDPA; the log-prob head
  (final norm, lm_head, log_softmax, row write) likewise;
* the host's work per call is small: per new context a few dict operations and one node;
  a batch of one-token steps is packed column by column (numpy) straight into
  page-locked memory, one transfer (``benchmarks/lm_step.py`` measures it).

The forward pass uses the model's own weights and rotary embedding and computes what the
Hugging Face model computes, with fewer kernels (q/k/v and gate/up projections fused,
residual adds folded into the matmuls, fused RMSNorm, rotary tables by position); the
attention reads keys from the pool: for query position ``p`` of a row with key slots
``s_0..s_{S-1}`` (the context's tokens in order), softmax over keys ``j <= p``.

Supported: ``SUPPORTED_MODEL_TYPES`` (Llama and SmolLM, Mistral without sliding window,
Qwen2, Qwen3); other models: :class:`~genlm_bytes_potential.backends.hf.HFTokenLM`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from genlm_bytes_potential.backends import kernels
from genlm_bytes_potential.backends.hf import HFTokenLM
from genlm_bytes_potential.backends.protocol import context_prefix, token_tuple
from genlm_bytes_potential.transfer import capture_graph, to_device

__all__ = ["COMPILE_MODES", "GRAPH_TOKENS", "PagedTokenLM", "SUPPORTED_MODEL_TYPES"]

#: Hugging Face ``model_type`` values whose decoder layers the paged forward reproduces:
#: RMSNorm, rotary q/k (optional per-head q/k RMSNorm), grouped-query attention, gated MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: ``torch.compile`` modes that ``PagedTokenLM(compile=...)`` takes: those without
#: cudagraphs of their own (``max-autotune-no-cudagraphs`` also tunes the matmuls as
#: Triton templates, with their epilogues fused: minutes of compiling)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

#: SDPA's kernels in the order the forward asks for them, whatever the process's global
#: settings: importing vLLM turns cuDNN's off process-wide (``vllm.platforms.cuda``), and
#: the attention kernel, so the bf16 log-probs, then depended on whether vLLM was imported
#: (on an H200 cuDNN's also runs 1.8-3x faster than the memory-efficient one here)
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

#: most new tokens per row of a forward pass replayed from a CUDA graph (padded to 1, 2
#: or 4) and run through the compiled layer: a beam's steps, prefetches and short rows
GRAPH_TOKENS = 4


class _Node:
    """One token of a cached context: its KV slot, its parent, and (when the context was
    asked for) the row of the log-prob pool holding its next-token log-probs. ``path``,
    the slots of the whole context in order, is built on first use from the parent's."""

    __slots__ = ("parent", "slot", "_path", "children", "row", "wave", "tick")

    def __init__(self, parent, slot: int):
        self.parent = parent
        self.slot = slot
        self._path: np.ndarray | None = None
        self.children = 0
        self.row = -1  # log-prob pool row; -1: none
        self.wave = -1  # forward pass of the current batch that writes this slot
        self.tick = 0  # last use (for eviction)

    @property
    def path(self) -> np.ndarray:
        if self._path is None:
            slots, node = [], self
            while node is not None and node._path is None:  # up to the nearest built path
                slots.append(node.slot)
                node = node.parent
            head = _NO_SLOTS if node is None else node._path
            self._path = np.concatenate((head, np.array(slots[::-1], np.int64)))
        return self._path


_NO_SLOTS = np.zeros(0, np.int64)


class _SlotTrie:
    """Token-prefix trie over a pool of ``n_slots`` KV slots (slot 0 is scratch) and a
    pool of ``n_rows`` log-prob rows. Prefix-closed: only leaves are evicted, least
    recently used first; a context asked for takes a free row or the least recently
    used context's row."""

    def __init__(self, n_slots: int, n_rows: int):
        self.n_slots = n_slots
        self.n_rows = n_rows
        self.clear()

    def clear(self):
        self.nodes: dict[tuple[int, ...], _Node] = {}
        self.free = list(range(self.n_slots - 1, 0, -1))
        self.free_rows = list(range(self.n_rows - 1, -1, -1))
        # least recently used first; an OrderedDict pops its first entry in O(1), where a
        # dict's first entry is found past every entry deleted before it
        self.with_logprobs: OrderedDict[tuple[int, ...], _Node] = OrderedDict()
        self.tick = 0
        self.evictions = 0

    def deepest(self, ctx: tuple[int, ...]) -> tuple[int, _Node | None]:
        """Length of the longest prefix of ``ctx`` in the trie and its node: ``ctx``
        itself or its parent (a beam's usual step), else binary search (the trie is
        prefix-closed)."""
        n, nodes = len(ctx), self.nodes
        node = nodes.get(ctx)
        if node is not None:
            return n, node
        if n > 1 and (node := nodes.get(context_prefix(ctx))) is not None:
            return n - 1, node
        lo, hi = 0, n - 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ctx[:mid] in nodes:
                lo = mid
            else:
                hi = mid - 1
        return lo, nodes.get(ctx[:lo]) if lo else None

    def add(self, ctx: tuple[int, ...], parent: _Node | None) -> _Node:
        """A new node for ``ctx``, whose parent ``ctx[:-1]`` (``parent``) is in the trie
        (or ``ctx`` has one token and ``parent`` is None)."""
        node = _Node(parent, self.free.pop())
        if parent is not None:
            parent.children += 1
        self.nodes[ctx] = node
        return node

    def _remove(self, ctx, node: _Node) -> None:
        """Forget ``ctx``: free its slot and its log-prob row."""
        del self.nodes[ctx]
        self.release_row(ctx, node)
        self.free.append(node.slot)

    def release_row(self, ctx, node: _Node) -> None:
        if node.row >= 0:
            del self.with_logprobs[ctx]
            self.free_rows.append(node.row)
            node.row = -1

    def discard(self, keys) -> None:
        """Remove nodes (children before their parents) and free their slots."""
        for ctx in keys:
            node = self.nodes[ctx]
            self._remove(ctx, node)
            if node.parent is not None:
                node.parent.children -= 1

    def take_row(self, ctx, node: _Node) -> int:
        """The log-prob row of ``ctx`` (now the most recently used): its own, a free one,
        or the least recently used context's."""
        return self.take_rows([ctx], [node])[0]

    def take_rows(self, contexts, nodes) -> list[int]:
        """``take_row`` of each context in turn (all now used last, at one tick)."""
        lru, free = self.with_logprobs, self.free_rows
        self.tick += 1
        tick, rows = self.tick, []
        for ctx, node in zip(contexts, nodes):
            node.tick = tick
            if node.row < 0:
                if free:
                    node.row = free.pop()
                else:
                    old = lru.popitem(last=False)[1]
                    node.row, old.row = old.row, -1
                lru[ctx] = node
            else:
                lru.move_to_end(ctx)
            rows.append(node.row)
        return rows

    def reserve(self, need: int, pinned: set[tuple[int, ...]]) -> None:
        """Free slots until ``need`` are free (aiming for an eighth of the pool more),
        evicting least recently used leaves not in ``pinned``; a parent left childless
        goes with its child unless it holds log-probs (then it waits for its own turn)."""
        target = min(self.n_slots - 1, need + (self.n_slots - 1) // 8)
        while len(self.free) < need:
            leaves = sorted((n.tick, ctx) for ctx, n in self.nodes.items() if not n.children and ctx not in pinned)
            if not leaves:
                raise RuntimeError(
                    f"KV pool too small: this batch needs {need} new slots but only {len(self.free)} of "
                    f"{self.n_slots - 1} can be freed; raise kv_cache_bytes or lower max_batch_tokens"
                )
            for _, ctx in leaves:
                node = self.nodes[ctx]
                while True:
                    self._remove(ctx, node)
                    self.evictions += 1
                    node, ctx = node.parent, ctx[:-1]
                    if node is None:
                        break
                    node.children -= 1
                    if node.children or node.row >= 0 or ctx in pinned:
                        break
                if len(self.free) >= target:
                    return


class PagedTokenLM(HFTokenLM):
    """Token-level ``AsyncLM`` with a slot-paged KV pool (and CUDA graphs on GPU); a
    :class:`~genlm_bytes_potential.backends.protocol.CachingTokenLM`.

    Args:
        model: a ``transformers`` causal LM of the supported family (see the module
            docstring); its weights are used as they are (dtype and device).
        tokenizer: its tokenizer.
        kv_cache_bytes: size of the KV pool (one slot per cached token).
        logprob_cache_bytes: memory for cached next-token log-prob rows (float32, one
            per context asked for; least recently used rows are reused first), allocated
            at once; one call may ask for as many distinct contexts as it holds rows.
        max_batch_size: most rows per forward pass.
        max_batch_tokens: most padded new-token positions (rows x longest) per pass.
        cuda_graphs: replay captured graphs for batches of at most ``GRAPH_TOKENS``
            new tokens per row (CUDA only).
        compile: run the decoder layer of those batches (graphs or not) as one
            ``torch.compile`` program; a string: on, with that ``torch.compile`` mode (one
            of ``COMPILE_MODES``: none with cudagraphs of its own). If compiling fails, a
            warning says why and the eager layer is used (``compile`` becomes False).
            Off by default: on an H200 (SmolLM2, bf16) it cut a step of 1 / 32 one-token
            contexts from 1.92 / 2.42 to 1.49 / 2.12 ms, but scoring a 2,113-byte text
            ran at 0.85-0.89x the eager layer's median speed (128-row batches over keys
            up to 1,024), and a process's first call compiles for ~16 s (all measured
            before ``fused_kernels``, with which the eager step takes 1.49 / 1.94 ms).
        fused_kernels: run the eager layer's rotary embedding and KV write, and its gated
            activation, as one kernel each (:mod:`.kernels`: the same values; CUDA with
            Triton, SiLU models, head dims that are powers of two; ignored elsewhere and
            with ``compile``).
        attention_kernel: attend over one key set shared by a batch's one-token rows (a
            beam's step) by :func:`.kernels.shared_keys_attention` instead of SDPA: the
            keys split across programs and read from the KV pool in place (CUDA with
            Triton, bf16 or fp16 weights, head dims of 16 or more that are powers of two;
            ignored elsewhere and with ``compile``). Equal to SDPA up to the order of its
            float32 sums; on an H200 a layer over ~800 keys took 10 µs against SDPA's 22
            (the gather of the keys included).

    Log-probs are returned on the model's device (float32). Counters as
    :class:`HFTokenLM`, plus ``graph_replays`` and ``cache.evictions``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        kv_cache_bytes: int = 2 * 2**30,
        logprob_cache_bytes: int = 2**30,
        max_batch_size: int = 128,
        max_batch_tokens: int = 4096,
        cuda_graphs: bool = True,
        compile: bool | str = False,
        fused_kernels: bool = True,
        attention_kernel: bool = True,
    ):
        super().__init__(
            model, tokenizer, cache_bytes=0, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens
        )
        cfg = model.config
        model_type = getattr(cfg, "model_type", None)
        sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
        if model_type not in SUPPORTED_MODEL_TYPES or sliding:
            raise ValueError(
                f"PagedTokenLM supports model types {', '.join(SUPPORTED_MODEL_TYPES)} with full "
                f"attention; got {type(model).__name__} (model_type={model_type!r}"
                f"{', sliding window' if sliding else ''}). Use HFTokenLM."
            )
        inner = model.model
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        half = self.head_dim // 2
        # rotate_half(x) = roll(x, D/2) * sign, sign = (-1, ..., -1, +1, ..., +1)
        dtype = next(model.parameters()).dtype
        self._rope_sign = torch.cat((-torch.ones(half), torch.ones(half))).to(self.device, dtype)
        self._rope_cos, self._rope_sin = self._rope_tables(cfg, dtype)
        self._fuse_weights()
        q_norm = getattr(attn, "q_norm", None)
        act = self.layers[0].mlp.act_fn
        self._consts = _LayerConsts(
            heads=self.n_heads,
            kv_heads=self.kv_heads,
            eps=self.layers[0].input_layernorm.variance_epsilon,
            qk_eps=q_norm.variance_epsilon if q_norm is not None else 0.0,
            scale=attn.scaling,
            # one function object for every layer (each layer has its own module)
            act=F.silu if getattr(cfg, "hidden_act", None) in ("silu", "swish") else act,
        )
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected a bool or one of {', '.join(COMPILE_MODES)}")
        if self.model.lm_head.out_features < self.vocab_size:
            compile = False  # (log-probs of tokens past the head: HFTokenLM._normalize)
        self.compile = bool(compile)
        self.fused_kernels = bool(
            fused_kernels
            and not self.compile
            and kernels.available(self.device)
            and self._consts.act is F.silu
            and self.head_dim & (self.head_dim - 1) == 0
        )
        self.attention_kernel = bool(
            attention_kernel
            and not self.compile
            and kernels.available(self.device)
            and dtype in (torch.bfloat16, torch.float16)
            and self.head_dim >= 16
            and self.head_dim & (self.head_dim - 1) == 0
        )
        self._consts = self._consts._replace(fused=self.fused_kernels, attention_kernel=self.attention_kernel)
        #: the decoder layer and the log-prob head as compiled programs (our own CUDA
        #: graphs capture them: inductor's are off), or None
        self._compiled = None
        if self.compile:
            how = {"mode": compile} if isinstance(compile, str) else {"options": {"triton.cudagraphs": False}}
            self._compiled = tuple(torch.compile(f, fullgraph=True, **how) for f in (_layer, _head))
        per_slot = len(self.layers) * 2 * self.kv_heads * self.head_dim * dtype.itemsize
        n_slots = int(kv_cache_bytes) // per_slot
        if n_slots < 2 + max_batch_tokens:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds {n_slots} token slots of {per_slot} bytes; "
                f"expected room for at least max_batch_tokens + 2 = {max_batch_tokens + 2}"
            )
        self.kv_cache_bytes = int(kv_cache_bytes)
        #: keys then values of every slot: ``[layers, slots, 2 * kv_heads, head_dim]``
        self.pool = torch.empty(
            (len(self.layers), n_slots, 2 * self.kv_heads, self.head_dim), dtype=dtype, device=self.device
        )  # pages committed as slots fill
        self.pool[:, 0].zero_()  # scratch slot, read (masked) by padding: must be finite
        self.cache = _SlotTrie(n_slots, max(1, int(logprob_cache_bytes) // (4 * self.vocab_size)))
        #: next-token log-probs of cached contexts, one row each (``_Node.row``); the last
        #: row is scratch, written by the padding rows of a CUDA-graph batch
        self.logprob_rows = torch.empty(
            (self.cache.n_rows + 1, self.vocab_size), dtype=torch.float32, device=self.device
        )
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # on CUDA a batch is planned and queued without waiting for the GPU (inputs go
        # through page-locked memory, results stay on the device): no worker thread
        self._queues_on_gpu = self.device.type == "cuda"
        self._staging = _Staging(self.device)
        self._key_union = _KeyUnion(n_slots)
        self._graphs: dict[tuple[int, int, int], tuple] = {}
        self._graph_pool = None
        self.graph_replays = 0

    def __repr__(self):
        return f"PagedTokenLM({type(self.model).__name__}, V={self.vocab_size}, slots={self.cache.n_slots})"

    # ---- the forward pass ---------------------------------------------------

    def _fuse_weights(self) -> None:
        """Per layer, q/k/v projections as one matrix and gate/up as one (fewer kernels
        per token), and the layer's weights as plain tensors (``_LayerWeights``). The
        modules' own weights are re-pointed at slices of the fused matrices: values
        unchanged, no second copy in memory."""
        self._weights = []
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse(a.q_proj, a.k_proj, a.v_proj)
            gate_up, gate_up_bias = _fuse(mlp.gate_proj, mlp.up_proj)
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
            self._weights.append(
                _LayerWeights(
                    *(
                        None if t is None else t.detach()
                        for t in (
                            layer.input_layernorm.weight,
                            qkv,
                            qkv_bias,
                            None if q_norm is None else q_norm.weight,
                            None if k_norm is None else k_norm.weight,
                            a.o_proj.weight,
                            a.o_proj.bias,
                            layer.post_attention_layernorm.weight,
                            gate_up,
                            gate_up_bias,
                            mlp.down_proj.weight,
                            mlp.down_proj.bias,
                        )
                    )
                )
            )

    def _rope_tables(self, cfg, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``cos`` and ``sin * sign`` of the model's rotary embedding for positions
        ``0 .. max_position_embeddings - 1`` (``[P, head_dim]``), computed once by the
        model's own rotary module (elementwise in position: the same values as per call);
        None for rotary types that depend on the batch's length (dynamic, longrope)."""
        rotary = self.model.model.rotary_emb
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in rope_type or "longrope" in rope_type:
            return None, None
        n = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        probe = torch.empty(0, dtype=dtype, device=self.device)
        with torch.no_grad():
            cos, sin = rotary(probe, torch.arange(n, device=self.device)[None])
        return cos[0].contiguous(), (sin[0] * self._rope_sign).contiguous()

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin * sign`` at positions ``pos`` (``[B, N]`` -> ``[B, N, 1, D]``):
        rows of the tables when the ``S`` keys' positions are in them, else the model's
        rotary module."""
        if self._rope_cos is not None and S <= self._rope_cos.shape[0]:
            return self._rope_cos[pos].unsqueeze(2), self._rope_sin[pos].unsqueeze(2)
        cos, sin = self.model.model.rotary_emb(h, pos)
        return cos.unsqueeze(2), (sin * self._rope_sign).unsqueeze(2)

    def _run(self, ids, pos, write, keys, last, rows, visible=None):
        """Writes the log-probs at row positions ``last`` to ``logprob_rows[rows]``.
        ``ids``/``pos``/``write``: ``[B, N]`` new tokens, their positions and the slots
        they write; ``keys``: ``[B, S]`` each row's slots in context order (padding
        masked by position), or (tree layout, ``_pack_tree``; ``N`` is 1) ``[U]`` the
        slots of all rows at once, row ``b`` seeing key ``j`` where ``visible[b, j]``;
        ``rows``: ``[B]``. Rows of at most ``GRAPH_TOKENS`` new tokens run through the
        compiled layer and head when ``compile`` is on."""
        inner = self.model.model
        B, N = ids.shape
        S = keys.shape[-1]
        h = inner.embed_tokens(ids)
        cos, sin = self._rotary(h, pos, S)
        g = self.n_heads // self.kv_heads
        mask = _attention_mask(pos, S, h.dtype, g) if visible is None else _tree_keys_mask(visible, h.dtype, g)
        args = (mask, cos, sin, write.reshape(-1), keys)
        if self._compiled is not None and N <= GRAPH_TOKENS:
            try:
                with sdpa_kernel(_SDPA_ORDER, set_priority=True):
                    return self._run_compiled(h, args, last, rows)
            except Exception as e:  # (a partly run forward is rerun)
                if not _is_compile_error(e):
                    raise
                self._compile_failed(e)
        with sdpa_kernel(_SDPA_ORDER, set_priority=True):
            for w, pool in zip(self._weights, self.pool):
                h = _layer(h, pool, *args, w, self._consts)
        h = inner.norm(h[torch.arange(B, device=h.device), last])
        self.logprob_rows.index_copy_(0, rows, self._normalize(self.model.lm_head(h).float()))

    def _run_compiled(self, h, args, last, rows) -> None:
        """``_run``'s layers and head through their compiled programs."""
        layer, head = self._compiled
        mask, cos, sin, write, keys = args
        mask_dims, key_dims = ((0, 2, 3), (0, 1)) if keys.dim() == 2 else ((2, 3), (0,))
        for t, dims in ((h, (0, 1)), (mask, mask_dims), (cos, (0, 1)), (sin, (0, 1)), (write, (0,)), (keys, key_dims)):
            for d in dims:  # one compile for all rows, new tokens and key lengths (sizes 1 apart)
                torch._dynamo.maybe_mark_dynamic(t, d)
        for w, pool in zip(self._weights, self.pool):
            torch._dynamo.maybe_mark_dynamic(pool, 0)  # and all pool sizes
            h = layer(h, pool, *args, w, self._consts)
        torch._dynamo.maybe_mark_dynamic(last, 0)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        norm, lm_head = self.model.model.norm, self.model.lm_head
        w_norm, w_lm, b_lm = (None if t is None else t.detach() for t in (norm.weight, lm_head.weight, lm_head.bias))
        head(h, last, rows, self.logprob_rows, w_norm, norm.variance_epsilon, w_lm, b_lm, self.vocab_size)

    def _compile_failed(self, e: Exception) -> None:
        """Warn why compiling failed; the eager forward from now on."""
        inner = getattr(e, "inner_exception", None) or e  # the compiler's own error
        why = next((line for line in str(inner).splitlines() if line.strip()), "")
        warnings.warn(
            f"PagedTokenLM: torch.compile of the decoder layer failed ({type(e).__name__}: "
            f"{type(inner).__name__}: {why}); running the eager layer",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compile, self._compiled = False, None

    def _decode(self, packed: torch.Tensor, N: int, unpack: Callable | None = None) -> None:
        """Rows of ``N`` new tokens (``packed``: see ``_pack``, or ``_pack_tree`` with its
        ``unpack``; padded to a bucket), through the CUDA graph of this bucket: one
        host-to-device copy, one replay."""
        unpack = unpack or _unpack
        key = (N, unpack, *packed.shape)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(N, tuple(packed.shape), unpack)
        graph, buf = g
        buf.copy_(packed, non_blocking=True)
        self._staging.sent()
        graph.replay()
        self.graph_replays += 1

    def _capture(self, N: int, shape: tuple[int, ...], unpack: Callable):
        dev = self.device
        buf = torch.zeros(shape, dtype=torch.long, device=dev)
        inputs = unpack(buf, N)
        inputs[0].fill_(self.pad_token_id)
        inputs[5].fill_(self.cache.n_rows)  # scratch row (warm-up runs write it)
        if isinstance(unpack, _TreeKeys):  # every row sees the scratch slot: no row attends to nothing
            inputs[6][:, 0] = True
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        # two warm-ups: the first compiles the layer for a new shape class
        graph, _ = capture_graph(lambda: self._run(*inputs), dev, self._graph_pool, warmups=2)
        return graph, buf  # the graph reads buf: keep it

    # ---- planning a batch ---------------------------------------------------

    def _unchecked_tokens(self, contexts: list[tuple[int, ...]]) -> list[int]:
        """Each context's last token, and all tokens of contexts whose prefix is neither
        cached nor asked for in this call (a cached context's tokens were checked when it
        was first asked for; a prefix asked for now is checked by this rule in turn)."""
        nodes, asked = self.cache.nodes, set(contexts)
        tokens = [ctx[-1] for ctx in contexts]
        for ctx in contexts:
            prefix = context_prefix(ctx)
            if prefix not in nodes and prefix not in asked:
                tokens.extend(prefix)
        return tokens

    def has_logprobs(self, token_ids) -> bool:
        node = self.cache.nodes.get(token_tuple(token_ids))
        return node is not None and node.row >= 0

    def _cached_logprobs(self, contexts: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Rows of ``logprob_rows`` (one gather; the contexts become the most recently
        used), or None when one is missing."""
        get, nodes = self.cache.nodes.get, []
        for ctx in contexts:
            node = get(ctx)
            if node is None or node.row < 0:
                return None
            nodes.append(node)
        return self._gather(self.cache.take_rows(contexts, nodes))

    def _gather(self, rows: list[int]) -> torch.Tensor:
        """``logprob_rows[rows]``, a new tensor on the model's device."""
        return self.logprob_rows.index_select(0, to_device(np.array(rows, np.int64), self.device))

    @torch.inference_mode()
    def _evaluate(self, contexts: list[tuple[int, ...]]) -> torch.Tensor:
        with self._lock:
            self.batch_calls += 1
            cache = self.cache
            asked = dict.fromkeys(contexts)  # context -> its node, once known
            if len(asked) > cache.n_rows:
                raise ValueError(
                    f"one call asks for {len(asked)} distinct contexts but the log-prob pool holds "
                    f"{cache.n_rows} rows; raise logprob_cache_bytes"
                )
            get = cache.nodes.get
            todo, found, hits, hit_nodes = [], [], [], []
            for ctx in asked:
                node = get(ctx)
                if node is not None and node.row >= 0:
                    asked[ctx] = node
                    hits.append(ctx)
                    hit_nodes.append(node)
                else:
                    todo.append(ctx)
                    found.append(node)
            if hits:  # cached ones first become the most recently used: their rows are kept
                self.cache_hits += len(hits)
                cache.take_rows(hits, hit_nodes)
            if todo:
                asked.update(zip(*self._compute(todo, found, hits)))
            nodes = asked.values() if len(asked) == len(contexts) else map(asked.__getitem__, contexts)
            return self._gather([node.row for node in nodes])

    def _compute(self, todo: list[tuple[int, ...]], found: list, keep=()) -> tuple[list, list]:
        """Evaluate contexts (``found``: each one's node, or None) in waves of forward
        passes, evicting none of ``keep``; returns the contexts and their nodes.

        A row's new tokens get new trie nodes; a cached context without log-probs
        recomputes its last token in its own slot. Rows that extend a cached context by
        one token (a beam's step) are planned first, as they come; the others after
        them, shortest first (so a context of this call that they extend has its node). A
        row that reads a slot written in this batch runs in the same wave as its writer
        or a later one: all rows of a wave write a layer's slots before any reads them."""
        cache = self.cache
        get = cache.nodes.get
        steps, later = [], []  # (context, first new position, prefix node, recompute); contexts
        need = 0
        for ctx, node in zip(todo, found):
            if node is not None:
                steps.append((ctx, len(ctx) - 1, node, True))
            elif len(ctx) == 1 or (node := get(context_prefix(ctx))) is not None:
                steps.append((ctx, len(ctx) - 1, node, False))
                need += 1
            else:
                later.append(ctx)
        if later:
            later.sort(key=len)
            in_call = set(todo)
            need += sum(1 if context_prefix(ctx) in in_call else len(ctx) - cache.deepest(ctx)[0] for ctx in later)
        if need > len(cache.free):  # evict, keeping the cached prefixes this batch reads
            pinned = set(keep)
            pinned.update(ctx if redo else context_prefix(ctx) for ctx, _, _, redo in steps)
            pinned.update(ctx[: cache.deepest(ctx)[0]] for ctx in later)
            cache.reserve(need, pinned)
        if not later and (len(steps) <= self._step_rows or not any(redo for *_, redo in steps)):
            return self._steps(steps)  # the usual call: waves of one-token rows
        # the rest are located when reached, after the nodes planned before them exist
        plan = chain(steps, ((ctx, *cache.deepest(ctx), False) for ctx in later))
        created: list[tuple[int, ...]] = []  # new nodes, parents first
        marked: list[_Node] = []  # nodes whose slot a wave of this batch writes
        waves: list[tuple[list, list, list]] = []  # per wave: contexts, first new positions, nodes
        rows: list[int] = []  # per wave: rows
        longest: list[int] = []  # per wave: most new tokens of a row
        max_rows, max_tokens = self.max_batch_size, self.max_batch_tokens
        out_contexts, out_nodes, tokens = [], [], 0
        for ctx, d, node, redo in plan:
            k = len(ctx) - d
            w = node.wave if node is not None and node.wave > 0 else 0  # not before its prefix's writer
            while w < len(rows) and not (rows[w] < max_rows and (rows[w] + 1) * max(longest[w], k) <= max_tokens):
                w += 1
            if w == len(rows):
                waves.append(([], [], []))
                rows.append(0)
                longest.append(0)
            rows[w] += 1
            longest[w] = max(longest[w], k)
            if not redo:  # new nodes for the new tokens
                for j in range(d + 1, len(ctx) + 1):
                    key = ctx if j == len(ctx) else ctx[:j]
                    node = cache.add(key, node)
                    node.wave = w
                    created.append(key)
                    marked.append(node)
                if k > 1:  # one path array, its prefixes shared by the new nodes
                    path = node.path
                    for j, m in enumerate(marked[len(marked) - k : -1]):
                        m._path = path[: d + 1 + j]
            else:
                node.wave = w
                marked.append(node)
            contexts, starts, nodes = waves[w]
            contexts.append(ctx)
            starts.append(d)
            nodes.append(node)
            out_contexts.append(ctx)
            out_nodes.append(node)
            tokens += k
        self.forward_tokens += tokens
        try:
            for wave in waves:
                self._forward_wave(wave)
        except BaseException:  # slots and rows never written must not pass for cached
            for ctx, node in zip(out_contexts, out_nodes):
                cache.release_row(ctx, node)
            cache.discard(reversed(created))
            raise
        finally:
            for node in marked:
                node.wave = -1
        return out_contexts, out_nodes

    @property
    def _step_rows(self) -> int:
        """Most one-token rows of a forward pass."""
        return min(self.max_batch_size, self.max_batch_tokens)

    def _steps(self, steps: list[tuple]) -> tuple[list, list]:
        """``_compute`` of one-token rows whose prefixes are cached before the call (none
        recomputed when they take more than one pass): passes of ``_step_rows`` rows in
        order, the waves the planner makes of them, without its bookkeeping."""
        n = self._step_rows
        if len(steps) <= n:
            return self._step(steps)
        contexts, nodes = [], []
        for i in range(0, len(steps), n):
            c, m = self._step(steps[i : i + n])
            contexts += c
            nodes += m
        return contexts, nodes

    def _step(self, steps: list[tuple]) -> tuple[list, list]:
        """``_compute`` of rows of one new token that fit one forward pass (``steps``:
        context, first new position, its parent's node or, to recompute, its own, and
        whether to recompute): no wave planning, one new node per new context."""
        cache, free, trie = self.cache, self.cache.free, self.cache.nodes
        contexts, starts, prefixes, redo = zip(*steps)
        nodes, created = [], []
        for ctx, node, again in zip(contexts, prefixes, redo):
            if not again:  # a new node after its parent (as cache.add)
                parent, node = node, _Node(node, free.pop())
                if parent is not None:
                    parent.children += 1
                trie[ctx] = node
                created.append(ctx)
            nodes.append(node)
        self.forward_tokens += len(contexts)
        try:
            self._forward_wave((contexts, starts, nodes))
        except BaseException:  # slots and rows never written must not pass for cached
            for ctx, node in zip(contexts, nodes):
                cache.release_row(ctx, node)
            cache.discard(reversed(created))
            raise
        return contexts, nodes

    def _forward_wave(self, wave: tuple[list, list, list]) -> None:
        """One forward pass over ``wave``: its contexts, each one's first new position and node."""
        contexts, starts, nodes = wave
        lens = np.fromiter(map(len, contexts), np.int64, len(contexts))
        N = int((lens - np.array(starts)).max())
        graph = N <= GRAPH_TOKENS and self.cuda_graphs
        B, S = len(contexts), int(lens.max())
        if graph:  # buckets: new tokens to a power of two, rows to one >= 2 (one compiled
            # shape class for all), keys to one >= 64
            N = 1 << (N - 1).bit_length()
            B_pad, S_pad = max(2, 1 << (B - 1).bit_length()), _key_bucket(S)
        else:
            B_pad, S_pad = B, S
        packed, unpack, paths = None, _unpack, None
        if N == 1:  # rows sharing many keys (a beam's candidates): the union of their paths for all
            paths = np.concatenate([_NO_SLOTS if node.parent is None else node.parent.path for node in nodes])
            slots = np.fromiter((node.slot for node in nodes), np.int64, B)
            union = self._key_union.keys(paths, lens - 1, slots)
            U = len(union) + (B_pad > B)  # (a scratch key for the padding rows)
            U_pad = _key_bucket(U) if graph else U
            if 2 * U_pad <= B_pad * S_pad:  # (rows with little in common keep a row of keys each)
                packed = self._pack_tree(contexts, nodes, lens, paths, slots, union, B_pad, U_pad)
                unpack = _TreeKeys(B_pad, U_pad)
        if packed is None:
            packed = self._pack(contexts, starts, nodes, lens, N, B_pad, S_pad, paths)
        if graph:
            self._decode(packed, N, unpack)
        else:
            sent = packed.to(self.device, non_blocking=True)
            self._staging.sent()
            self._run(*unpack(sent, N))
        self.forward_calls += 1

    def _pack(self, contexts, starts, nodes, lens: np.ndarray, N: int, B_pad: int, S_pad: int, paths=None):
        """One int64 tensor ``[B_pad, 3N + 2 + S_pad]`` per forward pass (on CUDA in
        page-locked memory: one transfer): per row its new token ids, their positions,
        the slots they write, the index of its last new token, its log-prob row (taken
        here), then its key slots; padding rows read and write slot 0 and the scratch row.
        ``paths``: with ``N == 1``, the rows' parents' slot paths, concatenated."""
        B = len(contexts)
        host = self._staging.take(B_pad, 3 * N + 2 + S_pad)
        packed = host.numpy()
        keys = packed[:B, 3 * N + 2 :]
        if N == 1:  # one new token per row (the usual step): whole columns at once
            self._pack_one_token_rows(packed[:, :5], contexts, nodes, lens)
            # keys: the parent's path, then the row's own slot
            keys[np.arange(S_pad) < lens[:, None] - 1] = paths
            keys[np.arange(B), lens - 1] = packed[:B, 2]
            return host
        packed[:, :N] = self.pad_token_id
        packed[:, 3 * N + 1] = self.cache.n_rows
        packed[:B, 3 * N + 1] = self.cache.take_rows(contexts, nodes)
        # rows of several new tokens: each row's key slots are its node's path, and its
        # new tokens (positions d .. len - 1) write the last n of them
        keys[np.arange(S_pad) < lens[:, None]] = np.concatenate([node.path for node in nodes])
        first = np.asarray(starts, np.int64)
        new = np.arange(N) < (lens - first)[:, None]
        pos = first[:, None] + np.arange(N)
        packed[:B, :N][new] = np.fromiter(chain.from_iterable(ctx[d:] for ctx, d in zip(contexts, starts)), np.int64)
        packed[:B, N : 2 * N][new] = pos[new]
        packed[:B, 2 * N : 3 * N][new] = np.take_along_axis(keys, np.minimum(pos, S_pad - 1), axis=1)[new]
        packed[:B, 3 * N] = lens - first - 1
        return host

    def _pack_one_token_rows(self, fields: np.ndarray, contexts, nodes, lens: np.ndarray) -> None:
        """``fields`` (``[B_pad, 5]``, zeroed) of rows of one new token: its id, position,
        slot, 0 (its last new token) and log-prob row (taken here); padding rows get the
        pad token and the scratch row (slot 0, position 0)."""
        B = len(contexts)
        fields[:, 0] = self.pad_token_id
        fields[:, 4] = self.cache.n_rows
        fields[:B, 0] = [ctx[-1] for ctx in contexts]
        fields[:B, 1] = lens - 1
        fields[:B, 2] = [node.slot for node in nodes]
        fields[:B, 4] = self.cache.take_rows(contexts, nodes)

    def _pack_tree(self, contexts, nodes, lens, paths, slots, union, B_pad: int, U_pad: int) -> torch.Tensor:
        """Rows of one new token over one key set for all (tree layout, see ``_TreeKeys``),
        as one int64 tensor: per row its new token id, position, slot, 0 and log-prob row;
        then ``U_pad`` keys: ``union`` (the slots of the rows' parents' ``paths`` and their
        new ``slots``, each once), a scratch key (slot 0) when there are padding rows,
        unused keys (slot 0, seen by none); then a ``[B_pad, U_pad]`` bool matrix in the
        tensor's bytes: row ``b`` sees the keys of its path and its new slot, a padding
        row the scratch key. Attention then reads ``U`` keys for all rows."""
        B, U = len(contexts), len(union)
        host = self._staging.take(1, 5 * B_pad + U_pad + -(-B_pad * U_pad // 8)).view(-1)
        buf = host.numpy()
        self._pack_one_token_rows(buf[: 5 * B_pad].reshape(B_pad, 5), contexts, nodes, lens)
        buf[5 * B_pad : 5 * B_pad + U] = union
        visible = buf[5 * B_pad + U_pad :].view(np.bool_)[: B_pad * U_pad].reshape(B_pad, U_pad)
        self._key_union.mark(visible, paths, lens - 1, slots)
        if B_pad > B:
            visible[B:, U] = True
        return host

    def clear_cache(self):
        """Drop every cached context (KV slots and log-probs); captured graphs stay."""
        with self._lock:
            self.cache.clear()


class _Staging:
    """Two host buffers that packed batches are written into and sent from, in turn
    (page-locked on CUDA; grown by doubling), zeroed by numpy. A new zeroed tensor per
    forward pass cost 5 ms for a 1 MB batch (128 rows) on a 2-core CPU and 0.7 ms on the
    H200 machine (torch's fill wakes its thread pool; a new page-locked block is a driver
    call). Before a buffer is written again the host waits for the copy that last read
    it (on CUDA, an event recorded after that copy; on the CPU the forward pass read it
    synchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """A zeroed ``[rows, cols]`` int64 view of the next buffer."""
        self.turn = i = 1 - self.turn
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        n, buf = rows * cols, self.buffers[i]
        if buf is None or buf.numel() < n:
            size = max(n, 2 * buf.numel()) if buf is not None else n
            buf = self.buffers[i] = torch.empty(size, dtype=torch.long, pin_memory=self.pinned)
        host = buf[:n].view(rows, cols)
        host.numpy().fill(0)
        return host

    def sent(self) -> None:
        """The copy from the buffer last taken is queued (CUDA: mark its end)."""
        if self.pinned:
            event = self.copied[self.turn] = self.copied[self.turn] or torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))


class _TreeKeys(NamedTuple):
    """Unpacks a batch of ``B_pad`` rows over ``U_pad`` keys packed by ``_pack_tree``
    (``N`` is 1) into ``(ids, pos, write, keys, last, rows, visible)`` views; a value
    (hashable), so that it names the CUDA graphs of this layout."""

    B_pad: int
    U_pad: int

    def __call__(self, packed: torch.Tensor, N: int) -> tuple:
        B, U = self.B_pad, self.U_pad
        per_row = packed[: 5 * B].view(B, 5)
        visible = packed[5 * B + U :].view(torch.bool)[: B * U].view(B, U)
        return (
            per_row[:, :1],
            per_row[:, 1:2],
            per_row[:, 2:3],
            packed[5 * B : 5 * B + U],
            per_row[:, 3],
            per_row[:, 4],
            visible,
        )


def _key_bucket(n: int) -> int:
    """Keys a CUDA graph is captured for: ``n`` rounded up to a power of two, at least 64."""
    return max(64, 1 << (n - 1).bit_length())


class _KeyUnion:
    """The tree layout's key set: the distinct slots of a batch's slot paths, found with
    two scratch arrays over the pool's slots (the call that last saw a slot, and the
    slot's key index in that call), so nothing is sorted or reset."""

    def __init__(self, n_slots: int):
        self.seen = np.zeros(n_slots, np.int64)
        self.index = np.zeros(n_slots, np.int64)
        self.calls = 0

    def keys(self, paths: np.ndarray, lens: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The distinct slots of the rows' paths in order of first appearance (row ``b``'s
        path: ``lens[b]`` slots of the concatenated ``paths``, then ``slots[b]``). Each
        row's keys come in its path's order: a path that holds a slot holds the slot's
        ancestors before it, so they are seen before it."""
        self.calls += 1
        return _distinct_slots(paths, lens, slots, self.seen, self.index, self.calls)

    def mark(self, visible: np.ndarray, paths: np.ndarray, lens: np.ndarray, slots: np.ndarray) -> None:
        """``visible[b, j] = True`` for the keys ``j`` on row ``b``'s path (those of the
        last ``keys`` call)."""
        _mark_visible(visible, paths, lens, slots, self.index)


@numba.njit(cache=True, nogil=True)
def _distinct_slots(paths, lens, slots, seen, index, call):
    """``_KeyUnion.keys``: slots not yet ``seen`` in this ``call`` are marked and given
    the next key ``index``."""
    out = np.empty(len(paths) + len(slots), np.int64)
    n = start = 0
    for b in range(len(lens)):
        for k in range(lens[b] + 1):
            s = paths[start + k] if k < lens[b] else slots[b]
            if seen[s] != call:
                seen[s] = call
                index[s] = n
                out[n] = s
                n += 1
        start += lens[b]
    return out[:n]


@numba.njit(cache=True, nogil=True)
def _mark_visible(visible, paths, lens, slots, index):
    """``_KeyUnion.mark``: each row's path slots through their key ``index``."""
    start = 0
    for b in range(len(lens)):
        for k in range(lens[b]):
            visible[b, index[paths[start + k]]] = True
        visible[b, index[slots[b]]] = True
        start += lens[b]


def _unpack(packed: torch.Tensor, N: int):
    """``(ids, pos, write, keys, last, rows)`` views of a packed batch (see ``_pack``)."""
    return (
        packed[:, :N],
        packed[:, N : 2 * N],
        packed[:, 2 * N : 3 * N],
        packed[:, 3 * N + 2 :],
        packed[:, 3 * N],
        packed[:, 3 * N + 1],
    )


def _fuse(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``(weight, bias)`` for linears that read the same input; their weights (and
    biases) become views of it."""
    weight = torch.cat([m.weight.data for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
    if any(b is not None for b in biases) and bias is None:
        raise ValueError("cannot fuse projections of which only some have a bias")
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start : start + n]
        if bias is not None:
            m.bias.data = bias[start : start + n]
        start += n
    return weight, bias


class _LayerWeights(NamedTuple):
    """One decoder layer's weights as plain tensors (q/k/v and gate/up fused; biases
    and the per-head q/k norms None where the model has none)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class _LayerConsts(NamedTuple):
    """What every decoder layer of a model shares: head counts, RMSNorm epsilons,
    the attention scale, the MLP's activation, and whether the layer runs through the
    fused kernels of :mod:`.kernels` and attends over a shared key set by its kernel."""

    heads: int
    kv_heads: int
    eps: float
    qk_eps: float
    scale: float
    act: Callable
    fused: bool = False
    attention_kernel: bool = False


def _layer(h, pool, mask, cos, sin, write, keys, w: _LayerWeights, c: _LayerConsts) -> torch.Tensor:
    """One decoder layer: ``h`` ``[B, N, hidden]`` -> the same; writes the new tokens'
    keys and values to ``pool`` (the layer's ``[slots, 2 * kv_heads, head_dim]``) at
    slots ``write`` (``[B * N]``) before attention reads ``pool[keys]`` under ``mask``
    (``_attention_mask``, or with one key set for all rows ``_tree_keys_mask``).
    ``cos``/``sin``: ``[B, N, 1, D]`` (``sin`` times rotate_half's sign). Run as it is,
    with ``c.fused`` through the fused kernels of :mod:`.kernels` (the same values), or
    compiled: compiled, the elementwise work around the matmuls and SDPA fuses (SDPA's
    own kernel stays: on an H200 a fused gather-and-reduce attention of inductor's took
    15.5 µs a layer against cuDNN's 5.7)."""
    B, N, E = h.shape
    H, G, D = c.heads, c.kv_heads, pool.shape[-1]
    qkv = F.linear(F.rms_norm(h, (E,), w.input_norm, c.eps), w.qkv, w.qkv_bias).view(B, N, H + 2 * G, D)
    if w.q_norm is not None:
        q, k, v = qkv[:, :, :H], qkv[:, :, H : H + G], qkv[:, :, H + G :]
        qkv = torch.cat((F.rms_norm(q, (D,), w.q_norm, c.qk_eps), F.rms_norm(k, (D,), w.k_norm, c.qk_eps), v), dim=2)
    layout = kernels.QueryLayout(B, N, G, H // G, D, shared=keys.dim() == 1)
    q = (kernels.rope_write if c.fused else kernels.rope_write_reference)(qkv, cos, sin, pool, write, layout, H)
    if layout.shared and c.attention_kernel:
        o = layout.unarrange(kernels.shared_keys_attention(q, pool, keys, mask, c.scale))
    else:
        o = _attention(mask, q, pool[keys], layout, c.scale)
    h = _residual_linear(h, o, w.o, w.o_bias)
    gate_up = F.linear(F.rms_norm(h, (E,), w.post_norm, c.eps), w.gate_up, w.gate_up_bias)
    mlp = kernels.silu_mul(gate_up) if c.fused else kernels.gated_activation(gate_up, c.act)
    return _residual_linear(h, mlp, w.down, w.down_bias)


def _is_compile_error(e: Exception) -> bool:
    """Whether ``e`` is torch.compile's (dynamo, the backend, its recompile limit)."""
    exc = torch._dynamo.exc
    kinds = ("TorchDynamoException", "FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    return isinstance(e, tuple(getattr(exc, k) for k in kinds if hasattr(exc, k)))


def _head(h, last, rows, out, norm_weight, eps: float, weight, bias, V: int) -> None:
    """``out[rows] = log_softmax(lm_head(rms_norm(h[b, last[b]])))`` over the first ``V``
    logits, in float32 (the model's head has at least ``V`` rows)."""
    x = F.rms_norm(h[torch.arange(h.shape[0], device=h.device), last], (h.shape[-1],), norm_weight, eps)
    out.index_copy_(0, rows, torch.log_softmax(F.linear(x, weight, bias)[:, :V].float(), dim=-1))


def _attention_mask(pos: torch.Tensor, S: int, dtype, g: int) -> torch.Tensor:
    """Additive mask ``[B, 1, g * N, S]`` of ``g`` stacked query heads: 0 where key
    ``j <= pos``, else -inf."""
    visible = torch.arange(S, device=pos.device) <= pos[:, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=pos.device).masked_fill_(~visible, float("-inf"))
    return mask[:, None].repeat(1, 1, g, 1)


def _attention(mask, q, kv, layout: kernels.QueryLayout, scale) -> torch.Tensor:
    """Attention of queries ``q`` (in ``layout``) over keys and values ``kv`` (``[B, S,
    2G, D]``, each row its own; shared: ``[S, 2G, D]``) under ``mask`` -> ``[B * N, H *
    D]``, by SDPA (any N). Grouped-query attention without repeating keys: the ``g = H /
    G`` query heads of one KV head are stacked as ``g * N`` query rows of it (shared: every
    row's, ``B * g * N``)."""
    G = layout.G
    kv = kv.transpose(0, 1)[None] if layout.shared else kv.transpose(1, 2)  # [B or 1, 2G, S, D]
    o = F.scaled_dot_product_attention(q, kv[:, :G], kv[:, G:], attn_mask=mask, scale=scale)
    return layout.unarrange(o)


def _tree_keys_mask(visible: torch.Tensor, dtype, g: int) -> torch.Tensor:
    """Additive mask ``[1, 1, B * g, U]`` over one key set for a batch of one-token rows
    (``_run``'s tree layout): row ``b`` (its ``g`` query heads of one KV head stacked)
    sees key ``j`` where ``visible[b, j]``."""
    B, U = visible.shape
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    return mask[:, None].expand(B, g, U).reshape(1, 1, B * g, U)


def _residual_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``h + linear(x)`` (``h``: ``[B, N, hidden]``), without a bias as one matmul with
    accumulate."""
    shape = h.shape
    x = x.reshape(-1, x.shape[-1])
    if bias is not None:
        return h + F.linear(x, weight, bias).view(shape)
    return torch.addmm(h.reshape(-1, shape[-1]), x, weight.t()).view(shape)
