"""Shared pytest fixtures."""

# ---------------------------------------------------------------------------
# Tiny token LMs for the backend tests (tests/test_backends_*.py, test_models.py).
# Self-contained: everything below is prefixed `tiny_` / `smollm2_` / `vllm_`.
# ---------------------------------------------------------------------------
import os as _os

# vLLM on CPU: a small KV cache, and the engine core in this process.
_os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
_os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util as _importlib_util  # noqa: E402

import pytest as _pytest  # noqa: E402

TINY_EXTRA_ROWS = 64  # the tiny model's embedding is padded past the tokenizer's vocabulary


def build_tiny_llama(path, tokenizer, vocab_rows, *, seed=0, std=0.5):
    """Save a seeded random-init fp32 Llama (hidden 64, 2 layers) with `tokenizer` to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # large weights: peaked, input-dependent distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@_pytest.fixture(scope="session")
def smollm2_dir():
    """The default model's HF folder (converted from the GGUF once per machine)."""
    from genlm_bytes_potential.models import default_model_dir

    return default_model_dir()


@_pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@_pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """Tiny Llama over SmolLM2's tokenizer, embedding padded by TINY_EXTRA_ROWS rows."""
    path = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_llama(path, smollm2_tokenizer, len(smollm2_tokenizer) + TINY_EXTRA_ROWS)


@_pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) of `tiny_llama_dir`, loaded with transformers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@_pytest.fixture(scope="session")
def vllm_tiny(tiny_llama_dir):
    """One VLLMTokenLM engine on the tiny model for the whole session (skipped without vLLM)."""
    if _importlib_util.find_spec("vllm") is None:
        _pytest.skip("vllm is not installed")
    from genlm_bytes_potential.backends.vllm import VLLMTokenLM

    lm = VLLMTokenLM(str(tiny_llama_dir), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    yield lm
    lm.close()


@_pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A model folder with GPT-2's real tokenizer, served by the mock backend."""
    import json

    from tiny_models import gpt2_tokenizer

    path = tmp_path_factory.mktemp("gpt2-tokenizer")
    gpt2_tokenizer().save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(path)


@_pytest.fixture
def restore_collector():
    """Python's collector thresholds and ``collector``'s pending freeze, put back after the test."""
    import gc

    from genlm_bytes_potential import collector

    thresholds, pending = gc.get_threshold(), collector._calls_until_settled
    yield
    gc.set_threshold(*thresholds)
    collector._calls_until_settled = pending
