"""
Wall time per environment step of ACKTR vs SB3's A2C with the same n_envs / n_steps, in one process
(one torch thread, CPU), on two cases:

- MLP: CartPole-v1, 8 envs x 5 steps, default MlpPolicy;
- CNN: NatureCNN on 84x84x4 frames (SB3's FakeImageEnv), 16 envs x 5 steps.

    python benchmarks/acktr_cost.py [--updates-mlp 400] [--updates-cnn 60] [--repeats 3]

The two algorithms are timed alternately, ``--repeats`` times, after a warm-up; the best (least disturbed)
time of each is used. ACKTR runs with each setting in ``ACKTR_KWARGS``:

- mlp "fresh": eigendecompositions and statistics at every update (the CartPole settings of
  benchmarks/acktr_sample_efficiency.py, the fastest to learn there);
- mlp "fresh async": the same with ``kfac_async=True``: the eigendecompositions run in a background thread
  overlapped with the next rollout (each update uses the previous update's basis);
- mlp "amortized": eigendecompositions every 10 updates, statistics every 4 (cheaper, learns CartPole slower);
- cnn: statistics every 10 updates, factored-damping inverses every 10, rank-128 input factor for the
  3136 -> 512 layer; with and without ``kfac_async``.

``--only`` restricts the ACKTR rows (e.g. ``--only "fresh async"``). The async rows need a second core: the
main thread runs with one torch thread, the decomposition worker beside it.
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

ACKTR_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "fresh": dict(kfac_update=1, kfac_async=False),
        "fresh async": dict(kfac_update=1, kfac_async=True),
        "amortized": dict(kfac_update=10, kfac_stats_interval=4, kfac_async=False),
        # the floor of fresh statistics: no decomposition after the first one
        "statistics only": dict(kfac_update=10**9, kfac_async=False),
    },
    "cnn": {
        "amortized": dict(kfac_update=10, kfac_stats_interval=10, kfac_inverse="inverse", kfac_low_rank=128, kfac_async=False),
        "amortized async": dict(
            kfac_update=10, kfac_stats_interval=10, kfac_inverse="inverse", kfac_low_rank=128, kfac_async=True
        ),
    },
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
    parser.add_argument("--only", nargs="+", default=None, help="ACKTR rows to time (default: all of the case)")
    args = parser.parse_args()
    th.set_num_threads(1)

    for case in args.cases:
        policy = "MlpPolicy" if case == "mlp" else "CnnPolicy"
        updates = args.updates_mlp if case == "mlp" else args.updates_cnn
        a2c = A2C(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu")
        acktrs = {
            label: ACKTR(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu", **kwargs)
            for label, kwargs in ACKTR_KWARGS[case].items()
            if args.only is None or label in args.only
        }
        models: dict[str, BaseAlgorithm] = {"A2C": a2c, **acktrs}
        for model in models.values():  # warm-up (allocations, first decompositions)
            seconds_per_step(model, max(updates // 10, 11))
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(seconds_per_step(model, updates))
        best = {name: min(values) for name, values in times.items()}
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        for label in acktrs:
            print(
                f"{case} {label}: A2C {best['A2C'] * 1e3:.3f} ms/step, ACKTR {best[label] * 1e3:.3f} ms/step, "
                f"ratio {best[label] / best['A2C']:.3f} (best of {args.repeats}; median ratio "
                f"{median[label] / median['A2C']:.3f})  ACKTR settings {ACKTR_KWARGS[case][label]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
