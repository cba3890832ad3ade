import pytest
import torch as th
from torch import distributed as dist
from torch.multiprocessing import ProcessRaisedException

from .helpers import run_ranks


def _sum_of_ranks(rank: int, offset: float) -> tuple[int, int, float]:
    value = th.tensor([rank + offset])
    dist.all_reduce(value)
    return rank, dist.get_world_size(), float(value)


def _fail_on_rank_one(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 would wait here forever if the failure did not end the run


def test_run_ranks_returns_results_in_rank_order():
    assert run_ranks(_sum_of_ranks, 10.0) == [(0, 2, 21.0), (1, 2, 21.0)]


def test_run_ranks_raises_a_ranks_exception_with_its_traceback():
    with pytest.raises(ProcessRaisedException, match="rank one refuses"):
        run_ranks(_fail_on_rank_one, timeout_s=20.0)
