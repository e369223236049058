"""The fused kernels of ``backends.kernels``: on a GPU equal, bit for bit, to the PyTorch
kernels they replace, alone and inside ``PagedTokenLM``'s forward; the shared-keys
attention as close to exact attention as SDPA is, alone and inside the forward; everywhere,
the query layouts they write agree with the attention's."""

import copy

import pytest
import torch
import torch.nn.functional as F

from genlm_bytes_potential.backends import kernels
from genlm_bytes_potential.backends.kernels import QueryLayout
from genlm_bytes_potential.backends.paged import PagedTokenLM, _tree_keys_mask

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available(torch.device("cuda"))), reason="the kernels need a GPU"
)


@pytest.mark.parametrize("shared", [False, True])
def test_query_layout_strides_place_what_arrange_places(shared):
    """``strides`` (what the fused kernel writes by) and ``arrange`` (the PyTorch copy) put
    every query in the same place, and ``unarrange`` undoes ``arrange``."""
    B, N, G, g, D = 3, 2, 2, 3, 4
    layout = QueryLayout(B, N, G, g, D, shared)
    q = torch.randn(B, N, G * g, D)
    arranged = layout.arrange(q)
    assert arranged.shape == layout.shape
    placed = torch.empty(layout.shape)
    sb, skv, sj, sn = layout.strides
    torch.as_strided(placed, (B, N, G, g, D), (sb, sn, skv, sj, 1)).copy_(q.view(B, N, G, g, D))
    assert torch.equal(placed, arranged)
    assert torch.equal(layout.unarrange(arranged), q.reshape(B * N, G * g * D))


def _rope_inputs(B, N, H, G, D, slots, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, N, H + 2 * G, D, device="cuda", generator=gen).to(dtype)
    angle = torch.rand(B, N, 1, D // 2, device="cuda", generator=gen) * 100
    cos = torch.cat((angle.cos(), angle.cos()), dim=-1).to(dtype)
    sign = torch.cat((-torch.ones(D // 2), torch.ones(D // 2))).to("cuda")
    sin = (torch.cat((angle.sin(), angle.sin()), dim=-1) * sign).to(dtype)
    pool = torch.randn(slots, 2 * G, D, device="cuda", generator=gen).to(dtype)
    write = torch.randperm(slots, device="cuda", generator=gen)[: B * N]
    return qkv, cos, sin, pool, write


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("B, N", [(1, 1), (37, 1), (5, 3)])
def test_rope_write_is_the_torch_kernels_bit_for_bit(dtype, shared, B, N):
    H, G, D = 9, 3, 64  # SmolLM2's heads
    qkv, cos, sin, pool, write = _rope_inputs(B, N, H, G, D, 500, dtype)
    layout = QueryLayout(B, N, G, H // G, D, shared)
    pool_ref = pool.clone()
    q_ref = kernels.rope_write_reference(qkv, cos, sin, pool_ref, write, layout, H)
    q = kernels.rope_write(qkv, cos, sin, pool, write, layout, H)
    assert torch.equal(q, q_ref)
    assert torch.equal(pool, pool_ref)  # the written slots, and no other
    # write slots given as a strided column, as the packed batch holds them
    packed = torch.zeros(B * N, 3, dtype=torch.long, device="cuda")
    packed[:, 1] = write
    pool2 = pool.clone()
    kernels.rope_write(qkv, cos, sin, pool2, packed[:, 1], layout, H)
    assert torch.equal(pool2, pool_ref)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T, inner", [(1, 1536), (64, 1536), (3, 14336), (2, 100)])
def test_silu_mul_is_the_torch_kernels_bit_for_bit(dtype, T, inner):
    gen = torch.Generator(device="cuda").manual_seed(1)
    gate_up = (torch.randn(T, 2 * inner, device="cuda", generator=gen) * 4).to(dtype)
    assert torch.equal(kernels.silu_mul(gate_up), kernels.gated_activation(gate_up, F.silu))
    three = gate_up.view(T, 1, 2 * inner)
    assert torch.equal(kernels.silu_mul(three), kernels.gated_activation(three, F.silu))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
async def test_fused_forward_equals_the_unfused_forward(tiny_llama, dtype):
    """Through CUDA graphs and eager waves, one-token beam steps (one key set for the
    batch), rows of several new tokens, and a row reading a slot its batch writes: the
    same log-probs bit for bit with the fused kernels as without."""
    model, tok = tiny_llama
    model = copy.deepcopy(model).to("cuda", dtype)
    fused = PagedTokenLM(model, tok, kv_cache_bytes=2**24)
    plain = PagedTokenLM(model, tok, kv_cache_bytes=2**24, fused_kernels=False)
    assert fused.fused_kernels and not plain.fused_kernels
    batches = [
        [list(range(100, 160))],
        [list(range(100, 160)) + [t] for t in (5, 7, 9)],
        [list(range(100, 160)) + s for s in ([5, 6], [5, 6, 8], [11], [11, 12], [7, 3, 4, 2])],
        [list(range(100, 130)), list(range(100, 160)) + [13, 1, 2, 3, 4, 5]],
        [list(range(100, 160)) + [9, 1, 2], list(range(10, 20))],
    ]
    for batch in batches:
        got, want = await fused.batch_next_token_logprobs(batch), await plain.batch_next_token_logprobs(batch)
        assert torch.equal(got, want)
    assert fused.graph_replays == plain.graph_replays > 0


@needs_gpu
@pytest.mark.parametrize("B,U", [(1, 1), (2, 5), (11, 330), (70, 800), (22, 64), (128, 1500), (16, 3000)])
def test_shared_keys_attention_is_as_close_to_exact_attention_as_sdpa(B, U):
    """Rows of one KV-head group over keys read from the pool by slot, each row seeing its
    own subset (a tree's paths): as far from float32 attention as SDPA's bf16 kernel is,
    for row and key counts below, at and past the kernel's tiles and chunks."""
    G, g, D = 3, 3, 64
    gen = torch.Generator(device="cuda").manual_seed(B * 10007 + U)
    pool = torch.randn(4 * U + 8, 2 * G, D, device="cuda", generator=gen).to(torch.bfloat16)
    keys = torch.randperm(4 * U + 7, device="cuda", generator=gen)[:U] + 1
    visible = torch.rand(B, U, device="cuda", generator=gen) < 0.7
    visible[torch.arange(B), torch.randint(0, U, (B,), device="cuda", generator=gen)] = True  # a key each
    mask = _tree_keys_mask(visible, torch.bfloat16, g)
    q = torch.randn(1, G, B * g, D, device="cuda", generator=gen).to(torch.bfloat16)
    kv = pool[keys].transpose(0, 1)[None]
    exact = F.scaled_dot_product_attention(
        q.float(), kv[:, :G].float(), kv[:, G:].float(), attn_mask=mask.float(), scale=D**-0.5
    )
    sdpa = F.scaled_dot_product_attention(q, kv[:, :G], kv[:, G:], attn_mask=mask, scale=D**-0.5)
    got = kernels.shared_keys_attention(q, pool, keys, mask, D**-0.5)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert (got.float() - exact).abs().max() <= 2 * (sdpa.float() - exact).abs().max() + 1e-3


@needs_gpu
async def test_the_attention_kernel_forward_is_as_close_to_float32_as_sdpa(tiny_llama):
    """Beam steps (one key set for the batch, through graphs and eager waves) and rows of
    several new tokens: with the shared-keys attention kernel, a bf16 model's log-probs are
    as far from the float32 model's as with SDPA, and the same passes run."""
    model, tok = tiny_llama
    bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    ours = PagedTokenLM(bf16, tok, kv_cache_bytes=2**24)
    sdpa = PagedTokenLM(bf16, tok, kv_cache_bytes=2**24, attention_kernel=False)
    exact = PagedTokenLM(copy.deepcopy(model).to("cuda"), tok, kv_cache_bytes=2**24)
    assert ours.attention_kernel and not sdpa.attention_kernel and not exact.attention_kernel
    stem = list(range(100, 400))
    batches = [
        [stem],
        [stem + [t] for t in range(2, 40)],
        [stem + [t, 7] for t in range(2, 40)] + [stem + [5, 6, 8]],
        [stem[:100] + [t] for t in range(50, 60)],
    ]
    for batch in batches:
        want = await exact.batch_next_token_logprobs(batch)
        ours_err = (await ours.batch_next_token_logprobs(batch) - want).abs().max().item()
        sdpa_err = (await sdpa.batch_next_token_logprobs(batch) - want).abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-3, (ours_err, sdpa_err)
    assert ours.graph_replays == sdpa.graph_replays > 0


def test_the_attention_kernel_is_off_on_the_cpu(tiny_llama):
    """On the CPU the layer attends by SDPA whatever is asked."""
    model, tok = tiny_llama
    assert not PagedTokenLM(model, tok, kv_cache_bytes=2**24, attention_kernel=True).attention_kernel
