"""Host <-> device copies (``transfer``): values arrive intact whatever the dtype, shape
and size, including small copies queued behind a busy GPU, where every kept page-locked
buffer is still in flight and the copy takes a new one."""

import numpy as np
import pytest
import torch

from genlm_bytes_potential import transfer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARRAYS = [
    np.arange(7, dtype=np.int64),
    np.linspace(-3, 3, 12).reshape(3, 4),
    np.array([True, False, True]),
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.zeros(0, np.int64),
    np.arange(transfer._KEPT_BYTES // 8 + 5, dtype=np.int64),  # past the kept buffers' size
    np.arange(20, dtype=np.int64)[::3],  # not contiguous
]


@pytest.mark.parametrize("device", DEVICES)
def test_round_trips(device):
    for a in ARRAYS:
        t = transfer.to_device(a, torch.device(device))
        assert t.device.type == device and t.dtype == torch.from_numpy(np.ascontiguousarray(a)).dtype
        back = transfer.to_host(t)
        np.testing.assert_array_equal(back, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked buffers are used on CUDA only")
def test_small_copies_behind_a_busy_gpu_arrive_intact():
    dev = torch.device("cuda")
    torch.cuda._sleep(200_000_000)  # keeps the queue busy: the ring's copies stay in flight
    sent = [transfer.to_device(np.full(5, i, np.int64), dev) for i in range(3 * transfer._RING_SLOTS)]
    got = [transfer.to_host(t) for t in sent]
    assert all((g == i).all() for i, g in enumerate(got))
    held = transfer.to_host(sent[0])  # arrays handed out stay as they were after later copies
    transfer.to_host(sent[1])
    assert (held == 0).all()
