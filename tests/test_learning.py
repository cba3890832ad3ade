"""
Learning checks: the shipped zoo entries (zoo_hyperparams/*.yml) on classic control at small budgets, judged over
three seeds so that one unlucky trajectory cannot decide. RL trajectories differ with the CPU kernels PyTorch picks,
so each threshold is one that every seed cleared with a margin under ``ATEN_CPU_CAPABILITY=default``, ``avx2`` and
the native kernels, with one and two torch threads (``benchmarks/learning_test_margins.py`` measures the margins;
docs/performance.md has the per-seed figures). ``.ci/run`` runs these a second time on the scalar kernels.

Score: the best mean return of the last 10 training episodes seen after a rollout (as the sample-efficiency
benchmark measures), which does not depend on where a run happens to stand at the very last update.
"""

import json
import os
from typing import Any

import numpy as np
import pytest
import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_trpo_kfac import ACKTR, TRPO
from sb3_trpo_kfac.zoo import hyperparams_path

pytestmark = pytest.mark.expensive

SEEDS = (0, 1, 2)
# where benchmarks/learning_test_margins.py collects the per-seed scores (unset: not recorded)
SCORES_FILE = os.environ.get("SB3_TRPO_KFAC_LEARNING_SCORES")


class BestTrainingReturn(BaseCallback):
    """Best mean return of the last 10 training episodes seen after a rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.best = -np.inf

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        returns = [info["r"] for info in list(self.model.ep_info_buffer)[-10:]]
        if len(returns) == 10:
            self.best = max(self.best, float(np.mean(returns)))


def zoo_entry(algo: str, env_id: str) -> dict[str, Any]:
    """The shipped entry as constructor keywords, plus the zoo-only keys ``n_envs`` and ``normalize``."""
    with open(hyperparams_path(algo)) as file:
        entry = dict(yaml.safe_load(file)[env_id])
    for key in ("n_timesteps", "policy"):
        entry.pop(key)
    learning_rate = entry.get("learning_rate")
    if isinstance(learning_rate, str):  # rl-zoo3's "lin_<value>": linear decay to 0
        assert learning_rate.startswith("lin_"), learning_rate
        initial = float(learning_rate[len("lin_") :])
        entry["learning_rate"] = lambda progress_remaining: progress_remaining * initial
    return entry


def best_training_return(algo: str, env_id: str, timesteps: int, seed: int) -> float:
    """Train with the shipped entry and return the best mean of 10 consecutive training episodes."""
    kwargs = zoo_entry(algo, env_id)
    env = make_vec_env(env_id, n_envs=kwargs.pop("n_envs", 1), seed=seed)
    if kwargs.pop("normalize", False):  # as rl-zoo3 wraps it: the discount of the entry for the return statistics
        env = VecNormalize(env, gamma=kwargs.get("gamma", 0.99))
    algo_class = ACKTR if algo == "acktr" else TRPO
    model = algo_class("MlpPolicy", env, seed=seed, device="cpu", **kwargs)
    callback = BestTrainingReturn()
    model.learn(timesteps, callback=callback)
    if SCORES_FILE:
        record = dict(algo=algo, env=env_id, timesteps=timesteps, seed=seed, score=callback.best)
        record.update(capability=os.environ.get("ATEN_CPU_CAPABILITY", "native"), threads=th.get_num_threads())
        with open(SCORES_FILE, "a") as file:
            file.write(json.dumps(record) + "\n")
    return callback.best


# (algo, env, budget, every seed above, median above); random play scores about 22 on CartPole and -1200 on Pendulum
CHECKS = [
    ("acktr", "CartPole-v1", 50_000, 300.0, 450.0),
    ("trpo", "CartPole-v1", 60_000, 300.0, 400.0),
    ("acktr", "Pendulum-v1", 100_000, -550.0, -400.0),
    ("trpo", "Pendulum-v1", 80_000, -550.0, -400.0),
]


@pytest.mark.parametrize("algo, env_id, timesteps, every_seed, median", CHECKS, ids=[f"{a}-{e}" for a, e, *_ in CHECKS])
def test_shipped_entry_learns(algo: str, env_id: str, timesteps: int, every_seed: float, median: float) -> None:
    scores = [best_training_return(algo, env_id, timesteps, seed) for seed in SEEDS]
    assert min(scores) > every_seed and float(np.median(scores)) > median, scores
