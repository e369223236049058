"""The default SmolLM2 model folder and load_lm."""

import gc
import json
import time

import pytest
import tokenizers
from genlm.backend.tokenization import decode_vocab

from genlm_bytes_potential import collector, models
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.backends.hf import HFTokenLM
from genlm_bytes_potential.models import default_model_dir, load_lm

TEXTS = [
    "The quick brown fox jumps over the lazy dog.  Two spaces, then a tab:\tand\nnew lines\n\n",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "Héllo wörld — naïve café, 日本語のテキスト, Привет, emoji 🎉👩‍💻",
    " leading space and trailing space ",
]


def test_default_model_dir_is_cached(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "tokenizer.json").is_file()
    marker = json.loads((smollm2_dir / models._MARKER).read_text())
    assert marker["format"] == models._FORMAT
    t = time.perf_counter()
    assert default_model_dir() == smollm2_dir
    assert time.perf_counter() - t < 1.0
    assert not [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]


def test_default_model_keeps_the_gguf_special_tokens(smollm2_dir, tmp_path, monkeypatch):
    """The converted folder's BOS/EOS/pad are the GGUF's (SmolLM2-Instruct ends with
    <|im_end|>), also when the loader of a transformers version names another EOS: the
    byte beam's EOS, hence every ``complete``, depends on it."""
    import transformers

    gguf = models._gguf_path()
    want = models.gguf_special_token_ids(gguf)
    assert want == {"bos_token": 1, "eos_token": 2, "pad_token": 2}
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (1, 2, "<|im_end|>")
    load = transformers.AutoTokenizer.from_pretrained

    def other_eos(*args, **kwargs):  # a loader that takes <|endoftext|> for EOS
        t = load(*args, **kwargs)
        t.eos_token = "<|endoftext|>"
        return t

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", other_eos)
    models._convert(gguf, tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (tok.eos_token, tok.eos_token_id, config["eos_token_id"], config["bos_token_id"]) == ("<|im_end|>", 2, 2, 1)


def test_byte_vocab_rebuilds_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert isinstance(tok.backend_tokenizer.decoder, tokenizers.decoders.ByteLevel)
    byte_vocab, _ = decode_vocab(tok)
    assert len(byte_vocab) == len(tok) == 49152
    assert byte_vocab[tok.encode(" the", add_special_tokens=False)[0]] == b" the"
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(byte_vocab[t] for t in ids) == text.encode("utf-8"), text


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """Conversion writes a temporary folder and renames it; partial folders are replaced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_convert(gguf, dest):
        calls.append(dest)
        assert ".tmp-" in dest.name  # never written in place
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    root = tmp_path / "genlm-bytes-potential"
    dest = root / f"{models.DEFAULT_MODEL_NAME}-Q4_1-f32-v{models._FORMAT}"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("partial")  # a crashed earlier run: no marker
    assert default_model_dir() == dest
    assert len(calls) == 1 and (dest / models._MARKER).is_file()
    assert (dest / "config.json").read_text() == "{}"
    assert default_model_dir() == dest and len(calls) == 1  # cached now
    assert [p.name for p in root.iterdir()] == [dest.name]

    def failing_convert(gguf, dest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert", failing_convert)
    (dest / models._MARKER).unlink()
    with pytest.raises(RuntimeError, match="disk full"):
        default_model_dir()
    assert [p.name for p in root.iterdir()] == [dest.name]  # no temporary left behind


def test_load_lm_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; expected one of auto, vllm, paged, hf, mock"):
        load_lm(backend="gpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lm(str(tmp_path / "missing"), backend="hf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lm("./no/such/model", backend="hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_lm(str(tmp_path / "empty"), backend="hf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_lm(str(tmp_path / "weights.bin"), backend="hf")
    with pytest.raises(TypeError, match="model must be"):
        load_lm(42, backend="hf")
    with pytest.raises(FileNotFoundError, match="not found in the Hugging Face cache"):
        load_lm("nobody/no-such-model-xyz", backend="mock")


def test_load_lm_mock(smollm2_dir):
    lm = load_lm(backend="mock", seed=3)
    assert isinstance(lm, MockTokenLM)
    assert lm.vocab_size == 49152 and lm.seed == 3
    assert lm.eos_token_id is not None and bytes(lm.byte_vocab[lm.eos_token_id]) == b"<|im_end|>"


def test_load_lm_sets_the_collector(smollm2_dir, restore_collector):
    frozen = gc.get_freeze_count()
    lm = load_lm(backend="mock")
    assert gc.get_freeze_count() > frozen
    assert gc.get_threshold()[0] >= collector.YOUNG_THRESHOLD
    assert collector._calls_until_settled == collector.SETTLE_AFTER  # frozen again after the first calls
    tracked = gc.get_objects()  # the generations a collection walks (not the frozen one)
    assert not any(o is lm for o in tracked) and not any(o is lm.byte_vocab for o in tracked)


def test_load_lm_hf_default(smollm2_dir):
    t = time.perf_counter()
    lm = load_lm(backend="hf")
    elapsed = time.perf_counter() - t
    assert isinstance(lm, HFTokenLM) and lm.vocab_size == 49152
    assert elapsed < 15  # the converted folder loads fast (about 1-2 s here)
    ids = lm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    logprobs = lm.next_token_logprobs_sync(ids)
    assert bytes(lm.byte_vocab[int(logprobs.argmax())]) == b" Paris"


def test_load_lm_tiny_folder(tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir), backend="hf", cache_bytes=1 << 20)
    assert isinstance(lm, HFTokenLM) and lm.cache_bytes == 1 << 20


def test_models_load_on_the_gpu_when_there_is_one(monkeypatch, tiny_llama_dir):
    """The paged and HF backends load on CUDA when torch sees a GPU (a CLI or ``from_name``
    user with one gets it), on the CPU otherwise; a ``device`` given wins."""
    import torch

    asked = []
    monkeypatch.setattr(HFTokenLM, "from_name", classmethod(lambda cls, name, **opts: asked.append(opts) or "lm"))
    for gpu, opts, want in ((False, {}, None), (True, {}, "cuda"), (True, {"device": "cpu"}, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        for backend in ("paged", "hf"):  # (PagedTokenLM.from_name is HFTokenLM's)
            assert load_lm(str(tiny_llama_dir), backend=backend, kv_cache_bytes=1 << 20, **opts) == "lm"
            assert asked.pop() == {"device": want, "kv_cache_bytes": 1 << 20}


def test_auto_backend(monkeypatch, tiny_llama_dir, model_dir, tmp_path):
    """The measured rule, on a GPU as on a CPU: paged for the (unquantized) model types it
    runs, even with vLLM installed; else vLLM when installed; else HF. Engine options pass
    through."""
    import genlm_bytes_potential.backends.vllm as vllm_backend
    from genlm_bytes_potential.backends.paged import PagedTokenLM

    made = []

    class FakeVLLM:
        def __init__(self, model, **opts):
            made.append((model, opts))

    monkeypatch.setattr(vllm_backend, "VLLMTokenLM", FakeVLLM)
    monkeypatch.setattr(models, "_vllm_available", lambda: True)
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(
        '{"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}'
    )
    assert models._auto_backend(str(tiny_llama_dir)) == "paged"
    for folder in (model_dir, str(quantized)):  # GPT-2; quantized weights
        assert models._auto_backend(folder) == "vllm"
    lm = load_lm(str(quantized), gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert isinstance(lm, FakeVLLM)
    assert made == [(str(quantized), {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 2})]
    assert isinstance(load_lm(str(tiny_llama_dir)), PagedTokenLM)
    monkeypatch.setattr(models, "_vllm_available", lambda: False)
    assert models._auto_backend(model_dir) == "hf"
