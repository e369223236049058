"""``threads.for_gpu_inference``: torch on one CPU thread once an LM runs on a GPU, once per
process, unless ``OMP_NUM_THREADS`` says otherwise. torch's thread calls are replaced by a
stand-in pool here: the real pool is the test process's (and vLLM's CPU worker, run by other
tests in this process, makes ``torch.set_num_threads`` a no-op)."""

import pytest
import torch

from genlm_bytes_potential import threads


@pytest.fixture
def pool(monkeypatch):
    """A process that has not set its threads yet, with a pool of 16 threads."""
    pool = {"threads": 16}
    monkeypatch.setattr(threads, "_done", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: pool["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pool.update(threads=n))
    return pool


def test_gpu_inference_sets_one_thread_once(pool):
    threads.for_gpu_inference()
    assert pool["threads"] == threads.GPU_INFERENCE_THREADS == 1
    pool["threads"] = 4  # the user's later choice stands
    threads.for_gpu_inference()
    assert pool["threads"] == 4


def test_omp_num_threads_in_the_environment_is_kept(pool, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    threads.for_gpu_inference()
    assert pool["threads"] == 16
