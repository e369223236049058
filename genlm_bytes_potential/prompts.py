"""Prompts as token ids: what a tokenizer returns, in any of its forms, and chat messages.

``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` returns, with
transformers 5, a ``BatchEncoding`` (``{"input_ids": [...], "attention_mask": [...]}``);
with ``return_dict=False`` a list of ints; with ``return_tensors="pt"``/``"np"`` a
``[1, n]`` tensor/array inside the ``BatchEncoding``; with ``tokenize=False`` the rendered
text. :func:`token_ids` reads all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

#: a chat: ``[{"role": "user", "content": "..."}, ...]``
Messages = Sequence[Mapping[str, Any]]


def is_messages(value) -> bool:
    """Whether ``value`` is a chat message list (dicts with a ``"role"``)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def token_ids(value, tokenizer=None, *, name: str = "prompt_tokens") -> list[int]:
    """Token ids from a sequence of ints, a ``BatchEncoding`` or dict with ``input_ids``,
    a tensor or array (1-D, or 2-D with one row), or a rendered chat template (``str``,
    encoded by ``tokenizer`` with its special tokens and no others added). Errors name
    ``name``, the value and what was expected."""
    if isinstance(value, Mapping):
        if "input_ids" not in value:
            raise ValueError(f"{name} is a {type(value).__name__} without 'input_ids' (keys: {list(value)[:5]})")
        value = value["input_ids"]
    if isinstance(value, str):
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError(
                f"{name} is a str ({value[:40]!r}); a rendered template needs the LM's tokenizer "
                f"(lm.tokenizer), and this LM has none: pass token ids, or the text as prompt"
            )
        return [int(t) for t in tokenizer.encode(value, add_special_tokens=False)]
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(
            f"{name} is {type(value).__name__} ({bytes(value[:40])!r}); expected token ids (pass bytes as prompt)"
        )
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch tensor, numpy array
        if value.ndim == 2 and value.shape[0] == 1:
            value = value[0]
        if value.ndim != 1:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected token ids of shape [n] or [1, n]")
        value = value.tolist()
    try:
        ids = list(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected token ids") from None
    if len(ids) == 1 and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = list(ids[0])
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise TypeError(f"{name} item {t!r} at position {i} has type {type(t).__name__}; expected an int token id")
    return [int(t) for t in ids]


def chat_token_ids(tokenizer, messages: Messages, **template_kwargs) -> list[int]:
    """``messages`` rendered by ``tokenizer``'s chat template, ready for the assistant's
    reply (``add_generation_prompt=True`` unless given)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a chat prompt (message list) needs the LM's tokenizer with a chat template; "
            f"this LM has {'no tokenizer' if tokenizer is None else 'a tokenizer without chat_template'}: "
            "pass prompt_tokens (token ids) or a text prompt"
        )
    template_kwargs.setdefault("add_generation_prompt", True)
    return token_ids(
        tokenizer.apply_chat_template(list(messages), **template_kwargs), tokenizer, name="chat template output"
    )
