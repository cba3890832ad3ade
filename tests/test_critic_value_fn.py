"""The critic fits of TRPO and ACKTR evaluate the policy's own value function (``frozen_features_value_fn``)."""

import pytest
import torch as th
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnv
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy
from torch.nn import functional as F

from sb3_trpo_kfac import ACKTR, TRPO
from sb3_trpo_kfac.common.policy_parameters import frozen_features_value_fn, index_observations


class OffsetValuePolicy(ActorCriticPolicy):
    """A custom value: SB3's plus a learned offset, which only ``predict_values`` applies."""

    def _build(self, lr_schedule) -> None:
        self.value_offset = th.nn.Parameter(th.zeros(1))
        super()._build(lr_schedule)  # the optimizer it builds includes the offset

    def predict_values(self, obs) -> th.Tensor:
        return super().predict_values(obs) + self.value_offset


def _value_loss(model: TRPO | ACKTR, observations: th.Tensor, returns: th.Tensor) -> float:
    with th.no_grad():
        return F.mse_loss(returns, model.policy.predict_values(observations).flatten()).item()


def test_acktr_extra_critic_steps_fit_an_overridden_predict_values() -> None:
    model = ACKTR(OffsetValuePolicy, IdentityEnv(3), n_steps=16, n_critic_updates=4, seed=0, device="cpu")
    model.learn(16)
    assert any(p is model.policy.value_offset for p in model._critic_params)
    data = next(model.rollout_buffer.get(batch_size=None))
    returns = data.returns + 5.0  # far from the values: the offset has something to fit
    before = _value_loss(model, data.observations, returns)
    model._fit_critic(data.observations, returns)
    # The steps followed the gradient of the policy's own value function, offset included.
    assert model.policy.value_offset.item() > 0.0
    assert _value_loss(model, data.observations, returns) < before


def test_trpo_critic_fits_an_overridden_predict_values() -> None:
    model = TRPO(OffsetValuePolicy, IdentityEnv(3), n_steps=64, batch_size=32, n_critic_updates=3, seed=0, device="cpu")
    model.learn(64)
    data = next(model.rollout_buffer.get(batch_size=None))
    returns = data.returns + 5.0
    before = _value_loss(model, data.observations, returns)
    model._fit_critic(data.observations, returns)
    assert model.policy.value_offset.item() > 0.0
    assert _value_loss(model, data.observations, returns) < before


def _model(policy_class: type, **policy_kwargs) -> TRPO:
    if policy_class is ActorCriticCnnPolicy:
        env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1)
        policy_kwargs["features_extractor_kwargs"] = {"features_dim": 16}
    else:
        env = IdentityEnv(3)
    model = TRPO(policy_class, env, n_steps=16, batch_size=8, policy_kwargs=policy_kwargs, seed=0, device="cpu")
    return model.learn(16)


@pytest.mark.parametrize("policy_class", [ActorCriticPolicy, ActorCriticCnnPolicy])
def test_frozen_features_give_the_policys_values(policy_class: type) -> None:
    # SB3's own value function with a shared extractor: features computed once, the same values as predict_values.
    model = _model(policy_class)
    observations = next(model.rollout_buffer.get(batch_size=None)).observations
    _, critic = model._split_parameters(observations)
    inputs, predict = frozen_features_value_fn(model.policy, observations, critic)
    assert inputs is not observations and not inputs.requires_grad
    rows = th.tensor([3, 0, 7])
    th.testing.assert_close(predict(index_observations(inputs, rows)), model.policy.predict_values(observations[rows]))


def test_predict_values_is_called_where_features_are_not_frozen() -> None:
    offset = _model(OffsetValuePolicy)
    cnn = _model(ActorCriticCnnPolicy)
    separate = _model(ActorCriticCnnPolicy, share_features_extractor=False)
    for model, moved in [
        (offset, []),  # predict_values overridden
        (cnn, list(cnn.policy.features_extractor.parameters())),  # the critic fit would move the shared extractor
        (separate, []),  # the critic has its own extractor
    ]:
        observations = next(model.rollout_buffer.get(batch_size=None)).observations
        _, critic = model._split_parameters(observations)
        inputs, predict = frozen_features_value_fn(model.policy, observations, [*critic, *moved])
        assert inputs is observations and predict == model.policy.predict_values
