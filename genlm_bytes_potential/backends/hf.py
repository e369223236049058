"""``AsyncLM`` on a Hugging Face causal LM, with a KV cache keyed by token prefix.

genlm-backend's ``AsyncTransformer`` keeps key/value states only for prompts
passed to ``cache_kv``: every other query recomputes its whole context from the
last such prompt, and its caches are unbounded. :class:`HFTokenLM` instead

* stores, for every evaluated context, its key/value states and its next-token
  log-probs in a trie keyed by token prefix, so a context that extends a cached
  one by ``n`` tokens costs ``n`` tokens of compute;
* evaluates all contexts of one call (and of concurrent calls) in one padded
  forward pass, each row continuing from its own cached prefix;
* bounds the cache by a memory cap in bytes, evicting least-recently-used
  entries.

Works with transformers' ``DynamicCache`` (transformers >= 4.56 / 5.x API:
``cache.layers[i].keys`` / ``.values``), for decoder-only models whose layers
all use full attention.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from itertools import chain

import torch
from genlm.backend.llm.base import AsyncLM

from genlm_bytes_potential.backends.protocol import token_tuple

__all__ = ["HFTokenLM"]


class _Node:
    __slots__ = ("parent", "token", "children", "kv", "logprobs", "nbytes", "__weakref__")

    def __init__(self, parent, token):
        self.parent = parent
        self.token = token
        self.children: dict[int, _Node] = {}
        self.kv: torch.Tensor | None = None  # [layers, 2, heads, len, head_dim]
        self.logprobs: torch.Tensor | None = None  # [V] float32, CPU
        self.nbytes = 0


class _PrefixCache:
    """Trie of token prefixes holding KV states and next-token log-probs, LRU-bounded."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.root = _Node(None, None)
        self.lru: OrderedDict[int, _Node] = OrderedDict()  # id(node) -> node
        self.nbytes = 0
        self.evictions = 0

    def find(self, ctx):
        """(node for ctx or None, deepest proper prefix length with KV, its node)."""
        node = self.root
        best_len, best = 0, None
        for i, t in enumerate(ctx):
            if node.kv is not None and i > 0:
                best_len, best = i, node
            node = node.children.get(t)
            if node is None:
                return None, best_len, best
        return node, best_len, best

    def touch(self, node):
        if id(node) in self.lru:
            self.lru.move_to_end(id(node))

    def put(self, ctx, kv, logprobs):
        node = self.root
        for t in ctx:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node(node, t)
            node = child
        self._drop(node)
        size = logprobs.numel() * logprobs.element_size()
        if kv is not None:
            size += kv.numel() * kv.element_size()
        if size > self.max_bytes:  # too big to keep at all: keep the log-probs only
            kv = None
            size = logprobs.numel() * logprobs.element_size()
        node.kv, node.logprobs, node.nbytes = kv, logprobs, size
        self.nbytes += size
        self.lru[id(node)] = node
        self._evict(keep=node)
        return node

    def _drop(self, node):
        if id(node) in self.lru:
            del self.lru[id(node)]
            self.nbytes -= node.nbytes
        node.kv = node.logprobs = None
        node.nbytes = 0

    def _evict(self, keep):
        while self.nbytes > self.max_bytes and self.lru:
            _, node = next(iter(self.lru.items()))
            if node is keep:
                if len(self.lru) == 1:
                    break
                self.lru.move_to_end(id(node))
                continue
            self._drop(node)
            self.evictions += 1
            # prune empty leaves
            while node.parent is not None and not node.children and node.logprobs is None:
                del node.parent.children[node.token]
                node = node.parent

    def clear(self):
        self.root = _Node(None, None)
        self.lru.clear()
        self.nbytes = 0


class HFTokenLM(AsyncLM):
    """Token-level ``AsyncLM`` on a Hugging Face causal LM with prefix KV reuse; a
    :class:`~genlm_bytes_potential.backends.protocol.CachingTokenLM`.

    Args:
        model: a ``transformers`` causal LM (put in eval mode here).
        tokenizer: its tokenizer; ``V = len(byte_vocab)`` (logit rows beyond
            ``V`` are dropped and the rest renormalized; missing rows are ``-inf``).
        cache_bytes: cap on the memory held by cached KV states and log-probs.
        max_batch_size: most contexts per forward pass (larger calls are split).
        max_batch_tokens: most padded positions (rows x longest context) per
            forward pass; bounds the transient memory of the padded KV batch.

    Counters: ``batch_calls`` (batches evaluated), ``forward_calls`` (model
    forward passes), ``forward_tokens`` (non-padding tokens computed),
    ``cache_hits`` (contexts answered without compute). ``cache_bytes`` /
    ``cache.nbytes`` give the cap and the current use.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        cache_bytes: int = 2 * 2**30,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
    ):
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"HFTokenLM supports models whose layers all use full attention; "
                f"{type(model).__name__} has layer types {sorted(set(layer_types))}"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        super().__init__(tokenizer)
        self.vocab_size = len(self.byte_vocab)
        limit = getattr(cfg, "max_position_embeddings", None)
        #: the most tokens of a context (the model's ``max_position_embeddings``; None: no limit)
        self.max_context_length = int(limit) if isinstance(limit, int) and limit >= 1 else None
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.cache_bytes = int(cache_bytes)
        self.cache = _PrefixCache(self.cache_bytes)
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.batch_calls = 0
        self.forward_calls = 0
        self.forward_tokens = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._queue: list = []
        self._worker: asyncio.Task | None = None
        self._loop = None

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        hf_opts: dict | None = None,
        **kwargs,
    ) -> HFTokenLM:
        """Load ``name`` (hub name or local folder) with ``AutoModelForCausalLM``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        opts = {"dtype": dtype}
        opts.update(hf_opts or {})
        model = AutoModelForCausalLM.from_pretrained(name, **opts)
        if device is not None:
            model = model.to(device)
        return cls(model, tok, **kwargs)

    def __repr__(self):
        return f"HFTokenLM({type(self.model).__name__}, V={self.vocab_size})"

    # ---- evaluation (runs in a worker thread or synchronously) ------------

    def _check(self, contexts) -> list[tuple[int, ...]]:
        """The contexts as tuples of token ids (``token_tuple``: tuples as they are), each
        non-empty and inside the vocabulary."""
        out = [token_tuple(c) for c in contexts]
        if not all(out):
            raise ValueError("empty context: the model needs at least one token (e.g. BOS)")
        limit = self.max_context_length
        if limit is not None and out and (longest := max(map(len, out))) > limit:
            raise ValueError(f"context of {longest} tokens exceeds max_context_length={limit} (the model's positions)")
        tokens = self._unchecked_tokens(out)
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            bad = next(t for t in tokens if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} out of range [0, {self.vocab_size})")
        return out

    def _unchecked_tokens(self, contexts: list[tuple[int, ...]]) -> list[int]:
        """The token ids of ``contexts`` that ``_check`` tests against the vocabulary."""
        return list(chain.from_iterable(contexts))

    def _lookup(self, ctx: tuple[int, ...]) -> torch.Tensor | None:
        """The cached log-probs of ``ctx`` (now the most recently used), or None."""
        node, _, _ = self.cache.find(ctx)
        if node is None or node.logprobs is None:
            return None
        self.cache.touch(node)
        return node.logprobs

    def _all_cached(self, contexts: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Every context's log-probs from the cache, in the caller's thread, when all are
        there and no batch is queued or running; else None."""
        if self._queue or not self._lock.acquire(blocking=False):
            return None
        try:
            out = self._cached_logprobs(contexts)
            if out is not None:
                self.batch_calls += 1
                self.cache_hits += len(contexts)
            return out
        finally:
            self._lock.release()

    def _cached_logprobs(self, contexts: list[tuple[int, ...]]) -> torch.Tensor | None:
        """``[len(contexts), V]`` from the cache (each now most recently used), or None
        when one is missing."""
        rows = []
        for ctx in contexts:
            row = self._lookup(ctx)
            if row is None:
                return None
            rows.append(row)
        return torch.stack(rows)

    def has_logprobs(self, token_ids) -> bool:
        """Whether the log-probs after ``token_ids`` are cached (a byte beam may prefetch
        into the cache)."""
        node, _, _ = self.cache.find(token_tuple(token_ids))
        return node is not None and node.logprobs is not None

    def _evaluate(self, contexts: list[tuple[int, ...]]) -> torch.Tensor:
        with self._lock:
            self.batch_calls += 1
            result = torch.empty((len(contexts), self.vocab_size), dtype=torch.float32)
            todo: dict[tuple, list[int]] = {}
            for i, ctx in enumerate(contexts):
                row = self._lookup(ctx)
                if row is not None:
                    self.cache_hits += 1
                    result[i] = row
                else:
                    todo.setdefault(ctx, []).append(i)
            for chunk in self._chunks(list(todo)):
                for ctx, lp in zip(chunk, self._forward(chunk)):
                    for i in todo[ctx]:
                        result[i] = lp
            return result

    def _chunks(self, contexts):
        """Split into forward passes of at most ``max_batch_size`` rows and about
        ``max_batch_tokens`` padded positions (rows x longest context)."""
        chunk, longest = [], 0
        for ctx in sorted(contexts, key=len):
            n = max(longest, len(ctx))
            if chunk and (len(chunk) >= self.max_batch_size or (len(chunk) + 1) * n > self.max_batch_tokens):
                yield chunk
                chunk, n = [], len(ctx)
            chunk.append(ctx)
            longest = n
        if chunk:
            yield chunk

    @torch.inference_mode()
    def _forward(self, contexts: list[tuple[int, ...]]) -> list[torch.Tensor]:
        pasts = []
        for ctx in contexts:
            _, plen, pnode = self.cache.find(ctx)
            if pnode is not None:
                self.cache.touch(pnode)
                pasts.append((plen, pnode.kv))
            else:
                pasts.append((0, None))
        B = len(contexts)
        P = max(p for p, _ in pasts)
        news = [ctx[p:] for ctx, (p, _) in zip(contexts, pasts)]
        N = max(len(n) for n in news)
        dev = self.device
        input_ids = torch.full((B, N), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((B, N), dtype=torch.long)
        mask = torch.zeros((B, P + N), dtype=torch.long)
        for b, ((p, _), new) in enumerate(zip(pasts, news)):
            n = len(new)
            input_ids[b, :n] = torch.tensor(new)
            position_ids[b] = torch.arange(p, p + N)
            mask[b, :p] = 1
            mask[b, P : P + n] = 1
        cache = None
        if P > 0:
            ref = next(kv for _, kv in pasts if kv is not None)
            L, _, H, _, D = ref.shape
            full = torch.zeros((L, 2, B, H, P, D), dtype=ref.dtype, device=ref.device)
            for b, (p, kv) in enumerate(pasts):
                if kv is not None:
                    full[:, :, b, :, :p] = kv
            from transformers import DynamicCache

            cache = DynamicCache([(full[i, 0], full[i, 1]) for i in range(L)])
        out = self.model(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=position_ids.to(dev),
            past_key_values=cache,
            use_cache=True,
        )
        self.forward_calls += 1
        self.forward_tokens += sum(len(n) for n in news)
        last = torch.tensor([len(n) - 1 for n in news], device=out.logits.device)
        logits = out.logits[torch.arange(B, device=last.device), last].float()
        lp = self._normalize(logits).cpu()
        layers = out.past_key_values.layers
        results = []
        for b, ((p, _), new) in enumerate(zip(pasts, news)):
            n = len(new)
            kv = torch.stack(
                [
                    torch.stack(
                        [
                            torch.cat((layer.keys[b, :, :p], layer.keys[b, :, P : P + n]), dim=1),
                            torch.cat((layer.values[b, :, :p], layer.values[b, :, P : P + n]), dim=1),
                        ]
                    )
                    for layer in layers
                ]
            )
            row = lp[b].clone()
            self.cache.put(contexts[b], kv, row)
            results.append(row)
        return results

    def _normalize(self, logits: torch.Tensor) -> torch.Tensor:
        V = self.vocab_size
        n = logits.shape[-1]
        if n >= V:
            return torch.log_softmax(logits[:, :V], dim=-1)
        out = torch.full((logits.shape[0], V), float("-inf"), dtype=logits.dtype, device=logits.device)
        out[:, :n] = torch.log_softmax(logits, dim=-1)
        return out

    # ---- AsyncLM API --------------------------------------------------------

    #: whether ``_evaluate`` only plans and queues GPU work (no waiting for it), so it
    #: runs in the event loop's thread instead of a worker thread
    _queues_on_gpu = False

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None) -> torch.Tensor:
        """Log-probs ``[B, V]`` (float32) for every context, in one padded forward pass.

        Calls from other coroutines that arrive in the same event-loop pass, or
        while a forward pass runs, are evaluated together in the next one.
        The forward pass runs in a worker thread (or, when it only queues GPU work,
        in the event loop's thread): the event loop is not blocked by it.
        A call whose contexts are all cached is answered at once.
        """
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        cached = self._all_cached(contexts)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop: forget the old one's queue
            self._loop, self._queue, self._worker = loop, [], None
        fut = loop.create_future()
        self._queue.append((contexts, fut))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await fut

    async def _drain(self):
        while self._queue:
            n = -1
            while n != len(self._queue):  # let callers of this loop pass join
                n = len(self._queue)
                await asyncio.sleep(0)
            batch, self._queue = self._queue, []
            batch = [(c, f) for c, f in batch if not f.done()]
            if not batch:
                continue
            flat = [c for cs, _ in batch for c in cs]
            try:
                if self._queues_on_gpu:  # planning only: the GPU runs the batch later
                    result = self._evaluate(flat)
                else:
                    result = await asyncio.to_thread(self._evaluate, flat)
            except BaseException as exc:  # hand the failure to every caller
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                    raise
                continue
            k = 0
            for cs, f in batch:
                if not f.done():
                    f.set_result(result[k : k + len(cs)])
                k += len(cs)

    async def next_token_logprobs(self, token_ids, lora_name=None) -> torch.Tensor:
        return (await self.batch_next_token_logprobs([token_ids], lora_name=lora_name))[0]

    def batch_next_token_logprobs_sync(self, token_ids_list, lora_name=None) -> torch.Tensor:
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        return self._evaluate(contexts)

    def next_token_logprobs_sync(self, token_ids, lora_name=None) -> torch.Tensor:
        return self.batch_next_token_logprobs_sync([token_ids], lora_name=lora_name)[0]

    def clear_cache(self):
        """Drop every cached KV state and log-prob vector."""
        with self._lock:
            self.cache.clear()


def _no_lora(lora_name):
    if lora_name is not None:
        raise ValueError(f"HFTokenLM does not serve LoRA adapters (got lora_name={lora_name!r})")
