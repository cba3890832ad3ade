import time

import pytest
from torch.multiprocessing import ProcessRaisedException

from .helpers import run_ranks


def _fail_on_rank_one(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    # rank 0 outlives the timeout unless rank 1's failure ends the run (not a collective: rank 1's exit would make
    # rank 0's collective fail too, and either error could be reported first)
    time.sleep(60)


# (results in rank order: every test of tests/distributed relies on them, e.g. test_dp_trpo compares rank 0 and 1)
def test_run_ranks_raises_a_ranks_exception_with_its_traceback():
    with pytest.raises(ProcessRaisedException, match="rank one refuses"):
        run_ranks(_fail_on_rank_one, timeout_s=20.0)
