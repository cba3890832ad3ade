"""
Wall time per environment step of ACKTR vs SB3's A2C with the same n_envs / n_steps, in one process
(one torch thread, CPU), on two cases:

- MLP: CartPole-v1, 8 envs x 5 steps, default MlpPolicy;
- CNN: NatureCNN on 84x84x4 frames (SB3's FakeImageEnv), 16 envs x 5 steps.

    python benchmarks/acktr_cost.py [--updates-mlp 400] [--updates-cnn 60] [--repeats 3]

The two algorithms are timed alternately, ``--repeats`` times, after a warm-up; the best (least disturbed)
time of each is used. ACKTR runs with the settings in ``ACKTR_KWARGS`` (what we recommend for each case):
the statistics and the eigendecompositions / inverses are amortized over several updates.
"""

import argparse
import time
from typing import Any

import torch as th
from stable_baselines3 import A2C
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv

from sb3_trpo_kfac.acktr import ACKTR

ACKTR_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": dict(kfac_update=10, kfac_stats_interval=1),
    "cnn": dict(kfac_update=10, kfac_stats_interval=10, kfac_inverse="inverse", kfac_low_rank=128),
}


def make_env(case: str, seed: int):
    if case == "mlp":
        return make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    return make_vec_env(lambda: FakeImageEnv(screen_height=84, screen_width=84, n_channels=4), n_envs=16, seed=seed)


def seconds_per_step(model: BaseAlgorithm, updates: int) -> float:
    steps = updates * model.n_steps * model.n_envs  # type: ignore[attr-defined]
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates-mlp", type=int, default=400)
    parser.add_argument("--updates-cnn", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args()
    th.set_num_threads(1)

    for case in args.cases:
        policy = "MlpPolicy" if case == "mlp" else "CnnPolicy"
        updates = args.updates_mlp if case == "mlp" else args.updates_cnn
        a2c = A2C(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu")
        acktr = ACKTR(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu", **ACKTR_KWARGS[case])
        for model in (a2c, acktr):  # warm-up (allocations, first decompositions)
            seconds_per_step(model, max(updates // 10, 11))
        times: dict[str, list[float]] = {"A2C": [], "ACKTR": []}
        for _ in range(args.repeats):
            times["A2C"].append(seconds_per_step(a2c, updates))
            times["ACKTR"].append(seconds_per_step(acktr, updates))
        best = {name: min(values) for name, values in times.items()}
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        print(
            f"{case}: A2C {best['A2C'] * 1e3:.3f} ms/step, ACKTR {best['ACKTR'] * 1e3:.3f} ms/step, "
            f"ratio {best['ACKTR'] / best['A2C']:.3f} (best of {args.repeats}; median ratio "
            f"{median['ACKTR'] / median['A2C']:.3f})  ACKTR settings {ACKTR_KWARGS[case]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
