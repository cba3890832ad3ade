"""Telling a policy's actor and critic parameters apart by what they influence, not by their names."""

from collections.abc import Callable, Sequence
from typing import cast

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import get_obs_shape
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_trpo_kfac.common.fisher import fisher_blocks


def index_observations(observations: PyTorchObs, index: slice | th.Tensor) -> PyTorchObs:
    """Select rows of a (possibly dict) observation batch."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def zero_observations(observation_space: spaces.Space, n: int, device: th.device | str = "cpu") -> PyTorchObs:
    """A batch of ``n`` all-zero observations as the rollout buffer stores them (for tracing a forward pass)."""
    shape = get_obs_shape(observation_space)
    if isinstance(shape, dict):
        return {key: th.zeros((n, *sub_shape), device=device) for key, sub_shape in shape.items()}
    return th.zeros((n, *shape), device=device)


def split_actor_critic_parameters(
    policy: ActorCriticPolicy, observations: PyTorchObs
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """
    Actor parameters are those the action distribution depends on (shared extractor layers included); critic
    parameters are those only the value depends on. Found through the autograd graph of one small forward pass.

    :param policy: the actor-critic policy
    :param observations: a (small) batch of observations
    :return: actor parameters, critic parameters, each in ``policy.parameters()`` order
    """
    params = [p for p in policy.parameters() if p.requires_grad]

    def reached_by(outputs: list[th.Tensor]) -> set[int]:
        total = sum(output.sum() for output in outputs)
        grads = th.autograd.grad(total, params, allow_unused=True)
        return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}

    with th.enable_grad():
        actor_ids = reached_by([output for output, _ in fisher_blocks(policy.get_distribution(observations))])
        value_ids = reached_by([policy.predict_values(observations)])
    actor = [p for p in params if id(p) in actor_ids]
    critic = [p for p in params if id(p) in value_ids and id(p) not in actor_ids]
    return actor, critic


def frozen_features_value_fn(
    policy: ActorCriticPolicy, observations: PyTorchObs, critic_params: Sequence[nn.Parameter]
) -> tuple[PyTorchObs, Callable[[PyTorchObs], th.Tensor]]:
    """
    What a critic fit that moves only ``critic_params`` evaluates, repeatedly, on ``observations``: when the policy
    computes its values as ``ActorCriticPolicy.predict_values`` does, from a features extractor it shares with the
    actor and that the fit does not move, the features are computed once here, without a graph, and the value
    function maps them to values; otherwise the inputs are the observations and the function is the policy's own
    ``predict_values`` (a policy that overrides it, e.g. adding a learned offset, is always honoured).

    :param policy: the actor-critic policy
    :param observations: the batch the critic is fitted on
    :param critic_params: the parameters the critic fit updates
    :return: ``(inputs, predict)``: ``predict(index_observations(inputs, rows))`` are the values of those rows
    """
    critic_ids = {id(p) for p in critic_params}
    frozen = (
        type(policy).predict_values is ActorCriticPolicy.predict_values
        and policy.share_features_extractor
        and not any(id(p) in critic_ids for p in policy.features_extractor.parameters())
    )
    if not frozen:
        return observations, policy.predict_values
    with th.no_grad():
        # the extraction ActorCriticPolicy.predict_values does (BasePolicy's, preprocessing included)
        features = BasePolicy.extract_features(policy, observations, policy.features_extractor)

    def predict(batch: PyTorchObs) -> th.Tensor:
        return policy.value_net(policy.mlp_extractor.forward_critic(cast(th.Tensor, batch)))

    return features, predict
