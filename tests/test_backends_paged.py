"""PagedTokenLM: exact log-probs from a slot-paged KV pool, in-batch slot sharing,
eviction, supported model families, and CUDA graphs (on a GPU machine)."""

import asyncio
import copy
import math

import numpy as np
import pytest
import torch
from genlm.backend.llm.base import AsyncLM
from spies import record_read_copies
from tiny_models import BACKEND_CONTEXTS, assert_matches_reference

from genlm_bytes_potential import threads
from genlm_bytes_potential.backends.hf import HFTokenLM
from genlm_bytes_potential.backends.paged import PagedTokenLM

CTXS = BACKEND_CONTEXTS
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def model_tok(request, tiny_llama):
    model, tok = tiny_llama
    if request.param == "cpu":
        return model, tok
    return copy.deepcopy(model).to(request.param), tok  # the session fixture stays on the CPU


def _ref(model, ctx, V):
    with torch.no_grad():
        logits = model(torch.tensor([ctx], device=model.device)).logits[0, -1].float()
    return torch.log_softmax(logits[:V], dim=-1).cpu()


async def test_matches_uncached_forward(model_tok):
    model, tok = model_tok
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
    assert isinstance(lm, AsyncLM)
    V = lm.vocab_size
    out = await lm.batch_next_token_logprobs(CTXS)
    assert out.shape == (len(CTXS), V) and out.dtype == torch.float32
    for row, ctx in zip(out, CTXS):
        assert torch.allclose(row.cpu(), _ref(model, ctx, V), atol=2e-4, rtol=1e-5)
    assert lm.forward_calls == 1 and lm.batch_calls == 1
    # contexts sharing a prefix share its slots: each distinct prefix is computed once
    prefixes = {tuple(c[:j]) for c in CTXS for j in range(1, len(c) + 1)}
    assert lm.forward_tokens == len(prefixes)


async def test_one_token_steps_and_in_batch_sharing(model_tok):
    model, tok = model_tok
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
    V = lm.vocab_size
    ctx = list(range(100, 160))
    await lm.next_token_logprobs(ctx)
    assert lm.forward_tokens == 60
    # one-token extensions (one graph replay on CUDA) ...
    batch = [ctx + [5], ctx + [7], ctx + [9]]
    outs = await lm.batch_next_token_logprobs(batch)
    assert lm.forward_tokens == 63 and lm.forward_calls == 2
    # ... and rows that read a slot another row of the same batch writes
    batch2 = [ctx + [5, 6], ctx + [5, 6, 8], ctx + [11], ctx + [11, 12]]
    outs2 = await lm.batch_next_token_logprobs(batch2)
    assert lm.forward_tokens == 63 + 4 and lm.forward_calls == 3  # 6, 8, 11, 12
    for row, c in zip(torch.cat([outs, outs2]), batch + batch2):
        assert torch.allclose(row.cpu(), _ref(model, c, V), atol=2e-4, rtol=1e-5)
    # a cached prefix that was never asked for: its last token is recomputed
    mid = ctx[:30]
    out = await lm.next_token_logprobs(mid)
    assert lm.forward_tokens == 68
    assert torch.allclose(out.cpu(), _ref(model, mid, V), atol=2e-4, rtol=1e-5)
    # a repeat is a cache hit
    again = await lm.next_token_logprobs(ctx + [7])
    assert lm.cache_hits == 1 and torch.equal(again, outs[1])
    if model.device.type == "cuda":
        assert lm.graph_replays >= 2


async def test_eviction_keeps_results_exact(tiny_llama):
    model, tok = tiny_llama
    V = len(tok)
    per_slot = 2 * 2 * 1 * 32 * 4  # layers x (k, v) x kv heads x head dim x fp32
    lm = PagedTokenLM(model, tok, kv_cache_bytes=200 * per_slot, max_batch_tokens=64, logprob_cache_bytes=4 * 4 * V)
    assert lm.cache.n_slots == 200
    rng = np.random.default_rng(0)
    seen = []
    for k in range(12):
        c = [1] + rng.integers(2, V, size=30).tolist()
        seen.append(c)
        out = await lm.batch_next_token_logprobs([c, c[:-3], seen[k // 2] + [4]])
        for row, ctx in zip(out, [c, c[:-3], seen[k // 2] + [4]]):
            assert torch.allclose(row, _ref(model, ctx, V), atol=2e-4, rtol=1e-5)
        assert len(lm.cache.nodes) + len(lm.cache.free) == lm.cache.n_slots - 1
        assert len(lm.cache.with_logprobs) <= 4
    assert lm.cache.evictions > 100
    lm.clear_cache()
    assert len(lm.cache.free) == lm.cache.n_slots - 1


async def test_pool_too_small_for_a_batch(tiny_llama):
    model, tok = tiny_llama
    per_slot = 2 * 2 * 1 * 32 * 4
    with pytest.raises(ValueError, match="max_batch_tokens"):
        PagedTokenLM(model, tok, kv_cache_bytes=50 * per_slot)
    lm = PagedTokenLM(model, tok, kv_cache_bytes=70 * per_slot, max_batch_tokens=60)
    with pytest.raises(RuntimeError, match="KV pool too small"):
        await lm.batch_next_token_logprobs([[1] + [5] * 40, [1] + [6] * 40])


@pytest.mark.parametrize("family, compile", [("qwen2", False), ("qwen3", False), ("qwen3", True)])
async def test_other_llama_style_families(family, compile, smollm2_tokenizer):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k RMS norms) run through the same forward
    (one-token steps also through the compiled layer)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    tok = smollm2_tokenizer
    V = len(tok)
    cfg_cls = Qwen2Config if family == "qwen2" else Qwen3Config
    cfg = cfg_cls(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=compile)
    out = await lm.batch_next_token_logprobs(CTXS)
    ext = await lm.batch_next_token_logprobs([c + [9] for c in CTXS])
    assert lm.compile == compile
    for row, ctx in zip(torch.cat([out, ext]), CTXS + [c + [9] for c in CTXS]):
        assert torch.allclose(row, _ref(model, ctx, V), atol=2e-4, rtol=1e-5)


def test_unsupported_model_is_refused(smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = smollm2_tokenizer
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok)))
    with pytest.raises(ValueError, match="Use HFTokenLM"):
        PagedTokenLM(gpt2, tok)


async def test_byte_potential_equals_hf_backend(tiny_llama):
    from genlm_bytes_potential import ByteBeamPotential

    model, tok = tiny_llama
    ctxs = [list(b"Hello, world"), list(b"def f(x):"), list("naïve".encode())]
    got = []
    for lm in (PagedTokenLM(model, tok, kv_cache_bytes=2**22), HFTokenLM(model, tok)):
        pot = ByteBeamPotential(lm, K=4)
        got.append((await pot.batch_prefix(ctxs), (await pot.batch_logw_next(ctxs)).weights))
    np.testing.assert_allclose(got[0][0], got[1][0], atol=1e-4)
    np.testing.assert_allclose(got[0][1], got[1][1], atol=1e-4)


async def test_load_lm_paged(tiny_llama_dir, tiny_llama):
    from genlm_bytes_potential.models import load_lm

    lm = load_lm(str(tiny_llama_dir), backend="paged", kv_cache_bytes=2**22)  # on a GPU when there is one
    assert isinstance(lm, PagedTokenLM) and lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    out = (await lm.next_token_logprobs(CTXS[0])).cpu()
    assert torch.allclose(out, _ref(tiny_llama[0], CTXS[0], lm.vocab_size), atol=2e-4, rtol=1e-5)


def test_auto_backend_without_vllm(monkeypatch, tiny_llama_dir, tmp_path):
    from transformers import GPT2Config

    from genlm_bytes_potential import models

    monkeypatch.setattr(models, "_vllm_available", lambda: False)
    assert models._auto_backend(str(tiny_llama_dir)) == "paged"
    GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    assert models._auto_backend(str(tmp_path)) == "hf"
    monkeypatch.setattr(models, "_vllm_available", lambda: True)
    assert models._auto_backend(str(tmp_path)) == "vllm"


def test_slot_trie_evicts_lru_leaves_and_keeps_contexts_asked_for():
    from genlm_bytes_potential.backends.paged import _SlotTrie

    t = _SlotTrie(n_slots=6, n_rows=10)  # 5 usable slots
    for ctx in [(1,), (1, 2), (1, 2, 3), (1, 4), (5,)]:
        t.add(ctx, t.nodes.get(ctx[:-1]))
    t.take_row((1, 2), t.nodes[(1, 2)])
    for tick, ctx in enumerate([(1, 2, 3), (1, 4), (5,), (1, 2)], 1):  # oldest first
        t.nodes[ctx].tick = tick
    assert not t.free
    t.reserve(1, pinned={(5,)})  # the oldest leaf goes; its parent holds log-probs and stays
    assert set(t.nodes) == {(1,), (1, 2), (1, 4), (5,)} and len(t.free) == 1
    t.reserve(3, pinned={(5,)})  # then (1, 4), (1, 2) and their childless parent (1,)
    assert set(t.nodes) == {(5,)} and len(t.free) == 4 and t.evictions == 4
    with pytest.raises(RuntimeError, match="KV pool too small"):
        t.reserve(5, pinned={(5,)})


def test_slot_trie_log_prob_rows_are_reused_least_recently_used_first():
    from genlm_bytes_potential.backends.paged import _SlotTrie

    t = _SlotTrie(n_slots=8, n_rows=2)
    a, b, c = (t.add((k,), None) for k in (1, 2, 3))
    assert (t.take_row((1,), a), t.take_row((2,), b)) == (0, 1)
    t.take_row((1,), a)  # (2,) is now the least recently used
    assert t.take_row((3,), c) == 1 and b.row == -1 and t.take_row((1,), a) == 0
    t.discard([(3,)])  # a removed context frees its row
    assert t.free_rows == [1] and set(t.with_logprobs) == {(1,)}


async def test_a_cached_prefix_without_log_probs_is_recomputed_in_its_own_slot(tiny_llama):
    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok)
    await lm.next_token_logprobs(CTXS[0])  # its prefixes hold KV slots, not log-probs
    slots = len(lm.cache.nodes)
    mid = CTXS[0][:-2]
    out = await lm.batch_next_token_logprobs([mid, mid + [7]])
    assert len(lm.cache.nodes) == slots + 1  # only mid + [7] is new
    assert len(lm.cache.nodes) + len(lm.cache.free) == lm.cache.n_slots - 1
    for row, ctx in zip(out, [mid, mid + [7]]):
        assert torch.allclose(row, _ref(model, ctx, lm.vocab_size), atol=2e-4, rtol=1e-5)


async def test_a_call_larger_than_the_log_prob_pool_is_refused(tiny_llama):
    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, logprob_cache_bytes=2 * 4 * len(tok))
    with pytest.raises(ValueError, match="3 distinct contexts .* 2 rows"):
        await lm.batch_next_token_logprobs([[1, 2], [1, 3], [1, 4]])
    out = await lm.batch_next_token_logprobs([[1, 2], [1, 3], [1, 2]])
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])


async def test_failed_forward_leaves_no_unwritten_slots(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
    V = lm.vocab_size
    await lm.next_token_logprobs(CTXS[0])
    before = (set(lm.cache.nodes), len(lm.cache.free))
    real = lm._forward_wave

    def fail(rows):
        raise RuntimeError("device lost")

    monkeypatch.setattr(lm, "_forward_wave", fail)
    with pytest.raises(RuntimeError, match="device lost"):
        await lm.batch_next_token_logprobs([CTXS[0] + [5, 6], [1, 2, 3]])
    assert (set(lm.cache.nodes), len(lm.cache.free)) == before
    monkeypatch.setattr(lm, "_forward_wave", real)
    out = await lm.batch_next_token_logprobs([CTXS[0] + [5, 6], [1, 2, 3]])
    for row, ctx in zip(out, [CTXS[0] + [5, 6], [1, 2, 3]]):
        assert torch.allclose(row, _ref(model, ctx, V), atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("cls", [HFTokenLM, PagedTokenLM])
async def test_cached_contexts_are_answered_without_a_forward_pass(cls, tiny_llama, monkeypatch):
    model, tok = tiny_llama
    lm = cls(model, tok)
    first = await lm.batch_next_token_logprobs(CTXS)

    def no_worker(contexts):
        raise AssertionError("a fully cached call reached the worker")

    monkeypatch.setattr(lm, "_evaluate", no_worker)
    again = await lm.batch_next_token_logprobs(CTXS[::-1])
    assert torch.equal(again, first.flip(0))
    assert lm.cache_hits == len(CTXS)


async def test_lookahead_scores_the_same_with_fewer_forward_passes(tiny_llama):
    from genlm_bytes_potential.byte_lm import ByteLM

    model, tok = tiny_llama
    text = "def f(x):\n    return x + 1  # café, naïve".encode()
    runs = []
    for lookahead in (0, 4):
        lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
        score = await ByteLM(lm, K=4, lookahead=lookahead).score(text)
        runs.append((score.logprob, lm.forward_calls, lm.cache_hits))
    (lp0, fw0, _), (lp4, fw4, hits4) = runs
    assert lp4 == pytest.approx(lp0, abs=1e-3)
    assert fw4 < fw0 and hits4 > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="masses are kept on the device only on a GPU")
async def test_prefetched_mass_rows_stay_on_the_gpu_and_skip_the_lm(tiny_llama):
    from genlm_bytes_potential.byte_lm import ByteLM

    model, tok = tiny_llama
    model = copy.deepcopy(model).cuda()
    text = "def f(x):\n    return x + 1  # café, naïve".encode()
    runs = []
    for lookahead in (0, 4):
        blm = ByteLM(PagedTokenLM(model, tok, kv_cache_bytes=2**22), K=4, lookahead=lookahead)
        score = await blm.score(text)
        runs.append((score.logprob, blm.model.stats.batch_calls))
    (lp0, calls0), (lp4, calls4) = runs
    assert lp4 == pytest.approx(lp0, abs=1e-4)
    assert calls4 < calls0 / 2  # most steps only gathered stored rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="masses are kept on the device only on a GPU")
async def test_scoring_on_the_gpu_reads_its_masses_on_the_host(tiny_llama, monkeypatch):
    """Scoring a text, each new row brings the masses along the bytes after its context
    to the host with its check: reads copy from the GPU's table only while the first
    context's row (made before the text was known) is read. Its LM calls, on the GPU,
    set torch's CPU threads (``threads.for_gpu_inference``)."""
    from genlm_bytes_potential.byte_lm import ByteLM

    monkeypatch.setattr(threads, "_done", False)  # as in a process that has not set them yet
    model, tok = tiny_llama
    blm = ByteLM(PagedTokenLM(copy.deepcopy(model).cuda(), tok, kv_cache_bytes=2**22), K=4, heal=False)
    store = blm.model.store
    copied = record_read_copies(store)
    first_row = int((await blm.beam()).rows.slot[0])
    score = await blm.score("def f(x):\n    return x + 1  # café, naïve".encode())
    assert score.logprob > -math.inf and store.table.device.type == "cuda"
    assert set(np.concatenate([[first_row], *copied]).tolist()) == {first_row}
    assert threads._done  # an LM call returned log-probs on the GPU: torch's CPU threads were set


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for CUDA work")
async def test_device_done_lets_other_tasks_run_while_the_gpu_works():
    from genlm_bytes_potential.transfer import device_done

    stream = torch.cuda.current_stream()
    torch.cuda._sleep(500_000_000)  # a few hundred ms of GPU time
    seen = []

    async def other():
        seen.append(stream.query())

    await asyncio.gather(device_done(stream.device), other())
    assert seen == [False]  # it ran while the GPU was busy
    assert stream.query()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="masses are kept on the device only on a GPU")
@pytest.mark.parametrize("cache_bytes", [2**31, 2**24])
async def test_device_masses_equal_host_masses_under_concurrent_batches(tiny_llama, cache_bytes):
    """Two batches of particles at once (as genlm-control's autobatching sends them), each
    awaiting the GPU (its forward pass and its masses) while the other runs: the next-byte
    log-probs of a potential whose masses stay on the GPU equal those of one whose masses
    are on the host, step by step; also when the GPU's store holds a dozen rows, so that
    each batch allocates rows while the other's are still being written (pinned). With
    room for every row, the particles' steps read no mass from the GPU's table (new rows'
    root fronts and the kept candidates' fronts are on the host)."""
    from genlm_bytes_potential.potential import ByteBeamPotential

    model, tok = tiny_llama
    lm = PagedTokenLM(copy.deepcopy(model).cuda(), tok, kv_cache_bytes=2**24)
    pots = [
        ByteBeamPotential(lm, K=4, prompt=b"Fruits: ", device=d, cache_bytes=b)
        for d, b in ((None, cache_bytes), ("cpu", 2**31))
    ]
    for pot in pots:
        await pot.prefill()  # (what reading the prompt copies is not counted here)
    copied = record_read_copies(pots[0].model.store)
    rng = np.random.default_rng(0)
    contexts = [[] for _ in range(8)]
    for _ in range(6):
        weights = []
        for pot in pots:
            halves = await asyncio.gather(pot.batch_logw_next(contexts[:4]), pot.batch_logw_next(contexts[4:]))
            weights.append(np.concatenate([np.asarray(h.weights) for h in halves]))
        on_gpu, on_host = weights
        assert np.array_equal(np.isinf(on_gpu), np.isinf(on_host))
        finite = np.isfinite(on_gpu)
        np.testing.assert_allclose(on_gpu[finite], on_host[finite], rtol=0, atol=1e-9)
        p = np.exp(on_gpu[:, :256] - on_gpu[:, :256].max(1, keepdims=True))
        for i, row in enumerate(p / p.sum(1, keepdims=True)):
            contexts[i] = contexts[i] + [int(rng.choice(256, p=row))]
    assert pots[0].model.store.table.device.type == "cuda"
    if cache_bytes == 2**31:
        assert copied == []


async def test_contexts_that_keep_their_prefix_plan_and_compute_as_tuples(tiny_llama):
    """Contexts made by extension (``TokenContext.prefix``: links kept, and cut past two)
    give the rows and the forward passes that the same contexts as plain tuples give."""
    from genlm_bytes_potential.lm_state import TokenContext

    model, tok = tiny_llama
    base = TokenContext(range(100, 130))
    chain = [base]
    for t in (5, 6, 7, 8):  # a prefetched chain: the first links are cut by the later ones
        chain.append(chain[-1].extended(t))
    branches = [base.extended(t) for t in (9, 10)] + [chain[2].extended(11)]
    calls = [[base], chain[1:], branches, [c.extended(12) for c in branches]]
    runs = []
    for as_tuples in (False, True):
        lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
        rows = [await lm.batch_next_token_logprobs([tuple(c) if as_tuples else c for c in call]) for call in calls]
        runs.append((rows, lm.forward_calls, lm.forward_tokens))
    (linked, calls_l, tokens_l), (plain, calls_p, tokens_p) = runs
    assert (calls_l, tokens_l) == (calls_p, tokens_p)
    assert all(torch.equal(a, b) for a, b in zip(linked, plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the GPU path with the CPU's")
async def test_gpu_scoring_equals_the_cpu_in_float32(tiny_llama):
    """The whole GPU path (graphs, masses kept on the device, prefetched rows, the copies
    between host and GPU) scores a text as the CPU does, in float32: a copy that read a
    reused buffer, or a row written to the wrong place, moves the total by far more."""
    from genlm_bytes_potential.byte_lm import ByteLM

    model, tok = tiny_llama
    text = "def f(x):\n    return x + 1  # café, naïve\n".encode() * 6
    scores = []
    for m in (model, copy.deepcopy(model).cuda()):
        score = await ByteLM(PagedTokenLM(m, tok, kv_cache_bytes=2**22), K=4).score(text)
        scores.append(score.logprob)
    assert np.isfinite(scores[0]) and scores[1] == pytest.approx(scores[0], abs=1e-2)


def _assert_slot_paths_consistent(lm):
    """Every cached context's slot path is its parent's path and its own slot."""
    for ctx, node in lm.cache.nodes.items():
        assert len(node.path) == len(ctx) and node.path[-1] == node.slot
        if node.parent is not None:
            assert lm.cache.nodes[ctx[:-1]] is node.parent
            np.testing.assert_array_equal(node.path[:-1], node.parent.path)


async def test_one_token_steps_past_the_batch_size_run_in_several_passes(tiny_llama):
    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, max_batch_size=4)
    V = lm.vocab_size
    ctx = [1, 504, 3, 77, 1000]
    await lm.next_token_logprobs(ctx)
    steps = [ctx + [t] for t in range(200, 210)]  # 10 one-token rows: 3 passes of <= 4
    out = await lm.batch_next_token_logprobs(steps + [ctx[:2]])  # and a cached prefix, recomputed
    assert lm.forward_calls == 1 + 3 and lm.forward_tokens == len(ctx) + 11
    for row, c in zip(out, steps + [ctx[:2]]):
        assert torch.allclose(row, _ref(model, c, V), atol=2e-4, rtol=1e-5)
    # steps on the new contexts, then multi-token rows on them: slot paths stay consistent
    more = [s + [9] for s in steps[:6]] + [steps[7] + [5, 6, 7], steps[8] + [3] * 9]
    out = await lm.batch_next_token_logprobs(more)
    for row, c in zip(out, more):
        assert torch.allclose(row, _ref(model, c, V), atol=2e-4, rtol=1e-5)
    _assert_slot_paths_consistent(lm)


async def test_one_token_steps_past_the_batch_size_are_the_passes_of_their_chunks(tiny_llama):
    """More one-token rows on cached prefixes than a pass holds run as passes of
    ``max_batch_size`` rows in order: the rows, bit for bit, and the passes of calling
    those chunks one by one."""
    model, tok = tiny_llama
    ctx = [1, 504, 3, 77, 1000]
    steps = [ctx + [t] for t in range(200, 210)] + [ctx[:3] + [t] for t in (7, 8)]
    runs = []
    for chunked in (True, False):
        lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, max_batch_size=4)
        await lm.next_token_logprobs(ctx)
        if chunked:
            out = await lm.batch_next_token_logprobs(steps)
        else:
            out = torch.cat([await lm.batch_next_token_logprobs(steps[i : i + 4]) for i in range(0, len(steps), 4)])
        runs.append((out, lm.forward_calls, lm.forward_tokens))
        _assert_slot_paths_consistent(lm)
    (out, calls, tokens), (ref, ref_calls, ref_tokens) = runs
    assert torch.equal(out, ref) and calls == ref_calls == 1 + 3 and tokens == ref_tokens == len(ctx) + 12


async def test_slot_paths_after_eviction_and_a_long_context(tiny_llama):
    model, tok = tiny_llama
    per_slot = 2 * 2 * 1 * 32 * 4
    lm = PagedTokenLM(model, tok, kv_cache_bytes=150 * per_slot, max_batch_tokens=100)
    rng = np.random.default_rng(1)
    for _ in range(8):
        base = [1] + rng.integers(2, 1000, size=20).tolist()
        await lm.batch_next_token_logprobs([base])
        await lm.batch_next_token_logprobs([base + [t] for t in range(5)])
        await lm.batch_next_token_logprobs([base + [t, 7] for t in range(5)])
        _assert_slot_paths_consistent(lm)
    assert lm.cache.evictions > 0
    last = [base + [4, 7, 8]]
    assert torch.allclose(
        (await lm.batch_next_token_logprobs(last))[0], _ref(model, last[0], lm.vocab_size), atol=2e-4, rtol=1e-5
    )


def test_lm_step_benchmark_leaves_the_lm_as_it_was(tiny_llama):
    """benchmarks/lm_step.py at toy scale: well-formed times, and the LM (whose forward it
    stubs out for plan_ms) computes exact values afterwards."""
    from benchmarks import lm_step

    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22)
    rows = lm.logprob_rows
    results = lm_step.measure(lm, (1, 504, 3, 77), [1, 3], reps=2, warmup=1)
    assert [(r["N"], r["api"]) for r in results] == [(1, "sync"), (1, "async"), (3, "sync"), (3, "async")]
    for r in results:
        for key in ("total_ms", "host_ms", "hit_ms", "plan_ms"):
            assert 0 <= r[key]["min"] <= r[key]["median"] <= r[key]["max"]
    assert lm.logprob_rows is rows and "_run" not in vars(lm) and not lm.cache.nodes
    first = lm_step.first_calls(lm, (1, 504, 3, 77), [1, 3])
    assert set(first["first_call_s"]) == {1, 3} and first["dynamo_graphs"] == 0  # eager: nothing compiled
    counts, table = lm_step.profile_step(lm, (1, 504, 3, 77), 3)
    assert counts["launched"]["kernels"] > 0 and "aten::" in table
    ctx = [1, 504, 3, 77, 1001]
    assert torch.allclose(lm.next_token_logprobs_sync(ctx), _ref(model, ctx, lm.vocab_size), atol=2e-4, rtol=1e-5)


# ---- the compiled decoder layer and the padded buckets of CUDA graphs -----------

#: one-token steps, rows of 2-4 new tokens sharing prefixes (compiled layer), longer rows
#: (eager layer), a recomputed cached prefix and a single row (its own shape class)
_STEP_BATCHES = [
    [list(range(100, 160))],
    [list(range(100, 160)) + [t] for t in (5, 7, 9)],
    [list(range(100, 160)) + s for s in ([5, 6], [5, 6, 8], [11], [11, 12], [7, 3, 4, 2])],
    [list(range(100, 130)), list(range(100, 160)) + [13, 1, 2, 3, 4, 5]],
    [list(range(100, 160)) + [9, 1, 2]],
]


async def _run_batches(lm, batches):
    return [await lm.batch_next_token_logprobs(b) for b in batches]


async def test_compiled_layer_equals_the_eager_layer(tiny_llama):
    from torch._dynamo.utils import counters

    model, tok = tiny_llama
    V = len(tok)
    graphs = counters["stats"]["unique_graphs"]
    compiled = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=True)
    eager = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=False)
    assert compiled.compile and not eager.compile
    got, want = await _run_batches(compiled, _STEP_BATCHES), await _run_batches(eager, _STEP_BATCHES)
    assert compiled.compile  # no fall-back
    for batch, g, w in zip(_STEP_BATCHES, got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
        for row, ctx in zip(g, batch):
            assert torch.allclose(row, _ref(model, ctx, V), atol=2e-4, rtol=1e-5)
    # the same slots hold the same keys and values
    assert compiled.cache.nodes.keys() == eager.cache.nodes.keys()
    slots = torch.tensor([n.slot for n in compiled.cache.nodes.values()])
    torch.testing.assert_close(compiled.pool[:, slots], eager.pool[:, slots], atol=1e-4, rtol=1e-4)
    # layer and head: one compile per shape class (several rows / one row / several new
    # tokens; keys per row or shared by the batch), the layer's shared by all layers
    assert 2 <= counters["stats"]["unique_graphs"] - graphs <= 2 * 3


async def test_compile_failure_falls_back_to_the_eager_layer(tiny_llama):
    from genlm_bytes_potential.backends import paged

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no compiler here")

    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=True)
    lm._compiled = (torch.compile(paged._layer, backend=no_compiler, fullgraph=True), lm._compiled[1])
    ctx = CTXS[0] + [5]
    with pytest.warns(RuntimeWarning, match="torch.compile of the decoder layer failed .*no compiler here"):
        out = await lm.next_token_logprobs(ctx)
    assert not lm.compile and lm._compiled is None
    assert torch.allclose(out, _ref(model, ctx, lm.vocab_size), atol=2e-4, rtol=1e-5)


def test_compile_modes_with_cudagraphs_of_their_own_are_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="compile='reduce-overhead': expected .*max-autotune-no-cudagraphs"):
        PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile="reduce-overhead")
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile="default")
    assert lm.compile and lm._compiled is not None
    plain = PagedTokenLM(model, tok, kv_cache_bytes=2**22)  # off unless asked for
    assert not plain.compile and plain._compiled is None


def _eager_graphs(lm, monkeypatch) -> list:
    """Make ``lm`` use its CUDA-graph path (buckets, packing, ``_decode``) with each
    "captured graph" run by the eager forward on the CPU; returns the captured buckets as
    ``(N, per-row layout?, *packed shape)``, in order."""
    from genlm_bytes_potential.backends import paged

    captured = []

    class EagerGraph:
        def __init__(self, N, buf, unpack):
            self.N, self.buf, self.unpack = N, buf, unpack

        def replay(self):
            lm._run(*self.unpack(self.buf, self.N))

    def capture(N, shape, unpack):
        captured.append((N, unpack is paged._unpack, *shape))
        buf = torch.zeros(shape, dtype=torch.long)
        return EagerGraph(N, buf, unpack), buf

    monkeypatch.setattr(lm, "cuda_graphs", True)
    monkeypatch.setattr(lm, "_capture", capture)
    return captured


async def test_padded_buckets_of_cuda_graphs_are_exact(tiny_llama, monkeypatch):
    """Rows of up to GRAPH_TOKENS new tokens packed as CUDA graphs replay them (rows, new
    tokens and keys padded to buckets; padding writes the scratch slot and row), run
    here by the eager forward."""

    model, tok = tiny_llama
    lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=False)
    shapes = _eager_graphs(lm, monkeypatch)
    out = await _run_batches(lm, _STEP_BATCHES)
    for batch, rows in zip(_STEP_BATCHES, out):
        for row, ctx in zip(rows, batch):
            assert torch.allclose(row, _ref(model, ctx, lm.vocab_size), atol=2e-4, rtol=1e-5)
    # 3 rows of 1 new token sharing 60 keys: 4 rows over 64 keys for all and their [4, 64]
    # visibility matrix (bools, 8 to an int64; _pack_tree); 5 rows of <= 4: 8 x 4, 64 keys
    # each; (6 new tokens: no graph); 1 row of 2: 2 x 2 (rows padded to >= 2)
    assert shapes == [(1, False, 5 * 4 + 64 + 4 * 64 // 8), (4, True, 8, 12 + 2 + 64), (2, True, 2, 6 + 2 + 64)]
    assert torch.isfinite(lm.pool[:, 0]).all()  # the scratch slot padding wrote


async def test_rows_sharing_keys_read_them_once(tiny_llama, monkeypatch):
    """One-token rows whose contexts share many of their tokens (a beam's candidates and
    prefetched chains, also when they part at their first token) read the union of their
    slot paths once for the whole batch (``_pack_tree``), in the eager forward and in
    CUDA-graph buckets (padding rows and keys); rows with little in common keep a row of
    keys each. Every row equals the uncached forward."""
    model, tok = tiny_llama
    V = len(tok)
    text = list(range(200, 260))
    other = [7] + text[1:]  # another tokenization's path: parts from ``text`` at its first token
    batches = [
        [text],
        [text + [t] for t in (5, 7, 9, 11, 13)] + [text[:59]],  # (a cached prefix without log-probs: recomputed)
        # cousins and a chain whose prefix this very call computes (same wave)
        [text + [5, 6], text + [7, 8], text + [13, 3], text + [13, 3, 4], text + [11, 12]],
        [other],
        [text + [5, 6, 1], other + [5], text + [7, 2], other + [6], other + [8], text + [9, 4]],
        [list(range(300, 340)) + [1], list(range(400, 450)) + [2], list(range(500, 520)) + [3]],
    ]
    for graphs in (False, True):
        lm = PagedTokenLM(model, tok, kv_cache_bytes=2**22, compile=False)
        layouts = []
        for name in ("_pack", "_pack_tree"):
            inner = getattr(lm, name)
            monkeypatch.setattr(lm, name, lambda *a, _f=inner, _n=name, **k: layouts.append(_n) or _f(*a, **k))
        if graphs:
            _eager_graphs(lm, monkeypatch)
        out = await _run_batches(lm, batches)
        for batch, rows in zip(batches, out):
            for row, ctx in zip(rows, batch):
                assert torch.allclose(row, _ref(model, ctx, V), atol=2e-4, rtol=1e-5), (graphs, ctx)
        # a prefix (60 new tokens); two beam steps; another prefix; steps of both paths;
        # unrelated contexts (~40-50 tokens each)
        assert layouts == ["_pack", "_pack_tree", "_pack_tree", "_pack", "_pack_tree", "_pack"], (graphs, layouts)


def test_key_union_holds_each_slot_once_in_path_order():
    """The tree layout's keys: every slot of the rows' paths once, each row's in its
    path's order, and each row seeing exactly its own path (its new slot included)."""
    from genlm_bytes_potential.backends.paged import _KeyUnion

    union = _KeyUnion(64)
    rows = [[1, 2, 3], [1, 2, 4, 5], [9], [1, 2, 3, 6]]  # parents' paths
    new = np.array([10, 11, 12, 13])
    for _ in range(2):  # a second call finds nothing left from the first
        paths, lens = np.concatenate(rows), np.array([len(r) for r in rows])
        keys = union.keys(paths, lens, new)
        assert keys.tolist() == [1, 2, 3, 10, 4, 5, 11, 9, 12, 6, 13]
        visible = np.zeros((len(rows), len(keys)), bool)
        union.mark(visible, paths, lens, new)
        for b, row in enumerate(rows):
            seen = keys[visible[b]].tolist()
            assert seen == row + [new[b]]  # its path, in order
    # a row of one token (no parent, new slot 3) and a row extending it in the same batch
    keys = union.keys(np.array([3]), np.array([0, 1]), np.array([3, 8]))
    assert keys.tolist() == [3, 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and Triton need a GPU")
async def test_cuda_graphs_with_the_compiled_layer_match_eager_in_bf16(tiny_llama):
    """bf16 on the GPU: graphs + compiled layer are within bf16 rounding of the float32
    values, as the eager forward without graphs is (``assert_matches_reference``)."""
    model, tok = tiny_llama
    V = len(tok)
    model16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    fast = PagedTokenLM(model16, tok, kv_cache_bytes=2**24, compile=True)
    assert fast.compile and fast.cuda_graphs
    slow = PagedTokenLM(model16, tok, kv_cache_bytes=2**24, compile=False, cuda_graphs=False)
    got, want = await _run_batches(fast, _STEP_BATCHES), await _run_batches(slow, _STEP_BATCHES)
    assert fast.compile and fast.graph_replays == 3  # not the prefix's and the 6-token row's waves
    ref = torch.stack([_ref(model, ctx, V) for batch in _STEP_BATCHES for ctx in batch])
    for out in (got, want):
        for row, r in zip(torch.cat(out), ref):
            assert_matches_reference(row, r, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels")
async def test_values_do_not_depend_on_the_global_sdpa_settings(tiny_llama):
    """Importing vLLM turns cuDNN's SDPA off for the whole process; the forward asks for
    its kernels in its own order, so its bf16 values stay the same."""
    model, tok = tiny_llama
    model16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    before = await _run_batches(PagedTokenLM(model16, tok, kv_cache_bytes=2**24), _STEP_BATCHES)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # what `import vllm` does
    try:
        after = await _run_batches(PagedTokenLM(model16, tok, kv_cache_bytes=2**24), _STEP_BATCHES)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
