"""Fixtures of the pipeline tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: a whole-model backward of a tiny model is hundreds of small kernels, and on a shared
    2-core machine two threads per kernel made the distillation tests 50× slower (16 s against 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
