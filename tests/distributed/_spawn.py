"""
Stand-in for ``tests/distributed/helpers.py`` (branch wt-dp) until it is merged, with the same signature: run
``fn(rank, *args)`` in ``world_size`` fresh processes inside a gloo process group on this machine.
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, fn: Callable[..., Any], args: tuple
) -> None:
    th.set_num_threads(int(os.environ.get("SB3_TRPO_KFAC_TORCH_THREADS", "1")))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        th.save(fn(rank, *args), Path(out_dir) / f"{rank}.pt")  # a file: a large result would block a pipe
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 120.0) -> list[Any]:
    """
    :param fn: a module-level function ``fn(rank, *args)`` (its arguments and result picklable)
    :return: its results on every rank, in rank order; an exception on a rank is raised here (spawn's join ends the
        other ranks, which would otherwise wait in a collective)
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main, args=(world_size, _free_port(), out_dir, timeout_s, fn, args), nprocs=world_size,
            join=True, start_method="spawn",
        )  # fmt: skip
        return [th.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world_size)]
