"""``threads.for_gpu_inference``: torch on one CPU thread once an LM runs on a GPU, once per
process, unless ``OMP_NUM_THREADS`` says otherwise."""

import pytest
import torch

from genlm_bytes_potential import threads


@pytest.fixture
def fresh_process(monkeypatch):
    """A process that has not set its threads yet; torch's thread count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_done", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_gpu_inference_sets_one_thread_once(fresh_process):
    threads.for_gpu_inference()
    assert torch.get_num_threads() == threads.GPU_INFERENCE_THREADS == 1
    torch.set_num_threads(2)  # the user's later choice stands
    threads.for_gpu_inference()
    assert torch.get_num_threads() == 2


def test_omp_num_threads_in_the_environment_is_kept(fresh_process, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads.for_gpu_inference()
    assert torch.get_num_threads() == 2
