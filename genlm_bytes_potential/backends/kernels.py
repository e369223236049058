"""Fused CUDA kernels (Triton) for :class:`~genlm_bytes_potential.backends.paged.PagedTokenLM`'s
eager decoder layer: each replaces several PyTorch kernels with one and computes what they
compute, rounding included.

A one-token step of a small model is bound by the number of kernels it launches (about
3 µs each on an H200, ~19 a layer), not by their work:

* :func:`rope_write` — rotary embedding of q and k, k and v written to their KV-pool
  slots, q written in the attention's layout: the ``mul``, ``roll``, ``addcmul``, ``cat``,
  ``index_put`` and the query's ``permute`` copy in one kernel;
* :func:`silu_mul` — ``silu(gate) * up`` of the gated MLP in one kernel instead of two;
* :func:`shared_keys_attention` — attention of a batch's rows over one shared key set (the
  paged layer's tree layout), its keys split across programs (flash-decoding) and read from
  the KV pool by slot: SDPA's kernel runs ``kv_heads x ceil(rows / 64)`` programs, each
  over every key in turn (18.6 µs a layer over ~800 keys while scoring on an H200).

The first two round as the PyTorch kernels they replace do (float32 arithmetic, each PyTorch
kernel's result rounded to the tensor's dtype, the same fused multiply-add and the same
``expf``): :func:`rope_write_reference` and :func:`gated_activation` are those PyTorch
kernels, and the GPU tests hold the fused ones to them bit for bit. The attention sums in another
order than SDPA's kernels (float32 accumulation, as theirs): the GPU tests hold it to SDPA
within bf16 rounding.

:func:`available` says whether they run on a device (CUDA with Triton); elsewhere the
references are the layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds may lack it or its GPU backend
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001 (any failure to import means: no fused kernels)
    triton = None

__all__ = [
    "QueryLayout",
    "available",
    "gated_activation",
    "rope_write",
    "rope_write_reference",
    "shared_keys_attention",
    "silu_mul",
]


class QueryLayout(NamedTuple):
    """How the attention takes its queries: ``B`` rows of ``N`` new tokens, ``G`` KV heads
    of ``g`` query heads each, head dim ``D``; each row over its own keys (``[B, G, g * N,
    D]``) or, ``shared``, every row over one key set (``[1, G, B * g * N, D]``). Query
    ``(b, n, kv_head, j)`` (the ``j``-th query head of ``kv_head``) is row ``j * N + n``
    of its row's block of its KV head."""

    B: int
    N: int
    G: int
    g: int
    D: int
    shared: bool

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, N, G, g, D = self[:5]
        return (1, G, B * g * N, D) if self.shared else (B, G, g * N, D)

    @property
    def strides(self) -> tuple[int, int, int, int]:
        """Element strides of ``b``, ``kv_head``, ``j`` and ``n``."""
        B, N, G, g, D = self[:5]
        if self.shared:
            return g * N * D, B * g * N * D, N * D, D
        return G * g * N * D, g * N * D, N * D, D

    def arrange(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` (``[B, N, H, D]``) in this layout (a copy)."""
        B, N, G, g, D = self[:5]
        q = q.reshape(B, N, G, g, D)
        return (
            q.permute(2, 0, 3, 1, 4).reshape(self.shape)
            if self.shared
            else q.permute(0, 2, 3, 1, 4).reshape(self.shape)
        )

    def unarrange(self, o: torch.Tensor) -> torch.Tensor:
        """The attention's output ``o`` (this layout's shape) as ``[B * N, H * D]``."""
        B, N, G, g, D = self[:5]
        if self.shared:
            return o.reshape(G, B, g, N, D).permute(1, 3, 0, 2, 4).reshape(B * N, G * g * D)
        return o.reshape(B, G, g, N, D).permute(0, 3, 1, 2, 4).reshape(B * N, G * g * D)


def available(device: torch.device) -> bool:
    """Whether the fused kernels run on ``device``."""
    return triton is not None and device.type == "cuda"


def rope_write_reference(qkv, cos, sin, pool, write, layout: QueryLayout, heads: int) -> torch.Tensor:
    """The PyTorch kernels :func:`rope_write` fuses. ``qkv``: ``[B, N, H + 2G, D]`` (q, k,
    v heads); ``cos``/``sin``: ``[B, N, 1, D]`` (``sin`` times rotate_half's sign);
    ``pool``: ``[slots, 2G, D]``; ``write``: ``[B * N]`` slots. Writes rotated k and v to
    ``pool[write]``; returns rotated q in ``layout``."""
    B, N, n_heads, D = qkv.shape
    H, G = heads, (n_heads - heads) // 2
    qk, v = qkv[:, :, : H + G], qkv[:, :, H + G :]
    qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
    pool.index_put_((write,), torch.cat((qk[:, :, H:], v), dim=2).view(B * N, 2 * G, D))
    return layout.arrange(qk[:, :, :H])


def gated_activation(gate_up: torch.Tensor, act=F.silu) -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up`` = ``[..., 2I]`` (gate, then up): the gated MLP's
    PyTorch kernels (:func:`silu_mul` fuses them for ``F.silu``)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def rope_write(qkv, cos, sin, pool, write, layout: QueryLayout, heads: int) -> torch.Tensor:
    """:func:`rope_write_reference` as one kernel (CUDA, Triton): one program per new
    token and head. ``qkv``, ``cos``, ``sin`` and ``pool`` must be contiguous in their
    last dimension, whose size (the head dim) is a power of two."""
    B, N, n_heads, D = qkv.shape
    G = (n_heads - heads) // 2
    T = B * N
    q = qkv.new_empty(layout.shape)
    qkv2, cos2, sin2 = qkv.reshape(T, n_heads, D), cos.reshape(T, D), sin.reshape(T, D)
    _rope_write_kernel[(T, heads + 2 * G)](
        qkv2,
        cos2,
        sin2,
        pool,
        write,
        q,
        qkv2.stride(0),
        qkv2.stride(1),
        cos2.stride(0),
        sin2.stride(0),
        write.stride(0),
        pool.stride(0),
        pool.stride(1),
        N,
        heads // G,
        *layout.strides,
        H=heads,
        G=G,
        D=D,
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gated_activation(gate_up, F.silu)`` as one kernel (CUDA, Triton)."""
    I2 = gate_up.shape[-1]
    x = gate_up.reshape(-1, I2)
    T, inner = x.shape[0], I2 // 2
    out = x.new_empty((T, inner))
    block = min(1024, triton.next_power_of_2(inner))
    _silu_mul_kernel[(T, triton.cdiv(inner, block))](x, out, x.stride(0), out.stride(0), inner, BLOCK=block)
    return out.view(*gate_up.shape[:-1], inner)


def shared_keys_attention(q, pool, keys, mask, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` per KV head, over the keys and values of
    ``pool[keys]`` (CUDA, Triton): ``q`` ``[1, G, R, D]`` (the shared layout), ``pool``
    ``[slots, 2G, D]`` (keys, then values), ``keys`` ``[U]`` slots, ``mask`` ``[1, 1, R,
    U]`` additive (0 or -inf; every row sees a key); ``q``, ``pool`` and ``keys`` contiguous in
    their last dimension. Equal to
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`` up to the
    order of float32 sums. The keys are split into chunks of ``_KEYS_PER_PROGRAM`` or more,
    one program per chunk, KV head and ``_ROWS`` rows (enough programs to fill the GPU), and a
    second kernel combines the chunks' partial softmaxes."""
    _, G, R, D = q.shape
    U = keys.shape[0]
    tiles = triton.cdiv(R, _ROWS)
    chunks = max(1, min(triton.cdiv(U, _KEYS_PER_PROGRAM), _PROGRAMS // (G * tiles)))
    chunk = triton.cdiv(triton.cdiv(U, chunks), _KEYS) * _KEYS
    chunks = triton.cdiv(U, chunk)
    part = torch.empty((chunks, G, R, D), dtype=torch.float32, device=q.device)
    top = torch.empty((chunks, G, R), dtype=torch.float32, device=q.device)
    total = torch.empty((chunks, G, R), dtype=torch.float32, device=q.device)
    m = mask.reshape(R, U)
    _chunk_attention_kernel[(tiles, G, chunks)](
        q, pool, keys, m, part, top, total,
        q.stride(1), q.stride(2), pool.stride(0), pool.stride(1), m.stride(0), m.stride(1),
        R, U, G, chunk, scale,
        D=D, ROWS=_ROWS, KEYS=_KEYS,
    )  # fmt: skip
    out = torch.empty_like(q)
    _combine_chunks_kernel[(R, G)](part, top, total, out, out.stride(1), out.stride(2), R, G, chunks, D=D)
    return out


_ROWS, _KEYS = 32, 64  # query rows and keys of one program's tiles
_KEYS_PER_PROGRAM = 64  # fewest keys a program reads (more chunks cost the combine more)
_PROGRAMS = 264  # programs to aim for: two per SM of an H100/H200


if triton is not None:

    @triton.jit
    def _chunk_attention_kernel(
        q, pool, keys, mask, part, top, total,
        s_qh, s_qr, s_slot, s_head, s_mr, s_mu,
        R, U, G, chunk, scale,
        D: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
    ):  # fmt: skip
        """One chunk of keys for ``ROWS`` query rows of KV head ``h``: its partial
        softmax (running maximum ``top``, sum ``total``, unnormalized output ``part``)."""
        t, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = t * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, D)
        row_ok = r < R
        qt = tl.load(q + h * s_qh + r[:, None] * s_qr + d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32)
        lo = c * chunk
        hi = tl.minimum(lo + chunk, U)
        for start in range(lo, hi, KEYS):
            u = start + tl.arange(0, KEYS)
            key_ok = u < hi
            slot = tl.load(keys + u, mask=key_ok, other=0)
            kt = tl.load(pool + slot[:, None] * s_slot + h * s_head + d[None, :], mask=key_ok[:, None], other=0.0)
            vt = tl.load(pool + slot[:, None] * s_slot + (G + h) * s_head + d[None, :], mask=key_ok[:, None], other=0.0)
            bias = tl.load(
                mask + r[:, None] * s_mr + u[None, :] * s_mu,
                mask=row_ok[:, None] & key_ok[None, :],
                other=float("-inf"),
            ).to(tl.float32)
            s = tl.dot(qt, tl.trans(kt)) * scale + bias
            m_new = tl.maximum(m_i, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - base[:, None])
            alpha = tl.exp(m_i - base)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        at = (c * G + h) * R + r
        tl.store(top + at, m_i, mask=row_ok)
        tl.store(total + at, l_i, mask=row_ok)
        tl.store(part + at[:, None] * D + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _combine_chunks_kernel(part, top, total, out, s_oh, s_or, R, G, chunks, D: tl.constexpr):
        """Row ``r`` of KV head ``h``: the chunks' partial softmaxes as one."""
        r, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, D)
        m = tl.full((), float("-inf"), tl.float32)
        for c in range(chunks):
            m = tl.maximum(m, tl.load(top + (c * G + h) * R + r))
        base = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros((D,), tl.float32)
        norm = tl.zeros((), tl.float32)
        for c in range(chunks):
            at = (c * G + h) * R + r
            w = tl.exp(tl.load(top + at) - base)
            norm += w * tl.load(total + at)
            acc += w * tl.load(part + at * D + d)
        tl.store(out + h * s_oh + r * s_or + d, (acc / norm).to(out.dtype.element_ty))

    @triton.jit
    def _rope_write_kernel(
        qkv,
        cos,
        sin,
        pool,
        write,
        q_out,
        s_tok,
        s_head,
        s_cos,
        s_sin,
        s_write,
        s_slot,
        s_pool_head,
        N,
        g,
        q_b,
        q_kv,
        q_j,
        q_n,
        H: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
    ):
        t = tl.program_id(0)  # new token (row b = t // N, position n = t % N in the row)
        h = tl.program_id(1)  # head: q (< H), k (< H + G) or v
        d = tl.arange(0, D)
        x = tl.load(qkv + t * s_tok + h * s_head + d)
        if h < H + G:  # rotary: x * cos + roll(x, D / 2) * sin, each PyTorch kernel rounding
            rolled = tl.load(qkv + t * s_tok + h * s_head + (d + D // 2) % D)
            c = tl.load(cos + t * s_cos + d).to(tl.float32)
            s = tl.load(sin + t * s_sin + d).to(tl.float32)
            x_cos = (x.to(tl.float32) * c).to(x.dtype)  # the mul
            x = tl.fma(rolled.to(tl.float32), s, x_cos.to(tl.float32)).to(x.dtype)  # the addcmul
        if h < H:
            b, n = t // N, t % N
            kv, j = h // g, h % g
            tl.store(q_out + b * q_b + kv * q_kv + j * q_j + n * q_n + d, x)
        else:
            slot = tl.load(write + t * s_write)
            tl.store(pool + slot * s_slot + (h - H) * s_pool_head + d, x)

    @triton.jit
    def _silu_mul_kernel(x, out, s_x, s_out, inner, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = i < inner
        gate = tl.load(x + t * s_x + i, mask=keep, other=0.0)
        up = tl.load(x + t * s_x + inner + i, mask=keep, other=0.0)
        a = gate.to(tl.float32)
        silu = tl.math.div_rn(a, 1.0 + libdevice.exp(-a)).to(gate.dtype)  # F.silu: x / (1 + expf(-x))
        tl.store(out + t * s_out + i, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=keep)
