"""
Does 2-rank data-parallel ACKTR learn CartPole-v1 with the shipped entry (zoo_hyperparams/acktr.yml) in the
single-process entry's budget? Two gloo processes on this machine, each with the entry's ``n_envs`` environments
(seeded ``seed + rank``) and half of the entry's ``n_timesteps`` (the budget is global), the policy broadcast from
rank 0 before training (as the data-parallel setup does). Rank 0 then evaluates the deterministic policy on 20
episodes of a fresh environment.

    python benchmarks/acktr_data_parallel_cartpole.py [--seeds 0 1] [--threads 1]

Printed per seed: the evaluation's mean return, and the global environment steps at which the mean of the last 10
training episodes of rank 0 first reached 475.
"""

import argparse
import datetime
import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch as th
import torch.multiprocessing as mp
from common import OURS, zoo_entry
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from torch import distributed as dist

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.common import distributed

THRESHOLD = 475.0


class StepsToThreshold(BaseCallback):
    """Global environment steps at which the mean of the last 10 training episodes first reached the threshold."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.reached: int | None = None

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        returns = [info["r"] for info in list(self.model.ep_info_buffer)[-10:]]
        if self.reached is None and len(returns) == 10 and np.mean(returns) >= THRESHOLD:
            self.reached = self.num_timesteps * self.world_size


def train(rank: int, seed: int) -> dict:
    entry = zoo_entry("acktr", "CartPole-v1", OURS)
    world_size = distributed.world_size()
    env = make_vec_env("CartPole-v1", n_envs=entry.n_envs, seed=seed + rank)
    model = ACKTR(entry.policy, env, seed=seed + rank, device="cpu", **entry.kwargs)
    distributed.broadcast_module_(model.policy)
    callback = StepsToThreshold(world_size)
    model.learn(int(entry.settings["n_timesteps"]) // world_size, callback=callback)
    distributed.check_identical(list(model.policy.parameters()))
    result: dict = dict(reached=callback.reached)
    if rank == 0:
        eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1000 + seed)
        result["eval"] = float(evaluate_policy(model, eval_env, n_eval_episodes=20, deterministic=True)[0])
    return result


def _rank_main(rank: int, port: int, out: str, threads: int, seed: int) -> None:
    th.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(hours=1)
    )
    try:
        result = train(rank, seed)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    for seed in args.seeds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "result.json")
            mp.start_processes(_rank_main, args=(port, out, args.threads, seed), nprocs=2, start_method="spawn")
            result = json.loads(Path(out).read_text())
        print(f"seed {seed}: evaluation {result['eval']:.1f}, steps to {THRESHOLD:.0f}: {result['reached']}", flush=True)


if __name__ == "__main__":
    main()
