"""
K-FAC curvature update of ACKTR's NatureCNN (or CartPole MLP) policy on 2 gloo ranks: decompositions computed by every rank
(replicated) vs split (each block's by one rank, assigned by cost, then broadcast; ``kfac_split_decompositions``).

Both ranks hold the factors of one batch (cnn: 16 envs x 5 steps of 84x84x4 frames, SB3's FakeImageEnv; mlp: SB3's
default 64-64 MlpPolicy on CartPole-v1, 8 envs x 10 steps); each round times
one ``update_curvature()`` of each mode in turn (``time_in_turn`` of benchmarks/common.py), the ranks starting
together (a barrier before each run), and records the slower rank's time (the update waits for it). Settings:

- "eigen": ACKTR's defaults (full eigendecompositions; the 3137 x 3137 input factor of the 3136 -> 512 layer dominates);
- "inverse low-rank": factored-damping inverses with a rank-128 input factor for that layer.

    python benchmarks/kfac_split_decompositions.py [--network cnn|mlp] [--rounds 10] [--threads 1]
        [--settings eigen "inverse low-rank"]

Printed: per setting, the median seconds of each mode and the median per-round ratio split / replicated.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.multiprocessing as mp
from common import time_in_turn
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv
from torch import distributed as dist

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.common.kfac import KFAC

SETTINGS: dict[str, dict[str, Any]] = {
    "eigen": dict(kfac_inverse="eigen"),
    "inverse low-rank": dict(kfac_inverse="inverse", kfac_low_rank=128),
}
# per network: the environment, the policy, n_envs x n_steps
NETWORKS: dict[str, tuple[Any, str, int, int]] = {
    "cnn": (lambda: FakeImageEnv(screen_height=84, screen_width=84, n_channels=4), "CnnPolicy", 16, 5),
    "mlp": ("CartPole-v1", "MlpPolicy", 8, 10),
}


def measure(rank: int, network: str, settings: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    env_id, policy_name, n_envs, n_steps = NETWORKS[network]
    env = make_vec_env(env_id, n_envs=n_envs)
    policy = ACKTR(policy_name, env, n_steps=n_steps, seed=0).policy
    th.manual_seed(rank)
    obs = th.as_tensor(np.stack([env.observation_space.sample() for _ in range(n_envs * n_steps)])).float()
    results = {}
    for setting in settings:
        optimizers = {
            mode: KFAC(policy, kfac_split_decompositions=split, **SETTINGS[setting])
            for mode, split in (("replicated", False), ("split", True))
        }
        for opt in optimizers.values():
            with opt.collect():
                distribution = policy.get_distribution(obs)
                values = policy.predict_values(obs).flatten()
            log_prob = distribution.log_prob(distribution.sample())
            opt.update_statistics(-log_prob.sum() - ((values - (values + th.randn_like(values)).detach()) ** 2).sum())
            opt.remove_hooks()

        def run(opt: KFAC) -> None:
            dist.barrier()  # the ranks start together, so each time includes waiting for the other in the exchange
            opt.update_curvature()

        times = time_in_turn({mode: lambda opt=opt: run(opt) for mode, opt in optimizers.items()}, rounds)
        slowest = {}
        for mode, seconds in times.items():
            per_round = th.tensor(seconds, dtype=th.float64)
            dist.all_reduce(per_round, op=dist.ReduceOp.MAX)
            slowest[mode] = per_round.tolist()
        results[setting] = slowest
    return results


def _rank_main(rank: int, port: int, out: str, threads: int, network: str, settings: list[str], rounds: int) -> None:
    th.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=30)
    )
    try:
        result = measure(rank, network, settings, rounds)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--network", default="cnn", choices=list(NETWORKS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        run_args = (port, out, args.threads, args.network, args.settings, args.rounds)
        mp.start_processes(_rank_main, args=run_args, nprocs=2, start_method="spawn")
        result = json.loads(Path(out).read_text())
    for setting, times in result.items():
        ratios = [s / r for s, r in zip(times["split"], times["replicated"])]
        medians = {mode: statistics.median(seconds) for mode, seconds in times.items()}
        print(
            f"{setting}: replicated {medians['replicated']:.3f} s, split {medians['split']:.3f} s, "
            f"split / replicated (median of {len(ratios)} rounds) {statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
