"""ACKTR's ``target_kl``: the step-size rule, the KL it measures, what the factor scales, save/load, off = unchanged."""

import math

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvBox
from torch import nn

from sb3_trpo_kfac import ACKTR, KFAC
from sb3_trpo_kfac.common.adaptive_step import (
    KL_STEP_FACTOR_MAX,
    KL_STEP_FACTOR_MIN,
    adapt_kl_step_factor,
    scale_kfac_step,
)

TINY = dict(net_arch=dict(pi=[8], vf=[8]))


@pytest.mark.parametrize(
    "kl, expected",
    [
        (0.0041, 2.0 / 1.5),  # above 2 · target: shrink
        (0.004, 2.0),  # at 2 · target: hold
        (0.002, 2.0),
        (0.001, 2.0),  # at target / 2: hold
        (0.00099, 3.0),  # below target / 2: grow
        (math.nan, 2.0),  # not finite: hold
        (math.inf, 2.0),
    ],
)
def test_rule_shrinks_grows_and_holds_at_the_thresholds(kl, expected) -> None:
    assert adapt_kl_step_factor(2.0, kl, 0.002) == pytest.approx(expected, rel=1e-15)


def test_rule_is_clamped() -> None:
    assert adapt_kl_step_factor(KL_STEP_FACTOR_MAX, 0.0, 0.002) == KL_STEP_FACTOR_MAX
    assert adapt_kl_step_factor(KL_STEP_FACTOR_MAX / 1.2, 0.0, 0.002) == KL_STEP_FACTOR_MAX
    assert adapt_kl_step_factor(KL_STEP_FACTOR_MIN, 1.0, 0.002) == KL_STEP_FACTOR_MIN
    assert adapt_kl_step_factor(KL_STEP_FACTOR_MIN * 1.2, 1.0, 0.002) == KL_STEP_FACTOR_MIN


@pytest.mark.parametrize("kfac_clip", [1e-6, 1e3], ids=["binding", "not-binding"])
def test_scaled_group_steps_factor_times_further_with_momentum(kfac_clip) -> None:
    """
    η ← f η, κ ← f² κ: ν unchanged, every step (momentum buffer included) f times, trust region binding or not. The
    momentum buffers (in units of ν V) are the same in both; the parameters are reset equal before each step.
    """
    factor = 2.5
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    models = [model, nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()]
    models[1].load_state_dict(model.state_dict())
    optimizers = [KFAC(m, lr=0.1, kfac_clip=kfac_clip) for m in models]
    x = th.randn(16, 3, dtype=th.float64)
    for step in range(3):  # momentum carries the earlier steps
        deltas, nus = [], []
        models[1].load_state_dict(models[0].state_dict())  # the same gradients and statistics; the states differ
        for m, optimizer, f in zip(models, optimizers, (1.0, factor)):
            scale_kfac_step(optimizer.param_groups[0], 0.1, kfac_clip, f)
            with optimizer.collect():
                out = m(x)
            optimizer.update_statistics(th.distributions.Categorical(logits=out).log_prob(th.zeros(16)).sum().neg())
            optimizer.zero_grad()
            (out[:, 0] * (step + 1)).square().mean().backward()
            before = [p.detach().clone() for p in m.parameters()]
            optimizer.step()
            deltas.append(th.cat([(p - b).flatten() for p, b in zip(m.parameters(), before)]))
            nus.append(optimizer.last_nu[0])
        assert nus[0] == pytest.approx(nus[1], rel=1e-12)
        assert (nus[0] < 1.0) == (kfac_clip < 1.0)
        th.testing.assert_close(deltas[1], factor * deltas[0], rtol=1e-9, atol=1e-15)


def _probe(model: ACKTR) -> list[dict[str, th.Tensor]]:
    """The policy's parameters after each rollout, i.e. before each update."""
    snapshots = []

    class Snapshot(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.policy.state_dict().items()})

    model.learn(model.n_steps * model.n_envs, callback=Snapshot())
    return snapshots


def _actor_output(state: dict[str, th.Tensor], obs: th.Tensor) -> th.Tensor:
    hidden = th.tanh(obs @ state["mlp_extractor.policy_net.0.weight"].T + state["mlp_extractor.policy_net.0.bias"])
    return hidden @ state["action_net.weight"].T + state["action_net.bias"]


@pytest.mark.parametrize("kind", ["Box", "Discrete"])
def test_measured_kl_is_the_mean_kl_of_old_to_new_on_the_batch(kind) -> None:
    """The logged KL against a float64 computation by hand from the parameters before and after the update."""
    env = IdentityEnvBox(eps=0.5) if kind == "Box" else IdentityEnv(3)
    kwargs = dict(n_steps=32, learning_rate=2.0, kfac_clip=1.0, target_kl=0.01, policy_kwargs=TINY, seed=0)
    model = ACKTR("MlpPolicy", env, device="cpu", **kwargs)
    (old,) = _probe(model)
    new = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    obs = th.as_tensor(model.rollout_buffer.observations, dtype=th.float64).reshape(32, -1)
    if kind == "Discrete":
        obs = nn.functional.one_hot(obs.long().flatten(), 3).double()
    old, new = ({k: v.double() for k, v in s.items()} for s in (old, new))
    if kind == "Box":  # diagonal Gaussians: sum over action dimensions
        mu0, mu1, s0, s1 = _actor_output(old, obs), _actor_output(new, obs), old["log_std"].exp(), new["log_std"].exp()
        expected = (th.log(s1 / s0) + (s0**2 + (mu0 - mu1) ** 2) / (2 * s1**2) - 0.5).sum(dim=1).mean()
    else:
        p0 = th.log_softmax(_actor_output(old, obs), dim=1)
        p1 = th.log_softmax(_actor_output(new, obs), dim=1)
        expected = (p0.exp() * (p0 - p1)).sum(dim=1).mean()
    assert expected > 1e-4  # the policy moved (far enough for float32 to resolve the KL)
    assert model.logger.name_to_value["train/kl"] == pytest.approx(float(expected), rel=1e-4)
    assert model.logger.name_to_value["train/kl_step_factor"] == 1.0
    assert model.kl_step_factor == adapt_kl_step_factor(1.0, float(expected), 0.01)


def test_factor_scales_the_policy_group_only() -> None:
    model = ACKTR(
        "MlpPolicy", IdentityEnvBox(eps=0.5), n_steps=16, learning_rate=0.2, kfac_clip=0.01, vf_kfac_clip=0.03,
        target_kl=1e-9, policy_kwargs=TINY, seed=0, device="cpu",
    )  # fmt: skip
    model.kl_step_factor = 2.0
    model.learn(16)
    actor, critic = model.policy.optimizer.param_groups
    assert actor["lr"] == 0.4 and actor["kfac_clip"] == pytest.approx(0.04, rel=1e-15)
    assert critic["lr"] == 0.2 and critic["kfac_clip"] == 0.03
    assert model.kl_step_factor == pytest.approx(2.0 / 1.5)  # KL above 2e-9


def test_off_by_default_and_the_first_update_is_the_defaults() -> None:
    """Off: no extra forward, no factor in the groups. On: update 1 (f = 1) is the default's bit for bit."""
    kwargs = dict(n_steps=16, n_critic_updates=3, policy_kwargs=TINY, seed=0, device="cpu")
    models = []
    calls = []
    for target_kl in (None, 0.5):  # built and trained one after the other: the seed sets torch's global generator
        model = ACKTR("MlpPolicy", IdentityEnvBox(eps=0.5), target_kl=target_kl, **kwargs)
        original = model.policy.get_distribution

        def counted(obs, original=original, target_kl=target_kl):
            calls.append(target_kl)
            return original(obs)

        model.policy.get_distribution = counted  # type: ignore[method-assign]
        model.learn(16)
        models.append(model)
    off, on = models
    assert calls == [0.5, 0.5]  # before and after the update (the rollout calls forward())
    assert "train/kl" not in off.logger.name_to_value
    for p, q in zip(off.policy.parameters(), on.policy.parameters(), strict=True):
        assert th.equal(p, q)
    assert on.kl_step_factor == 1.5  # a KL far below 0.25: grown for the next update


def test_a_skipped_step_holds_the_factor(monkeypatch) -> None:
    model = ACKTR("MlpPolicy", IdentityEnv(3), n_steps=16, target_kl=0.01, policy_kwargs=TINY, seed=0, device="cpu")
    optimizer = model.policy.optimizer

    def skipped_step(*args, **kwargs):
        optimizer.counters.skipped_steps += 1

    monkeypatch.setattr(optimizer, "step", skipped_step)
    model.learn(16)
    assert model.logger.name_to_value["train/kl"] == 0.0
    assert model.kl_step_factor == 1.0


def test_save_load_continues_bit_for_bit(tmp_path) -> None:
    def make_env():
        return make_vec_env("Pendulum-v1", n_envs=2, seed=0)

    kwargs = dict(n_steps=16, kfac_clip=0.01, target_kl=0.002, policy_kwargs=TINY, seed=0, device="cpu")
    model = ACKTR("MlpPolicy", make_env(), **kwargs)
    model.learn(32 * 4)
    factor = model.kl_step_factor
    assert factor != 1.0
    model.save(tmp_path / "acktr")
    loaded = ACKTR.load(tmp_path / "acktr", env=make_env(), device="cpu")
    assert loaded.kl_step_factor == factor and loaded.target_kl == 0.002
    factors = []
    for m in (model, loaded):
        m.set_random_seed(1)
        m.learn(32 * 4)
        factors.append(m.kl_step_factor)
    assert factors[0] == factors[1]
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True):
        assert th.equal(p, q)
    assert np.isfinite(model.logger.name_to_value["train/kl"])


def test_the_factor_follows_the_kl_averaged_over_ranks(monkeypatch) -> None:
    """Data-parallel: every rank adapts on the mean over ranks (stood in for by a KL far above the target)."""
    import sb3_trpo_kfac.acktr.acktr as acktr_module

    reduced = []

    def mean_over_ranks(tensor):
        reduced.append(float(tensor))
        return th.tensor(1.0)

    monkeypatch.setattr(acktr_module, "mean_over_ranks", mean_over_ranks)
    model = ACKTR("MlpPolicy", IdentityEnv(3), n_steps=16, target_kl=0.01, policy_kwargs=TINY, seed=0, device="cpu")
    model.learn(16)
    assert len(reduced) == 1 and reduced[0] < 0.005  # the local KL would have grown the factor
    assert model.logger.name_to_value["train/kl"] == 1.0
    assert model.kl_step_factor == pytest.approx(1 / 1.5)
