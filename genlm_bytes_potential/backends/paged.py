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
* on CUDA, a batch of one-token steps replays a CUDA graph captured once per
  (rows, key length) bucket: the whole 30-layer forward costs one launch.

The forward pass uses the model's own weights and rotary embedding and computes what the
Hugging Face model computes, with fewer kernels (q/k/v and gate/up projections fused,
residual adds folded into the matmuls, fused RMSNorm); the attention reads keys from the
pool: for query position ``p`` of a row with key slots
``s_0..s_{S-1}`` (the context's tokens in order), softmax over keys ``j <= p``.

Supported: ``SUPPORTED_MODEL_TYPES`` (Llama and SmolLM, Mistral without sliding window,
Qwen2, Qwen3); other models: :class:`~genlm_bytes_potential.backends.hf.HFTokenLM`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genlm_bytes_potential.backends.hf import HFTokenLM

__all__ = ["PagedTokenLM", "SUPPORTED_MODEL_TYPES"]

#: Hugging Face ``model_type`` values whose decoder layers the paged forward reproduces:
#: RMSNorm, rotary q/k (optional per-head q/k RMSNorm), grouped-query attention, gated MLP.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Node:
    """One token of a cached context: its KV slot, the slots of its whole path, and
    (when the context was asked for) its next-token log-probs."""

    __slots__ = ("parent", "slot", "path", "children", "logprobs", "wave", "tick")

    def __init__(self, parent, slot: int, path: np.ndarray):
        self.parent = parent
        self.slot = slot
        self.path = path
        self.children = 0
        self.logprobs: torch.Tensor | None = None
        self.wave = -1  # forward pass of the current batch that writes this slot
        self.tick = 0  # last use (for eviction)


class _SlotTrie:
    """Token-prefix trie over a pool of ``n_slots`` KV slots (slot 0 is scratch).
    Prefix-closed: only leaves are evicted, least recently used first."""

    def __init__(self, n_slots: int, max_logprob_rows: int):
        self.n_slots = n_slots
        self.max_logprob_rows = max_logprob_rows
        self.clear()

    def clear(self):
        self.nodes: dict[tuple[int, ...], _Node] = {}
        self.free = list(range(self.n_slots - 1, 0, -1))
        self.with_logprobs: dict[tuple[int, ...], _Node] = {}  # insertion = LRU order
        self.tick = 0
        self.evictions = 0

    def deepest(self, ctx: tuple[int, ...]) -> int:
        """Length of the longest prefix of ``ctx`` in the trie (binary search: the
        trie is prefix-closed)."""
        lo, hi = 0, len(ctx)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ctx[:mid] in self.nodes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, ctx: tuple[int, ...]) -> _Node:
        """A new node for ``ctx``, whose parent ``ctx[:-1]`` is in the trie (or empty)."""
        parent = self.nodes.get(ctx[:-1]) if len(ctx) > 1 else None
        slot = self.free.pop()
        path = np.append(parent.path, slot) if parent is not None else np.array([slot], np.int64)
        node = _Node(parent, slot, path)
        if parent is not None:
            parent.children += 1
        self.nodes[ctx] = node
        return node

    def discard(self, keys) -> None:
        """Remove nodes (children before their parents) and free their slots."""
        for ctx in keys:
            node = self.nodes.pop(ctx)
            self.with_logprobs.pop(ctx, None)
            self.free.append(node.slot)
            if node.parent is not None:
                node.parent.children -= 1

    def set_logprobs(self, ctx, node: _Node, row: torch.Tensor):
        node.logprobs = row
        self.with_logprobs.pop(ctx, None)
        self.with_logprobs[ctx] = node
        while len(self.with_logprobs) > self.max_logprob_rows:
            old = next(iter(self.with_logprobs))
            self.with_logprobs.pop(old).logprobs = None

    def touch(self, ctx, node: _Node):
        self.tick += 1
        node.tick = self.tick
        if node.logprobs is not None:
            self.with_logprobs[ctx] = self.with_logprobs.pop(ctx, node)

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
                    del self.nodes[ctx]
                    self.with_logprobs.pop(ctx, None)
                    self.free.append(node.slot)
                    self.evictions += 1
                    node, ctx = node.parent, ctx[:-1]
                    if node is None:
                        break
                    node.children -= 1
                    if node.children or node.logprobs is not None or ctx in pinned:
                        break
                if len(self.free) >= target:
                    return


class PagedTokenLM(HFTokenLM):
    """Token-level ``AsyncLM`` with a slot-paged KV pool (and CUDA graphs on GPU).

    Args:
        model: a ``transformers`` causal LM of the supported family (see the module
            docstring); its weights are used as they are (dtype and device).
        tokenizer: its tokenizer.
        kv_cache_bytes: size of the KV pool (one slot per cached token).
        logprob_cache_bytes: memory for cached next-token log-prob rows (float32, one
            per context asked for; least recently used rows are dropped first).
        max_batch_size: most rows per forward pass.
        max_batch_tokens: most padded new-token positions (rows x longest) per pass.
        cuda_graphs: replay captured graphs for one-token batches (CUDA only).

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
    ):
        super().__init__(model, tokenizer, cache_bytes=0, max_batch_size=max_batch_size,
                         max_batch_tokens=max_batch_tokens)
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
        self._fuse_weights()
        per_slot = len(self.layers) * 2 * self.kv_heads * self.head_dim * dtype.itemsize
        n_slots = int(kv_cache_bytes) // per_slot
        if n_slots < 2 + max_batch_tokens:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds {n_slots} token slots of {per_slot} bytes; "
                f"expected room for at least max_batch_tokens + 2 = {max_batch_tokens + 2}"
            )
        self.kv_cache_bytes = int(kv_cache_bytes)
        #: keys then values of every slot: ``[layers, slots, 2 * kv_heads, head_dim]``
        self.pool = torch.empty((len(self.layers), n_slots, 2 * self.kv_heads, self.head_dim),
                                dtype=dtype, device=self.device)  # pages committed as slots fill
        self.pool[:, 0].zero_()  # scratch slot, read (masked) by padding: must be finite
        self.cache = _SlotTrie(n_slots, max(1, int(logprob_cache_bytes) // (4 * self.vocab_size)))
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_pool = None
        self.graph_replays = 0

    def __repr__(self):
        return f"PagedTokenLM({type(self.model).__name__}, V={self.vocab_size}, slots={self.cache.n_slots})"

    # ---- the forward pass ---------------------------------------------------

    def _fuse_weights(self) -> None:
        """Per layer, q/k/v projections as one matrix and gate/up as one (fewer kernels
        per token). The modules' own weights are re-pointed at slices of the fused
        matrices: values unchanged, no second copy in memory."""
        self._fused = []
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = _fuse(a.q_proj, a.k_proj, a.v_proj)
            gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
            self._fused.append((qkv, gate_up))

    def _run(self, ids, pos, write, keys, last):
        """Log-probs ``[B, V]`` at row positions ``last``. ``ids``/``pos``/``write``:
        ``[B, N]`` new tokens, their positions and the slots they write; ``keys``:
        ``[B, S]`` each row's slots in context order (padding masked by position).

        Grouped-query attention without repeating keys: the ``g = heads / kv_heads``
        query heads of one KV head are stacked as ``g * N`` query rows of it."""
        inner = self.model.model
        B, N = ids.shape
        S = keys.shape[1]
        H, G, D = self.n_heads, self.kv_heads, self.head_dim
        g = H // G
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, pos)
        cos, sin = cos.unsqueeze(2), (sin * self._rope_sign).unsqueeze(2)  # [B, N, 1, D]
        visible = torch.arange(S, device=ids.device)[None, None, :] <= pos[:, :, None]
        mask = torch.zeros((B, 1, N, S), dtype=h.dtype, device=h.device).masked_fill_(~visible[:, None], float("-inf"))
        mask = mask.repeat(1, 1, g, 1)  # [B, 1, g*N, S]
        write = write.reshape(-1)
        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            (w_qkv, b_qkv), (w_gu, b_gu) = self._fused[i]
            qkv = F.linear(_rms_norm(layer.input_layernorm, h), w_qkv, b_qkv).view(B, N, H + 2 * G, D)
            qk, v = qkv[:, :, : H + G], qkv[:, :, H + G :]  # [B, N, heads, D]
            if getattr(a, "q_norm", None) is not None:
                qk = torch.cat((a.q_norm(qk[:, :, :H]), a.k_norm(qk[:, :, H:])), dim=2)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # rotary embedding
            q = qk[:, :, :H]
            self.pool[i][write] = torch.cat((qk[:, :, H:], v), dim=2).view(B * N, 2 * G, D)
            kv = self.pool[i][keys].transpose(1, 2)  # [B, 2G, S, D]
            kk, vv = kv[:, :G], kv[:, G:]
            q = q.reshape(B, N, G, g, D).permute(0, 2, 3, 1, 4).reshape(B, G, g * N, D)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=a.scaling)
            o = o.reshape(B, G, g, N, D).permute(0, 3, 1, 2, 4).reshape(B * N, H * D)
            h = _linear_residual(h, o, a.o_proj)
            gate, up = F.linear(_rms_norm(layer.post_attention_layernorm, h), w_gu, b_gu).chunk(2, dim=-1)
            h = _linear_residual(h, mlp.act_fn(gate) * up, mlp.down_proj)
        h = inner.norm(h[torch.arange(B, device=h.device), last])
        return self._normalize(self.model.lm_head(h).float())

    def _decode(self, packed: np.ndarray, B: int) -> torch.Tensor:
        """One new token per row (``packed``: see ``_pack``, padded to a bucket), through
        the CUDA graph of this bucket: one host-to-device copy, one replay."""
        g = self._graphs.get(packed.shape)
        if g is None:
            g = self._graphs[packed.shape] = self._capture(packed.shape)
        graph, buf, out = g
        buf.copy_(torch.from_numpy(packed))
        graph.replay()
        self.graph_replays += 1
        return out[:B].clone()

    def _capture(self, shape: tuple[int, int]):
        dev = self.device
        buf = torch.zeros(shape, dtype=torch.long, device=dev)
        buf[:, 0] = self.pad_token_id
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(*_unpack(buf, 1))
        torch.cuda.current_stream(dev).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            out = self._run(*_unpack(buf, 1))
        return graph, buf, out  # the graph reads buf and writes out: keep both

    # ---- planning a batch ---------------------------------------------------

    def has_logprobs(self, token_ids) -> bool:
        node = self.cache.nodes.get(tuple(token_ids))
        return node is not None and node.logprobs is not None

    def _lookup(self, ctx: tuple[int, ...]) -> torch.Tensor | None:
        node = self.cache.nodes.get(ctx)
        if node is None or node.logprobs is None:
            return None
        self.cache.touch(ctx, node)
        return node.logprobs

    @torch.inference_mode()
    def _evaluate(self, contexts: list[tuple[int, ...]]) -> torch.Tensor:
        with self._lock:
            self.batch_calls += 1
            cache = self.cache
            todo = []
            for ctx in dict.fromkeys(contexts):
                node = cache.nodes.get(ctx)
                if node is not None and node.logprobs is not None:
                    self.cache_hits += 1
                else:
                    todo.append(ctx)
            if todo:
                self._compute(sorted(todo, key=len))
            out = []
            for ctx in contexts:  # every context asked for becomes the most recently used
                node = cache.nodes[ctx]
                cache.touch(ctx, node)
                out.append(node.logprobs)
            return torch.stack(out)

    def _compute(self, todo: list[tuple[int, ...]]) -> None:
        """Evaluate contexts (sorted by length) in waves of forward passes. A row's
        new tokens get new trie nodes; a row that reads a slot written in this batch
        runs in the same wave as its writer or a later one."""
        cache = self.cache
        depths = [cache.deepest(ctx) for ctx in todo]
        need = sum(len(c) - d for c, d in zip(todo, depths))
        cache.reserve(need, pinned={c[:d] for c, d in zip(todo, depths)})
        created: list[tuple[int, ...]] = []  # new nodes, parents first
        waves: list[list] = []  # rows: (ctx, first new position)
        sizes: list[tuple[int, int]] = []  # (rows, longest new) per wave
        for ctx in todo:
            d = cache.deepest(ctx)
            if d == len(ctx):  # cached slots without log-probs: recompute the last token
                d -= 1
                node = cache.nodes[ctx]
                start = node.wave if node.wave >= 0 else 0
            else:
                parent = cache.nodes.get(ctx[:d]) if d else None
                start = parent.wave if parent is not None and parent.wave >= 0 else 0
            n = len(ctx) - d
            w = start
            while w < len(waves) and not self._fits(sizes[w], n):
                w += 1
            if w == len(waves):
                waves.append([])
                sizes.append((0, 0))
            waves[w].append((ctx, d))
            sizes[w] = (sizes[w][0] + 1, max(sizes[w][1], n))
            for j in range(d + 1, len(ctx) + 1):
                cache.add(ctx[:j]).wave = w
                created.append(ctx[:j])
            self.forward_tokens += n
        try:
            for rows in waves:
                self._forward_wave(rows)
        except BaseException:  # slots never written must not pass for cached prefixes
            cache.discard(reversed(created))
            raise
        finally:
            for ctx in todo:
                for j in range(len(ctx), 0, -1):
                    node = cache.nodes.get(ctx[:j])
                    if node is None or node.wave < 0:
                        break
                    node.wave = -1

    def _fits(self, size: tuple[int, int], n: int) -> bool:
        rows, longest = size
        return rows < self.max_batch_size and (rows + 1) * max(longest, n) <= self.max_batch_tokens

    def _forward_wave(self, rows) -> None:
        cache = self.cache
        B = len(rows)
        N = max(len(ctx) - d for ctx, d in rows)
        S = max(len(ctx) for ctx, _ in rows)
        graph = N == 1 and self.cuda_graphs and B <= self.max_batch_size
        if graph:  # buckets: rows to a power of two, keys to a power of two >= 64
            B_pad, S_pad = 1 << (B - 1).bit_length(), max(64, 1 << (S - 1).bit_length())
        else:
            B_pad, S_pad = B, S
        packed = self._pack(rows, N, B_pad, S_pad)
        if graph:
            lp = self._decode(packed, B)
        else:
            lp = self._run(*_unpack(torch.from_numpy(packed).to(self.device), N))
        self.forward_calls += 1
        for b, (ctx, _) in enumerate(rows):
            cache.set_logprobs(ctx, cache.nodes[ctx], lp[b].clone())  # own memory: evictable alone

    def _pack(self, rows, N: int, B_pad: int, S_pad: int) -> np.ndarray:
        """One int64 array ``[B_pad, 3N + 1 + S_pad]`` per forward pass (one transfer):
        per row its new token ids, their positions, the slots they write, the index of
        its last new token, then its key slots; padding rows read and write slot 0."""
        packed = np.zeros((B_pad, 3 * N + 1 + S_pad), np.int64)
        packed[:, :N] = self.pad_token_id
        for b, (ctx, d) in enumerate(rows):
            path = self.cache.nodes[ctx].path
            n = len(ctx) - d
            packed[b, :n] = ctx[d:]
            packed[b, N : N + n] = np.arange(d, len(ctx))
            packed[b, 2 * N : 2 * N + n] = path[d:]
            packed[b, 3 * N] = n - 1
            packed[b, 3 * N + 1 : 3 * N + 1 + len(ctx)] = path
        return packed

    def clear_cache(self):
        """Drop every cached context (KV slots and log-probs); captured graphs stay."""
        with self._lock:
            self.cache.clear()


def _unpack(packed: torch.Tensor, N: int):
    """``(ids, pos, write, keys, last)`` views of a packed batch (see ``_pack``)."""
    return (packed[:, :N], packed[:, N : 2 * N], packed[:, 2 * N : 3 * N], packed[:, 3 * N + 1 :],
            packed[:, 3 * N])


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


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A Llama-style RMSNorm module as one fused call."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _linear_residual(h: torch.Tensor, x: torch.Tensor, linear) -> torch.Tensor:
    """``h + linear(x)`` as one matmul with accumulate (``h``: ``[B, N, hidden]``)."""
    shape = h.shape
    if linear.bias is not None:
        return h + linear(x).view(shape)
    return torch.addmm(h.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t()).view(shape)
