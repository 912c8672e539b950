from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run these small-shape tests on one intra-op thread.

    On a loaded machine, a second OpenMP thread turns every tiny op into a wait for a core that
    another process holds, which made single tests take seconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
