"""Token LMs for W1/W2/W4, and a recorder of the LM calls a run makes.

``make_lm(model, backend)``:

* ``smollm2``: the default SmolLM2-135M via ``genlm_bytes_potential.models.load_lm``
  (``backend="hf"``). While our HF backend is not importable, falls back to genlm-backend's
  ``AsyncTransformer`` on the same weights (``timeout=0``: a batch is whatever one event-
  loop pass queued).
* ``tiny``: a random-init 2-layer Llama (hidden 64) with SmolLM2's tokenizer: real shapes
  and vocabulary, near-free forward passes. Smoke runs only (near-flat distributions).
* ``mock``: ``MockTokenLM`` (no weights; the LM costs ~nothing), over SmolLM2's vocabulary
  or, with ``vocab="tiny"``, a 275-token synthetic one. Isolates beam/potential overhead.

Ours and the anchor always share one LM object; ``reset(lm)`` empties its caches between
runs so neither side profits from the other's cached forward passes.
"""

from __future__ import annotations

import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.common import DATA_DIR  # noqa: F401  (sets HF offline env)

MODELS = ("smollm2", "tiny", "mock")


class RecordingLM:
    """Proxy to an ``AsyncLM`` that records every call: ``calls`` is a list of
    ``(kind, contexts, seconds)``, kind ``"batch"`` or ``"single"``. Everything else is
    delegated. Gives a ``tokenizer`` shim (``bos_token_id``/``eos_token_id``) to LMs that
    have none (the mock), because genlm-bytes reads ``lm.tokenizer.bos_token_id``."""

    def __init__(self, lm, tokenizer=None):
        self._lm = lm
        self.calls: list[tuple[str, list[tuple[int, ...]], float]] = []
        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif getattr(lm, "tokenizer", None) is None:
            self.tokenizer = SimpleNamespace(
                bos_token_id=getattr(lm, "bos_token_id", None),
                eos_token_id=getattr(lm, "eos_token_id", None),
            )
        else:
            self.tokenizer = lm.tokenizer

    def __getattr__(self, name):
        return getattr(self._lm, name)

    @property
    def inner(self):
        return self._lm

    async def batch_next_token_logprobs(self, token_ids_list, lora_name=None):
        t0 = time.perf_counter()
        out = await self._lm.batch_next_token_logprobs(token_ids_list)
        dt = time.perf_counter() - t0
        self.calls.append(("batch", [c if isinstance(c, tuple) else tuple(c) for c in token_ids_list], dt))
        return out

    async def next_token_logprobs(self, token_ids, lora_name=None):
        t0 = time.perf_counter()
        out = await self._lm.next_token_logprobs(token_ids)
        self.calls.append(("single", [tuple(token_ids)], time.perf_counter() - t0))
        return out

    def batch_next_token_logprobs_sync(self, token_ids_list, lora_name=None):
        return self._lm.batch_next_token_logprobs_sync(token_ids_list)

    def next_token_logprobs_sync(self, token_ids, lora_name=None):
        return self._lm.next_token_logprobs_sync(token_ids)

    def summary(self) -> dict:
        batch = [c for c in self.calls if c[0] == "batch"]
        single = [c for c in self.calls if c[0] == "single"]
        ctxs = sum(len(c[1]) for c in self.calls)
        return {
            "batch_calls": len(batch),
            "single_calls": len(single),
            "contexts": ctxs,
            "lm_seconds_inside_calls": sum(c[2] for c in self.calls),
            "mean_batch": (sum(len(c[1]) for c in batch) / len(batch)) if batch else 0.0,
        }

    def clear(self):
        self.calls.clear()


def reset(lm) -> None:
    """Empty the LM's output/KV caches (and the recorder)."""
    inner = lm.inner if isinstance(lm, RecordingLM) else lm
    for name in ("clear_cache",):
        fn = getattr(inner, name, None)
        if callable(fn):
            fn()
    if isinstance(lm, RecordingLM):
        lm.clear()


def _smollm2_dir():
    from genlm_bytes_potential.models import default_model_dir

    return default_model_dir()


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from genlm_bytes_potential.models import fix_byte_level_decoder

    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    fix_byte_level_decoder(tok)
    return tok


def _tiny_model_dir() -> str:
    """A random-init tiny Llama with SmolLM2's tokenizer, saved once per process."""
    path = os.path.join(tempfile.gettempdir(), "genlm-bytes-potential-bench-tiny-v1")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a less flat (but still random) next-token distribution
        model.lm_head.weight.mul_(40.0)
    tmp = tempfile.mkdtemp(prefix="tiny-", dir=tempfile.gettempdir())
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        pass
    return path


def _genlm_backend_hf(path):
    from genlm.backend.llm.hf import AsyncTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.models import fix_byte_level_decoder

    tok = AutoTokenizer.from_pretrained(path)
    fix_byte_level_decoder(tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AsyncTransformer(model, tok, batch_size=256, timeout=0.0)


def _load_hf(path, backend="hf", **opts) -> tuple[object, str]:
    """Our HF backend (``backend``: ``"hf"`` or ``"paged"``; ``opts``: ``device``,
    ``dtype``) if importable, else genlm-backend's AsyncTransformer."""
    try:
        import genlm_bytes_potential.backends.hf  # noqa: F401
        from genlm_bytes_potential.models import load_lm

        lm = load_lm(str(path), backend=backend, **opts)
        return (
            lm,
            f"{backend} (genlm_bytes_potential {type(lm).__name__}{', ' if opts else ''}"
            f"{', '.join(f'{k}={v}' for k, v in opts.items())})",
        )
    except ImportError as e:
        return _genlm_backend_hf(path), f"hf (genlm-backend AsyncTransformer; ours absent: {e.name})"


def make_lm(
    model: str = "smollm2",
    *,
    vocab: str = "model",
    seed: int = 0,
    temperature: float = 0.5,
    backend: str = "hf",
    **opts,
) -> tuple[RecordingLM, dict]:
    """``(RecordingLM, info)``; info has ``model``, ``backend``, ``eos`` (byte strings).
    ``backend`` (``"hf"``/``"paged"``) and ``opts`` (``device``, ``dtype``) apply to the
    real models."""
    if model == "smollm2":
        lm, backend = _load_hf(_smollm2_dir(), backend, **opts)
        name = "SmolLM2-135M-Instruct (Q4_1 weights as fp32)"
    elif model == "tiny":
        lm, backend = _load_hf(_tiny_model_dir(), backend, **opts)
        name = "tiny random-init Llama (2 layers, d=64) + SmolLM2 tokenizer"
    elif model == "mock":
        from genlm_bytes_potential.backends.mock import MockTokenLM

        if vocab == "tiny":
            from benchmarks.vocabs import tiny_vocab

            v, eos = tiny_vocab()
            lm = MockTokenLM(v, seed=seed, temperature=temperature, bos_token_id=len(v) - 1, eos_token_id=len(v) - 1)
            name = f"MockTokenLM over a {len(v)}-token synthetic vocabulary"
            tok = None
        else:
            tok = _smollm2_tokenizer()
            from genlm.backend.tokenization import decode_vocab

            bv, _ = decode_vocab(tok)
            lm = MockTokenLM(
                [bytes(t) for t in bv],
                seed=seed,
                temperature=temperature,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            name = "MockTokenLM over SmolLM2's vocabulary (49,152)"
        backend = f"mock (temperature {temperature})"
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    # The mock over SmolLM2's vocabulary keeps the real tokenizer (the anchor reads its
    # bos_token_id; the token-level baseline encodes its prompt with it).
    rec = RecordingLM(lm, tokenizer=tok if model == "mock" else None)
    eos_id = getattr(lm, "eos_token_id", None)
    if eos_id is None and getattr(lm, "tokenizer", None) is not None:
        eos_id = lm.tokenizer.eos_token_id
    eos = [bytes(lm.byte_vocab[eos_id])] if eos_id is not None else []
    return rec, {"model": name, "backend": backend, "eos": eos}


def heldout_text(n_bytes: int | None = None) -> bytes:
    data = (DATA_DIR / "heldout.txt").read_bytes()
    if n_bytes is None or n_bytes >= len(data):
        return data
    # Cut at a character boundary.
    cut = n_bytes
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


__all__ = ["RecordingLM", "make_lm", "reset", "heldout_text", "MODELS", "np"]
