"""Copies between host and GPU through page-locked memory, and CUDA graph capture.

A copy from pageable memory makes the host wait for the GPU's queue (host to device) or
goes through a staging buffer (device to host); page-locked buffers, taken from torch's
caching host allocator, let host-to-device copies run in the GPU's queue without the host
waiting, and device-to-host copies run at DMA speed. ``device_done`` waits for the GPU
without blocking the event loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; on CUDA queued behind the work already
    there, without the host waiting for it."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(x: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array (the host waits for the GPU's queue up to ``x``)."""
    if x.device.type != "cuda":
        return x.cpu().numpy()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x)
    return host.numpy()


async def device_done(device: torch.device) -> None:
    """Return once the work queued so far on ``device`` (its current CUDA stream) has
    run, letting the event loop run other tasks meanwhile (the grammar of a product,
    another batch of particles) instead of blocking in a copy; at once off CUDA."""
    if device.type != "cuda":
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    while not event.query():
        await asyncio.sleep(0)


def capture_graph(run, device: torch.device, pool, warmups: int = 1):
    """``run()`` captured as a CUDA graph allocating from memory pool ``pool``, after
    ``warmups`` runs on a side stream (lazy set-ups, such as cuBLAS or cuSPARSE workspaces
    and compiled kernels, happen there, not in the graph). Returns the graph and what the
    captured ``run()`` returned (static tensors that each replay rewrites)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out
