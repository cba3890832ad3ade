"""
Sample efficiency on CartPole-v1: environment steps until the mean return of the last 10 training episodes
first reaches 475, for ACKTR with our shipped entry (zoo_hyperparams/acktr.yml) and SB3's A2C with rl-zoo3's a2c.yml
entry, both read from the files the zoo commands read (benchmarks/common.py). One process, one torch thread, CPU.

    python benchmarks/acktr_sample_efficiency.py                 # both algorithms, seeds 0-4
    python benchmarks/acktr_sample_efficiency.py --algo acktr --seeds 0 1
    python benchmarks/acktr_sample_efficiency.py --algo acktr --acktr-kwargs '{"kfac_async": true}'
    python benchmarks/acktr_sample_efficiency.py --dry-run       # the settings each algorithm would run, as JSON

The criterion is checked after every rollout on the episodes finished so far (stochastic policy, the returns
SB3 logs as rollout/ep_rew_mean but over the last 10 episodes); a run that never gets there counts as inf. A run
stops at its entry's n_timesteps, or at 250k steps if that is more, so that slower settings tried through
``--acktr-kwargs`` still get a figure.
"""

import argparse
import json
import statistics
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import A2C
from stable_baselines3.common.callbacks import BaseCallback

from sb3_trpo_kfac.acktr import ACKTR

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import OURS, RL_ZOO3, ZooEntry, timed, zoo_entry

ENV_ID = "CartPole-v1"
TARGET = 475.0
WINDOW = 10
MIN_BUDGET = 250_000
ALGOS = {"acktr": (ACKTR, OURS), "a2c": (A2C, RL_ZOO3)}  # each algorithm with the entry its zoo command runs


class StepsToTarget(BaseCallback):
    """Stops training once the mean return of the last ``WINDOW`` episodes reaches ``TARGET``."""

    def __init__(self) -> None:
        super().__init__()
        self.hit: int | None = None

    def _on_step(self) -> bool:
        return self.hit is None  # False stops learn() at the first step after the target was hit

    def _on_rollout_end(self) -> None:
        episodes = [info["r"] for info in list(self.model.ep_info_buffer)[-WINDOW:]]
        if self.hit is None and len(episodes) == WINDOW and np.mean(episodes) >= TARGET:
            self.hit = self.num_timesteps


def budget(entry: ZooEntry) -> int:
    """The entry's budget, at least ``MIN_BUDGET`` steps."""
    return max(entry.n_timesteps, MIN_BUDGET)


def run(entry: ZooEntry, seed: int) -> tuple[float, float]:
    """Steps to the target (inf if never) and wall time of one run of ``entry``."""
    algo_class = ALGOS[entry.algo][0]
    model = algo_class(entry.policy, entry.make_env(seed), seed=seed, device="cpu", **entry.kwargs)
    callback = StepsToTarget()
    seconds = timed(lambda: model.learn(budget(entry), callback=callback))
    return (float("inf") if callback.hit is None else float(callback.hit)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=["acktr", "a2c", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--acktr-kwargs", type=json.loads, default={}, help="JSON overriding keys of the shipped ACKTR entry"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the settings and budget of each algorithm, run nothing"
    )
    args = parser.parse_args()
    th.set_num_threads(1)

    entries = [
        zoo_entry(algo, ENV_ID, ALGOS[algo][1], overrides=args.acktr_kwargs if algo == "acktr" else None)
        for algo in (["acktr", "a2c"] if args.algo == "both" else [args.algo])
    ]
    if args.dry_run:
        for entry in entries:
            print(entry.describe(budget=budget(entry)))
        return
    results: dict[str, dict[str, Any]] = {}
    for entry in entries:
        algo, steps = entry.algo, {}
        for seed in args.seeds:
            steps[seed], seconds = run(entry, seed)
            print(f"{algo} seed {seed}: steps to {TARGET:.0f} = {steps[seed]}  ({seconds:.0f} s)", flush=True)
        median = statistics.median(steps.values())
        print(
            f"{algo}: median steps to {TARGET:.0f} over seeds {args.seeds} = {median}  settings={entry.settings}",
            flush=True,
        )
        results[algo] = dict(steps=steps, median=median, settings=entry.settings, budget=budget(entry))
    if "acktr" in results and "a2c" in results:
        ratio = results["acktr"]["median"] / results["a2c"]["median"]
        print(f"ACKTR / A2C median steps = {ratio:.3f} (target <= 0.5)")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
