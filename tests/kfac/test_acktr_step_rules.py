"""
ACKTR with the step rule named in ``policy_kwargs`` (A2C's ``optimizer_class`` / ``optimizer_kwargs``): SB3's own tests
of a custom optimizer on an on-policy algorithm (tests/test_custom_policy.py: test_custom_optimizer,
test_tf_like_rmsprop_optimizer), ported to ACKTR, and what ACKTR adds: the step rule steps on K-FAC's direction and
its state is saved with the model.
"""

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

from sb3_trpo_kfac import ACKTR
from sb3_trpo_kfac.common.kfac.optimizer import OptimizerRule


def _step_rule(model: ACKTR) -> th.optim.Optimizer:
    rule = model.policy.optimizer._step_rule
    assert isinstance(rule, OptimizerRule)
    return rule.optimizer


@pytest.mark.parametrize("optimizer_kwargs", [None, dict(weight_decay=0.0)])
def test_custom_optimizer(optimizer_kwargs):
    policy_kwargs = dict(optimizer_class=th.optim.AdamW, optimizer_kwargs=optimizer_kwargs, net_arch=[32])
    model = ACKTR(
        "MlpPolicy", "Pendulum-v1", policy_kwargs=policy_kwargs, n_steps=64, learning_rate=1e-3, seed=0, device="cpu"
    )
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(300)
    inner = _step_rule(model)
    assert isinstance(inner, th.optim.AdamW)
    # the keywords as SB3's policy resolved them: given, or AdamW's defaults
    assert inner.param_groups[0]["weight_decay"] == (0.0 if optimizer_kwargs else 1e-2)
    assert inner.param_groups[0]["lr"] == 1e-3
    updates = model.policy.optimizer.counters["updates"]
    assert updates == 320 // 64 and all(int(inner.state[p]["step"]) == updates for p in model.policy.parameters())
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert all(not th.equal(p, q) for p, q in zip(model.policy.parameters(), before))


def test_tf_like_rmsprop_optimizer():
    policy_kwargs = dict(optimizer_class=RMSpropTFLike, net_arch=[32])
    model = ACKTR("MlpPolicy", "Pendulum-v1", policy_kwargs=policy_kwargs, learning_rate=1e-3, seed=0, device="cpu")
    model.learn(500)
    inner = _step_rule(model)
    assert isinstance(inner, RMSpropTFLike) and inner.param_groups[0]["lr"] == model.lr_schedule(1)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert model.policy.optimizer.counters["updates"] == 500 // 20


def test_the_step_rule_gets_the_trust_region_scaled_natural_gradient(monkeypatch):
    model = ACKTR(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        n_steps=8,
        kfac_clip=1e-6,
        learning_rate=0.01,
        policy_kwargs=dict(net_arch=[8], optimizer_class=th.optim.SGD),
        seed=0,
        device="cpu",
    )
    optimizer, inner = model.policy.optimizer, _step_rule(model)
    seen = []
    original = inner.step

    def recording_step(*args, **kwargs):
        groups = optimizer.preconditioner._group_buffers()
        nu = optimizer.last_nu[0]
        expected = [nu * view for view in groups[0].direction_views]
        seen.append(all(th.equal(p.grad, e) for p, e in zip(groups[0].params, expected)) and nu < 1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(inner, "step", recording_step)
    model.learn(8 * 2 * 3)
    assert seen == [True] * 3  # .grad held ν V, ν < 1, when the step rule stepped


def test_save_load_carries_the_step_rule_state(tmp_path):
    def make_env():
        return make_vec_env("CartPole-v1", n_envs=2, seed=0)

    kwargs = dict(
        n_steps=8, kfac_update=2, learning_rate=0.01, seed=0, device="cpu",
        policy_kwargs=dict(net_arch=[8], optimizer_class=th.optim.Adam, optimizer_kwargs=dict(betas=(0.8, 0.95))),
    )  # fmt: skip
    model = ACKTR("MlpPolicy", make_env(), **kwargs)
    model.learn(64)
    model.save(tmp_path / "acktr")
    loaded = ACKTR.load(tmp_path / "acktr", env=make_env(), device="cpu")
    ours, theirs = _step_rule(loaded), _step_rule(model)
    assert (
        ours.param_groups[0]["betas"] == (0.8, 0.95)
        and ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
    )
    for state, other in zip(ours.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert all(th.equal(th.as_tensor(state[key]), th.as_tensor(other[key])) for key in state)
    for m in (model, loaded):
        m.set_random_seed(1)
        m.learn(64)
    assert all(th.equal(p, q) for p, q in zip(model.policy.parameters(), loaded.policy.parameters()))
