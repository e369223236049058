"""Exact, batched byte-level language models from token-level LMs, as genlm-control Potentials."""

from .beam import Beam, BeamParams, BeamStats
from .lm_state import LMState, TokenModel
from .potential import ByteBeamPotential
from .tokens import as_byte_tokens
from .trie import EOS, EOT, TokenByteTrie

__version__ = "0.1.0"

__all__ = [
    "Beam",
    "BeamParams",
    "BeamStats",
    "ByteBeamPotential",
    "EOS",
    "EOT",
    "LMState",
    "TokenByteTrie",
    "TokenModel",
    "__version__",
    "as_byte_tokens",
]
