"""
Randomized robustness check: seeded cases over action/observation spaces x policies x hyperparameters, both
algorithms. After every update all parameters are finite, and every accepted TRPO step keeps the true mean KL on its
batch within ``target_kl`` (a rejected one leaves the policy unchanged).
"""

import copy
import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)

from sb3_trpo_kfac import ACKTR, TRPO

N_CASES = 120  # per run, both algorithms together
N_UPDATES = 3


class HostileRewards(gym.Wrapper):
    """Rewards now and then huge, or not finite: training must skip what it cannot use and stay finite."""

    def __init__(self, env: gym.Env, seed: int, values: tuple[float, ...]) -> None:
        super().__init__(env)
        self._rng = np.random.default_rng(seed)
        self._values = values

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._rng.random() < 0.05:
            reward = float(self._rng.choice(self._values))
        return obs, reward, terminated, truncated, info


ENVS: dict[str, tuple[Callable[[], gym.Env], str]] = {
    "discrete": (lambda: IdentityEnv(4), "MlpPolicy"),
    "box": (lambda: IdentityEnvBox(-1, 1), "MlpPolicy"),
    "multidiscrete": (lambda: IdentityEnvMultiDiscrete(3), "MlpPolicy"),
    "multibinary": (lambda: IdentityEnvMultiBinary(3), "MlpPolicy"),
    "image": (lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True), "CnnPolicy"),
    "dict": (lambda: SimpleMultiObsEnv(random_start=True), "MultiInputPolicy"),
}


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_case(index: int) -> dict[str, Any]:
    """Case ``index``: an algorithm, an env, a policy and hyperparameters, all drawn from a generator seeded by it."""
    rng = np.random.default_rng(index)
    algo = "trpo" if index % 2 == 0 else "acktr"
    env_name = str(rng.choice(list(ENVS)))
    policy_kwargs: dict[str, Any] = {
        "activation_fn": [th.nn.Tanh, th.nn.ReLU][int(rng.integers(2))],
        "ortho_init": bool(rng.integers(2)),
        "share_features_extractor": bool(rng.integers(2)),
    }
    if env_name == "image":
        policy_kwargs["features_extractor_kwargs"] = {"features_dim": 8}
    else:
        width = int(rng.choice([4, 8, 16]))
        policy_kwargs["net_arch"] = {"pi": [width] * int(rng.integers(1, 3)), "vf": [width]}
    kwargs: dict[str, Any] = {
        "n_steps": int(rng.choice([4, 8, 16])),
        "gamma": float(rng.uniform(0.8, 1.0)),
        "gae_lambda": float(rng.uniform(0.8, 1.0)),
        "normalize_advantage": bool(rng.integers(2)),
        "policy_kwargs": policy_kwargs,
    }
    if env_name == "box" and rng.random() < 0.5:
        kwargs.update(use_sde=True, sde_sample_freq=int(rng.choice([-1, 2])))
    if algo == "trpo":
        kwargs.update(
            target_kl=log_uniform(rng, 1e-4, 1e3),
            cg_damping=log_uniform(rng, 1e-6, 1.0),
            cg_max_steps=int(rng.integers(1, 12)),
            line_search_shrinking_factor=float(rng.uniform(0.1, 0.9)),
            line_search_max_iter=int(rng.integers(1, 12)),
            n_critic_updates=int(rng.integers(0, 4)),
            batch_size=kwargs["n_steps"] // int(rng.choice([1, 2, 4])),
            sub_sampling_factor=int(rng.choice([1, 1, 2])),
            fisher_subsample=float(rng.choice([1.0, 0.5, 0.2])),
            cg_preconditioner=[None, "kfac"][int(rng.integers(2))],
            learning_rate=log_uniform(rng, 1e-5, 1e-1),
        )
    else:
        kwargs.update(
            learning_rate=log_uniform(rng, 1e-3, 2.0),
            kfac_clip=log_uniform(rng, 1e-4, 1.0),
            vf_kfac_clip=[None, log_uniform(rng, 1e-3, 1.0)][int(rng.integers(2))],
            n_critic_updates=int(rng.integers(1, 4)),
            kfac_damping=log_uniform(rng, 1e-6, 1.0),
            momentum=float(rng.choice([0.0, 0.5, 0.9])),
            kfac_update=int(rng.integers(1, 4)),
            kfac_stats_interval=int(rng.integers(1, 3)),
            kfac_inverse=str(rng.choice(["eigen", "inverse"])),
            kfac_async=bool(rng.integers(2)),
            kfac_refine=int(rng.integers(0, 3)),
            kfac_cold_iter=int(rng.integers(0, 3)),
            ent_coef=float(rng.choice([0.0, 0.01, 0.5])),
            vf_coef=float(rng.uniform(0.1, 1.0)),
            max_grad_norm=log_uniform(rng, 0.01, 100.0),
        )
    hostile = rng.random() < 0.25
    rewards = (1e6, -1e6, float("nan"), float("inf")) if rng.random() < 0.5 else (1e6, -1e6)
    return dict(algo=algo, env=env_name, kwargs=kwargs, hostile=hostile, rewards=rewards, seed=index)


def make_model(case: dict[str, Any]) -> TRPO | ACKTR:
    make_env, policy = ENVS[case["env"]]
    env = make_env()
    if case["hostile"]:
        env = HostileRewards(env, case["seed"], case["rewards"])
    algo = TRPO if case["algo"] == "trpo" else ACKTR
    return algo(policy, env, seed=case["seed"], device="cpu", **case["kwargs"])


def mean_kl(model: TRPO, observations: Any, old_state: dict[str, th.Tensor]) -> float:
    """KL(π_old ‖ π_new) on ``observations``, summed over action dimensions, computed independently of TRPO."""
    new_state = copy.deepcopy(model.policy.state_dict())
    with th.no_grad():
        new = copy.copy(model.policy.get_distribution(observations))
        model.policy.load_state_dict(old_state)
        old = model.policy.get_distribution(observations)
        kl = kl_divergence(old, new)
    model.policy.load_state_dict(new_state)
    return float(kl.reshape(kl.shape[0], -1).sum(dim=1).mean())


def checked_updates(model: TRPO | ACKTR) -> list[dict[str, float]]:
    """Wrap ``train`` (and TRPO's policy step) so that each update is checked; returns the list of checks made."""
    checks: list[dict[str, float]] = []
    train = model.train

    def checked_train() -> None:
        train()
        for name, param in model.policy.named_parameters():
            assert th.isfinite(param).all(), f"update {len(checks)}: {name} is not finite"
        checks.append({})

    model.train = checked_train  # type: ignore[method-assign]
    if isinstance(model, TRPO):
        policy_step = model._policy_step

        def checked_policy_step(observations: Any, *args: Any) -> dict[str, float]:
            old_state = copy.deepcopy(model.policy.state_dict())
            stats = policy_step(observations, *args)
            kl = mean_kl(model, observations, old_state)
            if stats["is_line_search_success"] == 1.0:
                assert kl <= model.target_kl * (1 + 1e-4) + 1e-12, (kl, model.target_kl)
            else:
                assert kl == 0.0, kl  # a rejected step restores θ_old exactly
            checks.append({"kl": kl, "accepted": stats["is_line_search_success"]})
            return stats

        model._policy_step = checked_policy_step  # type: ignore[method-assign]
    return checks


@pytest.mark.parametrize("index", range(N_CASES))
def test_random_case_stays_finite_and_in_trust_region(index: int) -> None:
    case = sample_case(index)
    model = make_model(case)
    checks = checked_updates(model)
    model.learn(N_UPDATES * model.n_steps * model.n_envs)
    updates = [check for check in checks if not check]
    assert len(updates) == N_UPDATES, case
