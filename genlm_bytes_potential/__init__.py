"""Exact, batched byte-level language models from token-level LMs, as genlm-control Potentials."""

from .beam import Beam, BeamParams, BeamStats
from .lm_state import LMState, TokenModel
from .potential import ByteBeamPotential
from .trie import EOS, EOT, TokenByteTrie

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
]
