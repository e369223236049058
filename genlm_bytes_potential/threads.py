"""torch's CPU thread pool, set for inference whose LM runs on a GPU.

When the LM runs on a GPU, the CPU work of a sampling step is many small operations:
ours, genlm-control's (its batched draw is ``logsumexp`` and ``log`` over a ``[particles,
258]`` float64 array) and the grammar's. torch runs an operation over more than 32,768
elements on its OpenMP pool (by default one thread per core), whose threads then spin for
a while waiting for the next one, on the cores the step's own thread needs. On an H200
host (16 cores), a 128-particle regex SMC spent 6-8 ms a step in genlm-control's draw
against 1-2 ms with the threads sleeping at once (``OMP_WAIT_POLICY=PASSIVE``); and with
torch on one thread, alternating processes gave W2 (regex product, SmolLM2 bf16, paged)
1.26x at 32 particles (medians of 6 runs, 3,781 against 2,989 B/s) and 1.24x at 128
(5,742 against 4,638 B/s); the change itself, in a noisier lease, 1.10x and 1.05x (medians
of 12) (benchmarks/HISTORY.md, session 24). vLLM's engine sets its processes to one thread
for the same reason.

:func:`for_gpu_inference` sets torch to one CPU thread, once per process, unless
``OMP_NUM_THREADS`` is set (the user's choice is kept: set it to keep more threads).
:class:`~genlm_bytes_potential.lm_state.TokenModel` calls it when an LM call returns
log-probs on a GPU; CPU inference keeps every thread (its forward passes use them).
"""

from __future__ import annotations

import logging
import os

import torch

#: torch's CPU threads while the LM runs on a GPU
GPU_INFERENCE_THREADS = 1

_done = False


def for_gpu_inference() -> None:
    """Set torch to ``GPU_INFERENCE_THREADS`` CPU threads, once per process, unless the
    environment sets ``OMP_NUM_THREADS``."""
    global _done
    if _done:
        return
    _done = True
    if os.environ.get("OMP_NUM_THREADS"):
        return
    before = torch.get_num_threads()
    if before > GPU_INFERENCE_THREADS:
        torch.set_num_threads(GPU_INFERENCE_THREADS)
        logging.getLogger(__name__).info(
            "torch's CPU threads %d -> %d: the LM runs on a GPU (set OMP_NUM_THREADS to choose)",
            before,
            GPU_INFERENCE_THREADS,
        )
