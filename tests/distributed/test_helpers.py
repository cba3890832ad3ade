import pytest
from torch import distributed as dist
from torch.multiprocessing import ProcessRaisedException

from .helpers import run_ranks


def _fail_on_rank_one(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 would wait here forever if the failure did not end the run


# (results in rank order: every test of tests/distributed relies on them, e.g. test_dp_trpo compares rank 0 and 1)
def test_run_ranks_raises_a_ranks_exception_with_its_traceback():
    with pytest.raises(ProcessRaisedException, match="rank one refuses"):
        run_ranks(_fail_on_rank_one, timeout_s=20.0)
