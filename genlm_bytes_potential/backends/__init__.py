"""Token-level LM backends implementing genlm-backend's ``AsyncLM``.

What the byte beam needs from them is the :class:`TokenLM` protocol (``protocol.py``,
with its contract); every backend here conforms to it (``tests/test_backend_contract.py``).
``MockTokenLM`` is always available. The heavy backends are imported lazily:
``from genlm_bytes_potential.backends.hf import HFTokenLM``,
``from genlm_bytes_potential.backends.paged import PagedTokenLM`` and
``from genlm_bytes_potential.backends.vllm import VLLMTokenLM``.
"""

from genlm_bytes_potential.backends.mock import MockTokenLM
from genlm_bytes_potential.backends.protocol import CachingTokenLM, TokenLM

__all__ = ["TokenLM", "CachingTokenLM", "MockTokenLM", "HFTokenLM", "PagedTokenLM", "VLLMTokenLM"]


def __getattr__(name):
    if name == "HFTokenLM":
        from genlm_bytes_potential.backends.hf import HFTokenLM

        return HFTokenLM
    if name == "PagedTokenLM":
        from genlm_bytes_potential.backends.paged import PagedTokenLM

        return PagedTokenLM
    if name == "VLLMTokenLM":
        from genlm_bytes_potential.backends.vllm import VLLMTokenLM

        return VLLMTokenLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
