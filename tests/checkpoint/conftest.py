"""Shared set-up of the checkpoint tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and does not crawl when the machine is busy
    (OpenMP threads spinning on oversubscribed cores made these tests 7x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
