"""
ACKTR on 2 gloo ranks: updates on batches B1 and B2 equal the single-process updates on B1 ∪ B2 (float64 policies,
parameters to 1e-10 of the update, the same ν) for Discrete and Box actions, with and without ``kfac_async``, split
decompositions and extra critic steps; and after ``learn()`` on different environments the ranks hold the same
parameters.

The value-Fisher noise ε is drawn per rank in training; here it is a fixed function of the value (``sin(1000 V)``),
the same for a sample whichever process holds it, so that the Fisher loss of the union is the ranks' Fisher losses.
"""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_trpo_kfac import ACKTR
from sb3_trpo_kfac.common import distributed

from .helpers import run_ranks

N_STEPS = 4  # per environment; one environment per rank, two in the single process
UPDATES = 3  # the third applies the background decomposition the second started (kfac_async)
CASES = {
    "discrete": ("CartPole-v1", dict()),
    "discrete-split-critic": ("CartPole-v1", dict(kfac_split_decompositions=True, n_critic_updates=3)),
    "discrete-async-split": ("CartPole-v1", dict(kfac_async=True, kfac_split_decompositions=True)),
    "box-async": ("Pendulum-v1", dict(kfac_async=True, normalize_advantage=True)),
    "box-split-critic": (
        "Pendulum-v1",
        dict(kfac_split_decompositions=True, n_critic_updates=2, vf_kfac_clip=0.01, normalize_advantage=True),
    ),
}


class Float64Features(BaseFeaturesExtractor):
    """Flattened observations in float64 (SB3 casts them to float32 first, exact for the float32 data here)."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, int(np.prod(observation_space.shape)))

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return observations.flatten(1).double()


def make(env_id: str, n_envs: int, options: dict) -> ACKTR:
    env = DummyVecEnv([lambda: gym.make(env_id)] * n_envs)
    policy_kwargs = dict(net_arch=[8], features_extractor_class=Float64Features)
    previous = th.get_default_dtype()
    th.set_default_dtype(th.float64)  # a float64 policy from the start (its critic is found on a forward pass)
    try:
        model = ACKTR("MlpPolicy", env, n_steps=N_STEPS, seed=0, policy_kwargs=policy_kwargs, **options)
    finally:
        th.set_default_dtype(previous)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model._fisher_value_noise = lambda values: th.sin(1000 * values.detach())  # type: ignore[method-assign]
    return model


def fill_buffer(model: ACKTR, update: int, envs: slice) -> None:
    """The union batch of an update (2 environments x N_STEPS, float32 values in float64 arrays), or a part of it."""
    rng = np.random.default_rng(update)
    buffer = model.rollout_buffer
    shape = (N_STEPS, 2)
    obs = rng.normal(size=(*shape, *model.observation_space.shape)).astype(np.float32)
    if isinstance(model.action_space, gym.spaces.Discrete):
        actions = rng.integers(model.action_space.n, size=(*shape, 1))
    else:
        actions = rng.normal(size=(*shape, *model.action_space.shape)).astype(np.float32)
    data = dict(
        observations=obs,
        actions=actions,
        returns=rng.normal(size=shape),
        advantages=rng.normal(size=shape),
        values=rng.normal(size=shape),
        log_probs=np.zeros(shape),
        episode_starts=np.zeros(shape),
    )
    for name, array in data.items():
        setattr(buffer, name, np.asarray(array, dtype=np.float64)[:, envs].copy())
    buffer.full, buffer.pos, buffer.generator_ready = True, N_STEPS, False


def updates(env_id: str, options: dict, envs: slice) -> dict:
    model = make(env_id, envs.stop - envs.start, options)
    start = [p.detach().clone() for p in model.policy.parameters()]
    nus = []
    for update in range(UPDATES):
        fill_buffer(model, update, envs)
        model.train()
        nus.append(list(model.policy.optimizer.last_nu))
        distributed.check_identical(list(model.policy.parameters()))
    return dict(start=start, params=[p.detach().clone() for p in model.policy.parameters()], nus=nus)


def learned(rank: int) -> list[th.Tensor]:
    """Five updates of learn() on CartPole, each rank on environments seeded differently."""
    env = make_vec_env("CartPole-v1", n_envs=2)
    model = ACKTR("MlpPolicy", env, n_steps=8, seed=0, policy_kwargs=dict(net_arch=[16]))
    model.set_random_seed(10 + rank)  # after the policy's initialisation: same parameters, different episodes
    model.learn(5 * 8 * 2)
    distributed.check_identical(list(model.policy.parameters()))
    return [p.detach().clone() for p in model.policy.parameters()] + [th.as_tensor(model.rollout_buffer.observations)]


def on_rank(rank: int) -> dict:
    results = {name: updates(env_id, options, slice(rank, rank + 1)) for name, (env_id, options) in CASES.items()}
    results["learned"] = learned(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(on_rank)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_union(ranks, name):
    env_id, options = CASES[name]
    single = updates(env_id, options, slice(0, 2))
    first, second = ranks[0][name], ranks[1][name]
    assert first["nus"] == second["nus"]
    assert all(th.equal(a, b) for a, b in zip(first["params"], second["params"]))
    assert np.allclose(first["nus"], single["nus"], rtol=1e-10, atol=0)
    assert 0 < min(nu for nus in single["nus"] for nu in nus) < 1, "the trust region should be active"
    for p_ranks, p_single, p0 in zip(first["params"], single["params"], single["start"]):
        update = (p_single - p0).abs().max()
        assert (p_ranks - p_single).abs().max() <= 1e-10 * update, "the update differs from the union's"


def test_learn_keeps_ranks_identical(ranks):
    *first, first_obs = ranks[0]["learned"]
    *second, second_obs = ranks[1]["learned"]
    assert not th.equal(first_obs, second_obs), "the ranks should see different episodes"
    assert all(th.equal(a, b) for a, b in zip(first, second))
