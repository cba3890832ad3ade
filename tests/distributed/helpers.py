"""
Run a function on several gloo ranks on this machine, as the data-parallel tests need.

``run_ranks(fn, *args)`` spawns ``world_size`` fresh processes (``torch.multiprocessing``, spawn start method: no
forked OpenMP state), initialises the default gloo process group on a free localhost port in each, calls
``fn(rank, *args)`` and returns the ranks' results in rank order. ``fn`` must be a module-level function and its
arguments and result picklable. An exception on any rank is raised here with that rank's traceback, and the other
ranks are terminated (they would otherwise wait in a collective).
"""

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th
import torch.multiprocessing as mp
from torch import distributed as dist


def free_port() -> int:
    """A TCP port nobody listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, result_dir: str, timeout_s: float, fn: Callable[..., Any], args: tuple
) -> None:
    th.set_num_threads(int(os.environ.get("SB3_TRPO_KFAC_TORCH_THREADS", "1")))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, *args)
        # a file, not a queue: a large result in a pipe would block the child's exit until the parent reads it
        th.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 120.0) -> list[Any]:
    """
    ``[fn(0, *args), ..., fn(world_size - 1, *args)]``, each evaluated in its own process inside a gloo group.

    :param fn: a module-level function ``fn(rank, *args)``
    :param args: its further (picklable) arguments, the same on every rank
    :param world_size: the number of processes
    :param timeout_s: how long a collective may wait before gloo gives up (a hung rank fails the test, not CI)
    :return: the ranks' results, in rank order
    """
    with tempfile.TemporaryDirectory() as result_dir:
        # ProcessRaisedException carries the failing rank's traceback; join terminates the surviving ranks
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), result_dir, timeout_s, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [th.load(Path(result_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
