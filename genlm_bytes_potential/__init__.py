"""Exact, batched byte-level language models from token-level LMs, as genlm-control Potentials."""

import importlib

# Imported on first use (PEP 562), so that `python -m genlm_bytes_potential --help` does not
# import torch and genlm-control.
_LAZY = {
    "Beam": ".beam",
    "BeamParams": ".beam",
    "BeamStats": ".beam",
    "ByteBeamPotential": ".potential",
    "EOS": ".trie",
    "EOT": ".trie",
    "LMState": ".lm_state",
    "TokenByteTrie": ".trie",
    "TokenModel": ".lm_state",
    "as_byte_tokens": ".tokens",
}

__version__ = "0.1.0"

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
