"""One intra-op thread for the single-process references of these tests.

The forked ranks also use one thread each (see dist_harness), so two ranks and a reference never
compete for the cores, and the reference runs the same kernels as the ranks.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
