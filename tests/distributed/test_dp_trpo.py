"""
Data-parallel TRPO on 2 gloo ranks: one update of 2 ranks on batches B1 and B2 is the single-process update on
B1 ∪ B2 (float64 policies), and ``learn()`` keeps the ranks identical, counts global timesteps, logs on rank 0 only
and saves a model that continues in one process.
"""

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_trpo_kfac import TRPO

from .helpers import run_ranks

N_STEPS = 16
N_ENVS = 2  # per rank
# (environment, cg_preconditioner, whether rank 1's first line-search candidate is invalid)
CONFIGS = [
    *((env, kfac, False) for env in ("CartPole-v1", "Pendulum-v1") for kfac in (None, "kfac")),
    ("Pendulum-v1", None, True),
]


class Float64Extractor(FlattenExtractor):
    """SB3 casts observations to float32; this float64 policy takes them on exactly (a float32 is a float64)."""

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return super().forward(observations.double())


class Float64Buffer(RolloutBuffer):
    """Hands out the stored (float32) values as float64, so the update itself is computed in float64."""

    def to_torch(self, array: np.ndarray, copy: bool = True) -> th.Tensor:
        tensor = super().to_torch(array, copy)
        return tensor.double() if tensor.is_floating_point() else tensor


@contextlib.contextmanager
def float64() -> Iterator[None]:
    previous = th.get_default_dtype()
    th.set_default_dtype(th.float64)
    try:
        yield
    finally:
        th.set_default_dtype(previous)


def make_model(env_id: str, n_envs: int, cg_preconditioner: str | None) -> TRPO:
    env = DummyVecEnv([lambda: gym.make(env_id)] * n_envs)
    return TRPO(
        "MlpPolicy",
        env,
        n_steps=N_STEPS,
        batch_size=N_STEPS * n_envs,  # one critic minibatch per epoch, on one rank as on the union
        n_critic_updates=2,
        cg_preconditioner=cg_preconditioner,
        rollout_buffer_class=Float64Buffer,
        policy_kwargs={"net_arch": [8], "features_extractor_class": Float64Extractor},
        seed=3,
        device="cpu",
    )


def fill_buffer(model: TRPO, columns: slice) -> None:
    """
    Fill the rollout buffer with ``columns`` of one fixed union batch of 2 × N_ENVS environments (the same arrays on
    every rank and in the single process; values and log-probabilities from the policy every one of them starts from).
    """
    rng = np.random.default_rng(0)
    n_total = 2 * N_ENVS
    space = model.action_space
    obs = rng.normal(size=(N_STEPS, n_total, *model.observation_space.shape)).astype(np.float32)
    if isinstance(space, gym.spaces.Discrete):
        actions = rng.integers(space.n, size=(N_STEPS, n_total, 1))
    else:
        actions = rng.uniform(space.low, space.high, size=(N_STEPS, n_total, *space.shape)).astype(np.float32)
    rewards = rng.normal(size=(N_STEPS, n_total)).astype(np.float32)
    starts = rng.random((N_STEPS, n_total)) < 0.1
    with th.no_grad():
        flat_actions = th.as_tensor(actions.reshape(N_STEPS * n_total, -1))
        if isinstance(space, gym.spaces.Discrete):
            flat_actions = flat_actions.flatten()
        values, log_prob, _ = model.policy.evaluate_actions(
            th.as_tensor(obs.reshape(N_STEPS * n_total, -1)), flat_actions
        )
    values, log_prob = values.reshape(N_STEPS, n_total), log_prob.reshape(N_STEPS, n_total)
    buffer = model.rollout_buffer
    buffer.reset()
    for t in range(N_STEPS):
        buffer.add(obs[t, columns], actions[t, columns], rewards[t, columns], starts[t, columns],
                   values[t, columns], log_prob[t, columns])  # fmt: skip
    last_values = th.as_tensor(rng.normal(size=n_total))[columns]
    dones = (rng.random(n_total) < 0.2)[columns]
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)


class FirstCandidateInvalid:
    """Wraps ``policy.get_distribution``: the first line-search candidate (a call without gradients) is refused."""

    def __init__(self, get_distribution):
        self.get_distribution, self.raised = get_distribution, False

    def __call__(self, observations):
        if not th.is_grad_enabled() and not self.raised:
            self.raised = True
            raise ValueError("as torch's validation refuses a scale that overflowed")
        return self.get_distribution(observations)


def one_update(model: TRPO, columns: slice, first_candidate_invalid: bool = False) -> dict:
    fill_buffer(model, columns)
    if first_candidate_invalid:
        model.policy.get_distribution = FirstCandidateInvalid(model.policy.get_distribution)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.train()
    stats = dict(model.logger.name_to_value)
    return {"params": {k: v.clone() for k, v in model.policy.state_dict().items()}, "stats": stats}


def _updates_of_rank(rank: int) -> list[dict]:
    results = []
    with float64():
        for env_id, kfac, invalid in CONFIGS:
            model = make_model(env_id, N_ENVS, kfac)
            results.append(one_update(model, slice(rank * N_ENVS, (rank + 1) * N_ENVS), invalid and rank == 1))
    return results


def test_one_update_of_two_ranks_is_the_update_on_the_union_of_their_batches():
    ranks = run_ranks(_updates_of_rank)
    for (env_id, kfac, invalid), rank0, rank1 in zip(CONFIGS, *ranks, strict=True):
        with float64():
            union = one_update(make_model(env_id, 2 * N_ENVS, kfac), slice(None), invalid)
        what = f"{env_id}, cg_preconditioner={kfac}, first candidate invalid on rank 1: {invalid}"
        for name, expected in union["params"].items():
            assert th.equal(rank0["params"][name], rank1["params"][name]), f"{what}: ranks differ on {name}"
            assert expected.dtype == th.float64
            th.testing.assert_close(rank0["params"][name], expected, rtol=1e-10, atol=1e-12, msg=f"{what}: {name}")
        stats, expected_stats = rank0["stats"], union["stats"]
        assert stats["train/is_line_search_success"] == expected_stats["train/is_line_search_success"] == 1.0, what
        # one candidate invalid on one rank is rejected on both, and the next one taken
        fraction = stats["train/line_search_step_fraction"]
        assert fraction == expected_stats["train/line_search_step_fraction"] == (0.8 if invalid else 1.0), what
        for key in ("train/policy_objective", "train/kl_divergence_loss", "train/value_loss"):
            assert stats[key] == pytest.approx(expected_stats[key], rel=1e-10), f"{what}: {key}"


class StepCounts(BaseCallback):
    """``num_timesteps`` as callbacks see it at every environment step."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []

    def _on_step(self) -> bool:
        self.counts.append(self.num_timesteps)
        return True


def _learn_on_rank(rank: int, folder: str) -> dict:
    env = DummyVecEnv([lambda: gym.make("CartPole-v1")] * N_ENVS)
    model = TRPO("MlpPolicy", env, n_steps=N_STEPS, batch_size=16, n_critic_updates=2, policy_kwargs={"net_arch": [8]},
                 seed=5, device="cpu")  # fmt: skip
    model.set_logger(configure(str(Path(folder) / f"rank{rank}"), ["csv"]))
    steps = StepCounts()
    model.learn(3 * 2 * N_ENVS * N_STEPS, callback=steps)  # the budget counts both ranks' steps: 3 updates
    if rank == 0:
        model.save(Path(folder) / "model.zip")
    result = {
        "num_timesteps": model.num_timesteps,
        "step_counts": steps.counts,
        "n_updates": model._n_updates,
        "outputs": len(model.logger.output_formats),
        "params": {k: v.clone() for k, v in model.policy.state_dict().items()},
    }
    # the check catches one rank's divergence (here: a corrupted parameter on rank 1)
    if rank == 1:
        with th.no_grad():
            next(model.policy.parameters()).view(-1)[0] += 1e-6
    try:
        model.check_ranks_identical()
        result["mismatch"] = None
    except RuntimeError as error:
        result["mismatch"] = str(error)
    return result


def test_learn_keeps_ranks_identical_counts_global_steps_logs_on_rank_0_and_saves_a_model_for_one_process(tmp_path):
    rank0, rank1 = run_ranks(_learn_on_rank, str(tmp_path))
    batch = 2 * N_ENVS * N_STEPS  # both ranks' steps per rollout
    for result in (rank0, rank1):
        assert result["num_timesteps"] == 3 * batch
        assert result["step_counts"] == [2 * N_ENVS * (k + 1) for k in range(3 * N_STEPS)]
        assert result["n_updates"] == 3
        assert result["mismatch"] is not None and "different policy parameters" in result["mismatch"]
    for name, value in rank0["params"].items():
        assert th.equal(value, rank1["params"][name]), name
    assert rank0["outputs"] == 1 and rank1["outputs"] == 0
    with open(tmp_path / "rank0" / "progress.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["time/total_timesteps"]) for row in rows] == [batch, 2 * batch, 3 * batch]
    assert (tmp_path / "rank1" / "progress.csv").read_text() == ""

    # continues in one process from rank 0's save
    model = TRPO.load(tmp_path / "model.zip", env=DummyVecEnv([lambda: gym.make("CartPole-v1")] * N_ENVS))
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, rank0["params"][name]), name
    model.learn(N_ENVS * N_STEPS, reset_num_timesteps=False)
    assert model.num_timesteps == 3 * batch + N_ENVS * N_STEPS
    assert model._n_updates == 4
