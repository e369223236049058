"""User-facing helpers over the byte beam: next-byte distributions, scoring, generation.

lm = ByteLM(token_lm, K=8)
(await lm.score(b"def f(x):\\n")).bits_per_byte
[s.logprob for s in await lm.batch_score([b"one text", b"and another"])]  # in lockstep
await lm.generate(b"Once upon a time", max_bytes=40)          # sampled
(await lm.next_byte(b"Hello, wor")).top(3)                    # {b'l': 0.97, ...}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .beam import Beam, BeamParams, BeamStats, advance, initial_beam, prefill
from .lm_state import DRAFT_WINDOW, TokenModel
from .trie import EOS


class ByteDist:
    """A next-byte distribution over bytes 0..255 and EOS: ``dist[b]`` is ``log q(b)``
    (``dist[EOS]`` with ``EOS = 257``); ``top(k)`` and ``str()`` decode lazily."""

    def __init__(self, logp: np.ndarray):
        if logp.shape != (257,):
            raise ValueError(f"logp has shape {logp.shape}; expected (257,): bytes 0..255, then EOS")
        self.logp = logp

    def __getitem__(self, b: int) -> float:
        if b == EOS:
            return float(self.logp[256])
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 255:
            raise ValueError(f"byte {b!r}; expected an int 0..255 or EOS (257)")
        return float(self.logp[b])

    def top(self, k: int = 10) -> dict[bytes | str, float]:
        """The ``k`` likeliest outcomes as ``{byte: probability}`` (EOS as ``"<EOS>"``)."""
        order = np.argsort(-self.logp, kind="stable")[:k]
        return {
            ("<EOS>" if i == 256 else bytes([i])): float(np.exp(self.logp[i]))
            for i in order
            if np.isfinite(self.logp[i])
        }

    def __str__(self) -> str:
        return "  ".join(
            f"{k!r}: {p:.4f}" if isinstance(k, str) else f"{k!r}"[1:] + f": {p:.4f}" for k, p in self.top(8).items()
        )

    __repr__ = __str__


@dataclass(frozen=True)
class Score:
    """Log-probability (nats) of ``n_bytes`` bytes, with bits per byte.

    ``stats`` are the final beam's (the prompt's steps included); ``impossible_at`` is the
    position of the first byte of probability 0 (``logprob`` is then ``-inf`` and scoring
    stopped there), else None."""

    logprob: float
    n_bytes: int
    heals: int = 0
    stats: BeamStats = field(default_factory=BeamStats)
    impossible_at: int | None = None

    @property
    def bits_per_byte(self) -> float:
        return -self.logprob / math.log(2) / self.n_bytes if self.n_bytes else 0.0


class ByteLM:
    """A token LM read as a byte LM through the beam.

    Args:
        lm: an ``AsyncLM``-like token model.
        K, prune_threshold, heal, heal_max_backoff, heal_max_splits: see ``BeamParams``.
        eos_tokens: byte strings that end a sequence (default: the LM's EOS token).
        max_context_length: the LM sees at most this many trailing tokens.
        canonical: commit only canonical tokenizations (see ``TokenModel``).
        device: where trie masses are computed (see ``TokenModel``).
        lookahead: bytes read ahead when they are known (``score``, prompts) to prefetch
            LM calls into the LM's cache (see ``TokenModel``; 0: off).
        draft_window: bytes a draft of the beam reads ahead to choose what to prefetch
            (see ``TokenModel``; 0: ranked guesses instead). Same values.
    """

    def __init__(
        self,
        lm,
        *,
        K: int | None = 8,
        prune_threshold: float = 0.0,
        heal: bool = True,
        heal_max_backoff: int | None = None,
        heal_max_splits: int | None = None,
        eos_tokens: Sequence[bytes] | None = None,
        max_context_length: int | None = None,
        canonical: bool = False,
        device: str | None = None,
        lookahead: int = 4,
        draft_window: int = DRAFT_WINDOW,
    ):
        self.params = BeamParams(
            K=K,
            prune_threshold=prune_threshold,
            heal=heal,
            heal_max_backoff=heal_max_backoff,
            heal_max_splits=heal_max_splits,
        )
        self.model = TokenModel(
            lm,
            eos_tokens,
            max_context_length,
            device=device,
            canonical=canonical,
            lookahead=lookahead,
            draft_window=draft_window,
        )

    async def beam(self, prompt: bytes = b"", prompt_tokens: Sequence[int] = ()) -> Beam:
        """The beam after ``prompt_tokens`` then ``prompt`` bytes (read as text)."""
        prompt = _as_bytes(prompt)
        beam = await initial_beam(self.model, self.params, prompt_tokens, with_eos=not prompt, ahead=prompt)
        return await prefill(beam, prompt) if prompt else beam

    async def next_byte(self, prompt: bytes = b"") -> ByteDist:
        return ByteDist((await self.beam(prompt)).next_logprobs())

    async def score(
        self, data: bytes | str, prompt: bytes = b"", on_byte: Callable[[int], object] | None = None
    ) -> Score:
        """Total log-probability of ``data`` after ``prompt`` (each byte's conditional;
        with healing, a byte the beam cannot read costs the healed estimate).
        ``on_byte(n)`` is called after each byte with the number of bytes read."""
        (score,) = await self.batch_score([data], prompt, on_byte)
        return score

    async def batch_score(
        self,
        texts: Sequence[bytes | str],
        prompt: bytes = b"",
        on_byte: Callable[[int], object] | None = None,
    ) -> list[Score]:
        """``score`` of each text after the same ``prompt``, the texts read in lockstep:
        step ``i`` advances the beams of every text with an ``i``-th byte in one
        :func:`advance` (one read and prune over all their candidates, one LM batch for all
        their extensions). Each text's beam is its own, so each score is what ``score``
        gives (with an LM whose values do not depend on how contexts are batched; a bf16
        forward pass rounds a context differently in another batch). A text whose byte has
        probability 0 stops there (``impossible_at``); the others go on. ``on_byte(n)`` is
        called after each step with the number of bytes read so far, all texts together."""
        texts = [_as_bytes(t) for t in texts]
        root = await self.beam(prompt)
        beams = [root] * len(texts)
        impossible: dict[int, int] = {}
        read = 0
        live = [j for j, t in enumerate(texts) if t]
        for i in range(max(map(len, texts), default=0)):
            live = [j for j in live if i < len(texts[j])]
            if not live:
                break
            stepped = await advance(
                [beams[j] for j in live],
                [texts[j][i] for j in live],
                ahead=[memoryview(texts[j])[i + 1 :] for j in live],
            )
            for j, beam in zip(live, stepped):
                beams[j] = beam
                if beam.logp == -math.inf:
                    impossible[j] = i
            read += len(live)
            live = [j for j in live if j not in impossible]
            if on_byte is not None:
                on_byte(read)
        return [
            Score(-math.inf, len(t), b.stats.heals, b.stats, impossible_at=impossible[j])
            if j in impossible
            else Score(b.logp - root.logp, len(t), b.stats.heals, b.stats)
            for j, (t, b) in enumerate(zip(texts, beams))
        ]

    async def generate(
        self,
        prompt: bytes | str = b"",
        max_bytes: int = 64,
        *,
        greedy: bool = False,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> bytes:
        """Sample (or take the likeliest) bytes one at a time after ``prompt``."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r}; expected an int >= 0")
        rng = np.random.default_rng(seed)
        beam = await self.beam(_as_bytes(prompt))
        out = bytearray()
        for _ in range(max_bytes):
            logp = beam.next_logprobs().copy()
            if not stop_at_eos:
                logp[256] = -np.inf
            if not np.isfinite(logp).any():
                break
            i = int(np.argmax(logp)) if greedy else int(rng.choice(257, p=np.exp(logp - np.logaddexp.reduce(logp))))
            if i == 256:
                break
            out.append(i)
            (beam,) = await advance([beam], [i])
        return bytes(out)


def _as_bytes(data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise TypeError(f"{data!r} has type {type(data).__name__}; expected bytes or str")
