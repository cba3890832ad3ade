"""TRPO's K-FAC preconditioned conjugate gradient."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnv, IdentityEnvBox
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_trpo_kfac import TRPO
from sb3_trpo_kfac.common.conjugate_gradient import conjugate_gradient
from sb3_trpo_kfac.common.fisher import GaussNewtonFisher, flat_concat, split_like


class PolicySnapshot(BaseCallback):
    """Copies the policy when a rollout ends, i.e. just before ``train()``."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.before = copy.deepcopy(self.model.policy.state_dict())


class ScaledObservationEnv(gym.Env):
    """MuJoCo-like shapes: 17 observations spanning two decades of scale, 6 continuous actions."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
        self.scales = np.exp(np.linspace(np.log(0.1), np.log(10.0), 17)).astype(np.float32)

    def _observe(self) -> np.ndarray:
        self.observation = (self.np_random.standard_normal(17) * self.scales).astype(np.float32)
        return self.observation

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        self.t += 1
        reward = -float(np.sum((action - np.tanh(self.observation[:6])) ** 2))
        return self._observe(), reward, False, self.t >= 100, {}


def test_kfac_preconditioned_cg_needs_fewer_iterations_on_a_policy_fisher() -> None:
    model = TRPO("MlpPolicy", DummyVecEnv([ScaledObservationEnv]), n_steps=1024, seed=0, cg_preconditioner="kfac")
    model.learn(2048)
    data = next(model.rollout_buffer.get(batch_size=None))
    actor, _ = model._split_parameters(data.observations)
    kfac = model._kfac
    with kfac.collect():
        distribution = model.policy.get_distribution(data.observations)
    log_prob = distribution.log_prob(data.actions)
    gradient = flat_concat(th.autograd.grad((data.advantages * log_prob).mean(), actor, retain_graph=True))
    assert kfac.update_statistics(-log_prob.sum())
    kfac.update_curvature()
    fisher = GaussNewtonFisher(distribution, actor, damping=model.cg_damping)

    def preconditioner(vector: th.Tensor) -> th.Tensor:
        return flat_concat(kfac.precondition(actor, split_like(vector, actor)))

    plain = conjugate_gradient(fisher, gradient, max_iter=300, relative_tol=1e-3)
    preconditioned = conjugate_gradient(
        fisher, gradient, max_iter=300, relative_tol=1e-3, preconditioner=preconditioner
    )
    assert plain.relative_residual <= 1e-3 and preconditioned.relative_residual <= 1e-3
    assert preconditioned.iterations <= 0.7 * plain.iterations, (preconditioned.iterations, plain.iterations)
    # Both solve the same system.
    assert th.allclose(preconditioned.solution, plain.solution, rtol=0.05, atol=1e-3 * plain.solution.abs().max().item())


class RecordSolves:
    """Wraps TRPO's ``conjugate_gradient``, keeping every call's arguments and result."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, matvec, b, max_iter, preconditioner=None, **kwargs):
        result = conjugate_gradient(matvec, b, max_iter, preconditioner=preconditioner, **kwargs)
        self.calls.append(dict(matvec=matvec, b=b, max_iter=max_iter, preconditioner=preconditioner, result=result))
        return result


def dense_preconditioned_cg(a: th.Tensor, inverse: th.Tensor, b: th.Tensor, iterations: int) -> th.Tensor:
    """``iterations`` steps of textbook preconditioned CG from x = 0 on dense float64 matrices."""
    x = th.zeros_like(b)
    r = b.clone()
    z = inverse @ r
    d = z.clone()
    for _ in range(iterations):
        alpha = (r @ z) / (d @ a @ d)
        x, r_next = x + alpha * d, r - alpha * (a @ d)
        z_next = inverse @ r_next
        d = z_next + ((r_next @ z_next) / (r @ z)) * d
        r, z = r_next, z_next
    return x


def dense(operator, n: int) -> th.Tensor:
    return th.stack([operator(column) for column in th.eye(n)], dim=1).double()


def test_trpo_step_is_the_kfac_preconditioned_cg_solution(monkeypatch: pytest.MonkeyPatch) -> None:
    # Few CG iterations, far from convergence: the preconditioned and the plain iterates differ, and the step TRPO
    # takes must be the former.
    solves = RecordSolves()
    monkeypatch.setattr("sb3_trpo_kfac.trpo.trpo.conjugate_gradient", solves)
    model = TRPO(
        "MlpPolicy",
        DummyVecEnv([ScaledObservationEnv]),
        n_steps=256,
        cg_max_steps=3,
        n_critic_updates=0,
        cg_preconditioner="kfac",
        policy_kwargs={"net_arch": {"pi": [16], "vf": [16]}},
        seed=0,
    )
    snapshot = PolicySnapshot()
    model.learn(256, callback=snapshot)
    (call,) = solves.calls
    assert call["preconditioner"] is not None and call["max_iter"] == 3
    actor = model._actor_params
    n = sum(p.numel() for p in actor)
    # The preconditioner is K-FAC's inverse of the current batch's factors.
    vector = th.randn(n, generator=th.Generator().manual_seed(0))
    expected = flat_concat(model._kfac.precondition(actor, split_like(vector, actor)))
    th.testing.assert_close(call["preconditioner"](vector), expected)
    # The solution is preconditioned CG's, by a dense float64 oracle, and far from plain CG's.
    fisher, inverse, b = dense(call["matvec"], n), dense(call["preconditioner"], n), call["b"].double()
    oracle = dense_preconditioned_cg(fisher, inverse, b, call["result"].iterations)
    plain = dense_preconditioned_cg(fisher, th.eye(n, dtype=th.float64), b, call["result"].iterations)
    solution = call["result"].solution.double()
    assert call["result"].iterations == 3
    assert ((solution - oracle).norm() / oracle.norm()).item() < 1e-3
    assert ((plain - oracle).norm() / oracle.norm()).item() > 0.1
    # The parameters moved along that solution.
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    names = {id(p): name for name, p in model.policy.named_parameters()}
    step = flat_concat([p.detach() - snapshot.before[names[id(p)]] for p in actor]).double()
    cosine = (step @ solution / (step.norm() * solution.norm())).item()
    assert cosine > 1 - 1e-5, cosine


@pytest.mark.parametrize(
    "policy, make_env",
    [
        ("MlpPolicy", lambda: IdentityEnv(3)),
        ("MlpPolicy", lambda: IdentityEnvBox(-1, 1)),
        ("CnnPolicy", lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1)),
    ],
)
def test_trpo_with_kfac_preconditioner_trains(policy: str, make_env, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TRPO(
        policy,
        make_env(),
        n_steps=64,
        batch_size=32,
        n_critic_updates=1,
        cg_preconditioner="kfac",
        seed=0,
        policy_kwargs={"features_extractor_kwargs": {"features_dim": 16}} if policy == "CnnPolicy" else None,
    )
    solves = RecordSolves()
    monkeypatch.setattr("sb3_trpo_kfac.trpo.trpo.conjugate_gradient", solves)
    model.learn(192)
    assert len(solves.calls) == 3 and all(call["preconditioner"] is not None for call in solves.calls)
    assert model.logger.name_to_value["train/non_finite_step"] == 0.0
    assert model._kfac.counters["stats_updates"] == 3
    assert 0.0 <= model.logger.name_to_value["train/kl_divergence_loss"] <= model.target_kl * (1 + 1e-4)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_unknown_preconditioner_is_rejected() -> None:
    with pytest.raises(ValueError, match="cg_preconditioner"):
        TRPO("MlpPolicy", IdentityEnv(2), cg_preconditioner="jacobi")
