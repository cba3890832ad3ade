"""
Environment steps per second of data-parallel TRPO and ACKTR with 1 and 2 ranks (gloo, CPU), on an environment
whose step is the bottleneck: CartPole-v1 behind a wrapper that sleeps ``--step-ms`` per step, as a slow simulator
would. Every rank runs the same per-rank batch (``--n-envs`` × ``--n-steps``), so 2 ranks take twice the samples per
update; the goal is a throughput ratio of at least 1.8.

Each measurement is a fresh set of processes (``torch.multiprocessing`` spawn; 1 rank: no process group) that
builds the model, runs one warm-up update, then times ``learn()`` over ``--updates`` updates on rank 0 (from a
barrier to the end of ``learn()``, whose last collective ends together on every rank). The world sizes alternate
round by round (``--rounds``), so drift of the machine's load hits both alike; the medians are reported.

    python benchmarks/data_parallel_throughput.py               # both algorithms, 1 and 2 ranks
    python benchmarks/data_parallel_throughput.py --dry-run     # the settings, as JSON lines
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch as th
import torch.multiprocessing as mp
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import distributed as dist

ALGOS = ("trpo", "acktr")
WORLD_SIZES = (1, 2)


class SleepPerStep(gym.Wrapper):
    """Sleeps a fixed time in every ``step``: a simulator whose step costs that much wall time."""

    def __init__(self, env: gym.Env, seconds: float) -> None:
        super().__init__(env)
        self.seconds = seconds

    def step(self, action: Any) -> Any:
        time.sleep(self.seconds)
        return self.env.step(action)


def settings(algo: str, args: argparse.Namespace) -> dict[str, Any]:
    """What one measurement runs (the ``--dry-run`` record)."""
    kwargs: dict[str, Any] = {"n_steps": args.n_steps, "policy_kwargs": {"net_arch": [64, 64]}}
    if algo == "trpo":
        kwargs |= {"batch_size": args.n_envs * args.n_steps, "n_critic_updates": 5}
    return {
        "algo": algo,
        "env_id": "CartPole-v1",
        "step_ms": args.step_ms,
        "n_envs_per_rank": args.n_envs,
        "kwargs": kwargs,
        "updates": args.updates,
        "rounds": args.rounds,
        "world_sizes": list(WORLD_SIZES),
        "threads_per_rank": args.threads,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _measure(rank: int, world_size: int, port: int, setting: dict[str, Any], out: str) -> None:
    from sb3_trpo_kfac import ACKTR, TRPO

    th.set_num_threads(setting["threads_per_rank"])
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=10),
        )  # fmt: skip
    seconds = setting["step_ms"] / 1000.0
    env = DummyVecEnv([lambda: SleepPerStep(gym.make(setting["env_id"]), seconds)] * setting["n_envs_per_rank"])
    algo_class = TRPO if setting["algo"] == "trpo" else ACKTR
    model = algo_class("MlpPolicy", env, seed=0, device="cpu", **setting["kwargs"])
    steps_per_update = world_size * setting["n_envs_per_rank"] * setting["kwargs"]["n_steps"]
    model.learn(steps_per_update)  # warm-up: first forwards, allocations, the first curvature
    if world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    model.learn(setting["updates"] * steps_per_update, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": elapsed, "steps": setting["updates"] * steps_per_update}))
    if world_size > 1:
        dist.destroy_process_group()


def steps_per_second(setting: dict[str, Any], world_size: int) -> float:
    """One measurement: all ranks' environment steps per second of wall time."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank0.json")
        mp.start_processes(
            _measure, args=(world_size, _free_port(), setting, out), nprocs=world_size, start_method="spawn"
        )
        record = json.loads(Path(out).read_text())
    return record["steps"] / record["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--step-ms", type=float, default=2.0, help="sleep per environment step (ms)")
    parser.add_argument("--n-envs", type=int, default=4, help="environments per rank (DummyVecEnv)")
    parser.add_argument("--n-steps", type=int, default=64, help="steps per environment per update")
    parser.add_argument("--updates", type=int, default=4, help="timed updates per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per world size (alternating)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dry-run", action="store_true", help="print the settings as JSON lines and exit")
    args = parser.parse_args()
    if args.dry_run:
        for algo in args.algos:
            print(json.dumps(settings(algo, args)))
        return
    print(f"torch {th.__version__}, {os.cpu_count()} cores, {args.threads} thread(s) per rank, median of {args.rounds}")
    print(f"{'algo':<6} {'step (ms)':>9} {'steps/s 1 rank':>15} {'steps/s 2 ranks':>16} {'ratio':>6}")
    for algo in args.algos:
        setting = settings(algo, args)
        rates: dict[int, list[float]] = {n: [] for n in WORLD_SIZES}
        for _ in range(args.rounds):
            for world_size in WORLD_SIZES:
                rates[world_size].append(steps_per_second(setting, world_size))
        one, two = (statistics.median(rates[n]) for n in WORLD_SIZES)
        print(f"{algo:<6} {args.step_ms:>9} {one:>15.0f} {two:>16.0f} {two / one:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
