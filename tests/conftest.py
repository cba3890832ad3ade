import os

import pytest
import torch as th

# CI has 2 cores and runs two pytest workers: one torch thread each avoids oversubscription. The learning checks'
# margins are also measured with 2 threads (benchmarks/learning_test_margins.py sets this variable).
TORCH_THREADS = int(os.environ.get("SB3_TRPO_KFAC_TORCH_THREADS", "1"))


@pytest.fixture(autouse=True)
def _torch_threads():
    th.set_num_threads(TORCH_THREADS)
    yield
