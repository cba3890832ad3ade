"""
``torchrun --nproc-per-node N -m sb3_trpo_kfac train ...``: rl-zoo3's ``train`` run data-parallel, one process per
rank (see :mod:`sb3_trpo_kfac.common.data_parallel` for what the algorithms do in a process group).

When torchrun's variables say there is more than one process, ``train`` joins the process group (gloo on CPU, nccl
when the model's device is a GPU) before rl-zoo3 builds the model, and leaves it at the end. Every rank runs the same
rl-zoo3 command, with these changes:

- all ranks use one seed (rank 0's random one when none is given); the model seeds rank r with ``seed + r``;
- ``-n`` (the budget), ``--eval-freq`` and ``--save-freq`` count the timesteps of all ranks, while ``--n-envs`` and
  the entry's ``n_envs`` / ``n_steps`` are per rank: one update uses N × n_envs × n_steps samples;
- rank 0 alone logs, evaluates and saves into the log folder; the other ranks run with ``--verbose 0``, no
  evaluation or checkpoints, and write what rl-zoo3 writes anyway (config, monitor files, their final model) into
  a temporary folder removed at the end.

Hyperparameter optimisation (``-optimize``) is not data-parallel: run several tuning workers on one ``--storage``
instead.
"""

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch as th
from torch import distributed as dist

from sb3_trpo_kfac.common import distributed


def launched_with_several_processes() -> bool:
    """Whether torchrun (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peek(args: Sequence[str]) -> argparse.Namespace:
    # rl-zoo3's names and defaults of the options read here
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-optimize", "--optimize-hyperparameters", dest="optimize", action="store_true")
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--eval-freq", type=int, default=25000)
    parser.add_argument("--save-freq", type=int, default=-1)
    parser.add_argument("--device", default="auto")
    known, _ = parser.parse_known_args(list(args))
    return known


@contextlib.contextmanager
def process_group(args: Sequence[str]) -> Iterator[None]:
    """
    The default process group of torchrun's processes, for the duration of the block.

    :param args: the rl-zoo3 ``train`` arguments (their ``--device`` chooses nccl or gloo)
    """
    use_gpu = _peek(args).device != "cpu" and th.cuda.is_available()
    if use_gpu:
        th.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_gpu else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shared_seed(seed: int, device: th.device) -> int:
    # as rl-zoo3 draws a seed when none is given, but once, on rank 0
    if seed < 0:
        seed = int(np.random.randint(2**32 - 1, dtype="int64"))
    value = th.tensor([seed], dtype=th.int64, device=device)
    distributed.broadcast_([value])
    return int(value.item())


def rank_arguments(prog: str, args: Sequence[str], scratch_folder: str) -> list[str]:
    """
    This rank's rl-zoo3 ``train`` arguments (inside the process group; see the module docstring).

    :param prog: the program name, for the message when refused
    :param args: the arguments every rank was given
    :param scratch_folder: where a rank other than 0 writes what rl-zoo3 writes
    :return: the arguments to hand to rl-zoo3 (argparse keeps the last value of an option given twice)
    """
    known = _peek(args)
    if known.optimize:
        raise SystemExit(
            f"{prog}: train -optimize is not data-parallel: start several tuning workers (each a plain `train "
            "-optimize`) on one --storage instead of torchrun"
        )
    device = th.device("cuda") if dist.get_backend() == "nccl" else th.device("cpu")
    seed = _shared_seed(known.seed, device)
    world_size = distributed.world_size()
    args = [*args, "--seed", str(seed)]
    if distributed.rank() == 0:
        # rl-zoo3 counts these in this process's steps; the run counts all ranks' steps
        for option, value in (("--eval-freq", known.eval_freq), ("--save-freq", known.save_freq)):
            if value > 0:
                args += [option, str(max(value // world_size, 1))]
        return args
    return [*args, "--log-folder", scratch_folder, "--eval-freq", "-1", "--save-freq", "-1", "--verbose", "0"]


@contextlib.contextmanager
def data_parallel_train(prog: str, args: Sequence[str]) -> Iterator[list[str]]:
    """
    Inside a process group when torchrun started several processes, yield this rank's ``train`` arguments;
    otherwise yield ``args`` unchanged.
    """
    if not launched_with_several_processes():
        yield list(args)
        return
    with process_group(args), tempfile.TemporaryDirectory(prefix="sb3_trpo_kfac_rank_") as scratch:
        yield rank_arguments(prog, args, scratch)
