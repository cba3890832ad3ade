import pytest
import torch as th


@pytest.fixture(autouse=True)
def _single_thread():
    # CI has 2 cores and runs two pytest workers: one torch thread each avoids oversubscription.
    th.set_num_threads(1)
    yield
