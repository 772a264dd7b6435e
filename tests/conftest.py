"""Shared fixtures; the model classes and helpers are in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch

from helpers import MLP, make_data


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only spin and wait, worse on a busy machine).

    Used by the modules of small-model tests through ``pytestmark``; restores the thread count afterwards so
    tests of real workloads (the CLI demo) keep their threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """50 items (not a multiple of the usual batch sizes 8 and 16)."""
    return make_data(50)


@pytest.fixture
def model() -> MLP:
    return MLP(seed=0)
