"""Host cost of the potential with a near-free LM (mock, small vocabulary), ours vs ByteLLM.

    python -m benchmarks.host_cost                 # all parts, prints JSON
    python -m benchmarks.host_cost --parts smc     # one part

Parts (the LM costs ~nothing, so every number is our own Python/numpy work):

* ``smc``: a 32-particle SMC-like loop (sample a byte per particle from ``batch_logw_next``,
  resample every 8 steps): microseconds per particle-byte inside ``batch_logw_next``: wall, CPU
  time of this process, the mock LM's share, ours (wall less the LM's share), and the share
  of the garbage collector's collections (part of ours).
* ``score``: scoring a 300-byte text through ``prefix`` (one byte at a time, as genlm-control's
  samplers ask), ours vs genlm-control's ``ByteLLM`` on the same mock, K = 1, 2, 4, 8: bytes/s,
  and each side's own microseconds a byte (wall less the mock's time inside its calls; the
  mock's rows cost tens of microseconds each, so the ratio of bytes/s is bounded by the
  mock's share).

Run it against two checkouts (``PYTHONPATH=<checkout>``) in one command to compare before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import warnings
from types import SimpleNamespace

import numpy as np

from benchmarks.common import DATA_DIR


def _mock():
    from genlm_bytes_potential.backends import MockTokenLM

    rng = np.random.default_rng(0)
    letters = b"abcdefghijklmnopqrstuvwxyz ,.\n"
    words = sorted({bytes(rng.choice(list(letters), rng.integers(2, 6)).astype(np.uint8)) for _ in range(400)})
    vocab = sorted({bytes([c]) for c in range(256)} | set(words)) + [b"<|eos|>"]
    return MockTokenLM(vocab, seed=0, temperature=0.8, eos_token_id=len(vocab) - 1)


class _CollectorClock:
    """Seconds spent in the garbage collector's collections while ``on``."""

    def __init__(self):
        self.seconds, self.on, self._start = 0.0, False, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self.on:
            self.seconds += time.perf_counter() - self._start

    def close(self):
        gc.callbacks.remove(self)


async def smc_part(steps: int = 64, n: int = 32, K: int = 4) -> dict:
    """The SMC-like loop; the first 8 steps warm up (numba compilation, first rows). The
    mock's own time (inside ``batch_next_token_logprobs``) is reported apart."""
    from benchmarks.lms import RecordingLM
    from genlm_bytes_potential import ByteBeamPotential

    lm = RecordingLM(_mock())
    pot = ByteBeamPotential(lm, K=K)
    rng = np.random.default_rng(0)
    ctxs = [b""] * n
    spent = cpu = 0.0
    collections = _CollectorClock()
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        collections.on = step >= 8
        w = (await pot.batch_logw_next([list(c) for c in ctxs])).weights[:, :256]
        collections.on = False
        if step >= 8:
            spent += time.perf_counter() - t0
            cpu += time.process_time() - c0
        else:
            lm.clear()
        p = np.exp(w - w.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        nxt = (p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1).clip(0, 255)
        ctxs = [c + bytes([b]) for c, b in zip(ctxs, nxt)]
        if step % 8 == 7:
            ctxs = [ctxs[i] for i in rng.integers(0, n, n)]
    collections.close()
    timed = n * (steps - 8)
    in_lm = lm.summary()["lm_seconds_inside_calls"]
    return {
        "particles": n,
        "steps": steps,
        "K": K,
        "us_per_particle_byte": 1e6 * spent / timed,
        "cpu_us_per_particle_byte": 1e6 * cpu / timed,
        "lm_us_per_particle_byte": 1e6 * in_lm / timed,
        "ours_us_per_particle_byte": 1e6 * (spent - in_lm) / timed,
        "collector_us_per_particle_byte": 1e6 * collections.seconds / timed,
    }


async def _score(pot, data: bytes, lm=None) -> tuple[float, float]:
    """Bytes/s scoring ``data`` one prefix at a time, and microseconds a byte outside the
    calls of ``lm`` (a ``RecordingLM``; all of it without one)."""
    t0 = time.perf_counter()
    for i in range(1, len(data) + 1):
        await pot.prefix(list(data[:i]) if isinstance(pot.vocab[0], int) else [bytes([b]) for b in data[:i]])
    wall = time.perf_counter() - t0
    in_lm = lm.summary()["lm_seconds_inside_calls"] if lm is not None else 0.0
    return len(data) / wall, 1e6 * (wall - in_lm) / len(data)


async def score_part(nbytes: int = 300, Ks=(1, 2, 4, 8)) -> list[dict]:
    from genlm.bytes import BeamParams
    from genlm.control import ByteLLM

    from benchmarks.lms import RecordingLM
    from genlm_bytes_potential import ByteBeamPotential

    data = (DATA_DIR / "heldout.txt").read_bytes()[:nbytes].lower()
    await _score(ByteBeamPotential(_mock(), K=1), data[:16])  # warm-up: numba's cache, the trie
    with warnings.catch_warnings():  # and genlm-bytes' first trie (torch's sparse kernels)
        warnings.simplefilter("ignore")
        mock = _mock()
        lm = RecordingLM(mock, SimpleNamespace(bos_token_id=mock.eos_token_id, eos_token_id=mock.eos_token_id))
        await _score(ByteLLM(lm, BeamParams(K=1, eos_tokens=[b"<|eos|>"])), data[:16])
    out = []
    for K in Ks:
        ours_lm = RecordingLM(_mock())
        ours, ours_own = await _score(ByteBeamPotential(ours_lm, K=K), data, ours_lm)
        mock = _mock()  # ByteLLM starts from the tokenizer's BOS: the EOS, as ours does without BOS
        lm = RecordingLM(mock, SimpleNamespace(bos_token_id=mock.eos_token_id, eos_token_id=mock.eos_token_id))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            anchor_pot = ByteLLM(lm, BeamParams(K=K, eos_tokens=[b"<|eos|>"]))
        anchor, anchor_own = await _score(anchor_pot, data, lm)
        out.append(
            {
                "K": K,
                "ours_bytes_per_s": ours,
                "bytelm_bytes_per_s": anchor,
                "ratio": ours / anchor,
                "ours_own_us_per_byte": ours_own,
                "bytelm_own_us_per_byte": anchor_own,
                "own_ratio": anchor_own / ours_own,
                "ours_contexts": ours_lm.summary()["contexts"],
                "bytelm_contexts": lm.summary()["contexts"],
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="*", default=["smc", "score"], choices=["smc", "score"])
    args = p.parse_args()
    res = {}
    if "smc" in args.parts:
        res["smc"] = asyncio.run(smc_part())
    if "score" in args.parts:
        res["score"] = asyncio.run(score_part())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
