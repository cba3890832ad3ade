"""The Gauss-Newton Fisher-vector product against the dense Hessian of the KL, in float64."""

from collections.abc import Callable

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trpo_kfac.common.fisher import (
    GaussNewtonFisher,
    LinearLayerFisher,
    detached_distribution,
    flat_concat,
    gauss_newton_fisher,
    mean_kl,
    record_linear_calls,
)
from sb3_trpo_kfac.common.policy_parameters import split_actor_critic_parameters

OBSERVATION_SPACE = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)

ACTION_SPACES = {
    "discrete": (spaces.Discrete(4), {}),
    "box": (spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32), {}),
    "multidiscrete": (spaces.MultiDiscrete([2, 3]), {}),
    "multibinary": (spaces.MultiBinary(3), {}),
    "gsde": (spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32), {"use_sde": True}),
    "gsde_expln_shared_std": (
        spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
        {"use_sde": True, "use_expln": True, "full_std": False},
    ),
}


@pytest.fixture(autouse=True)
def _keep_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # SB3 casts Box observations to float32; the float64 oracle needs them left alone.
    monkeypatch.setattr("stable_baselines3.common.policies.preprocess_obs", lambda obs, *args, **kwargs: obs)


def make_policy(action_space: spaces.Space, kwargs: dict) -> ActorCriticPolicy:
    th.manual_seed(0)
    policy = ActorCriticPolicy(
        OBSERVATION_SPACE, action_space, lambda _: 1e-3, net_arch=dict(pi=[5], vf=[4]), log_std_init=-0.3, **kwargs
    ).double()
    if kwargs.get("use_sde"):
        # Make the state-dependent std depend visibly on the parameters.
        with th.no_grad():
            policy.log_std.normal_(0.0, 0.3)
    return policy


def dense_kl_hessian(policy: ActorCriticPolicy, observations: th.Tensor, params: list[th.nn.Parameter]) -> th.Tensor:
    """Hessian of mean KL(π_old ‖ π_θ) at θ = θ_old: the exact Fisher, by double backward, column by column."""
    distribution = policy.get_distribution(observations)
    kl = mean_kl(detached_distribution(distribution), distribution)
    grad = flat_concat(th.autograd.grad(kl, params, create_graph=True))
    rows = [
        flat_concat(th.autograd.grad(g, params, retain_graph=True, allow_unused=True, materialize_grads=True))
        for g in grad
    ]
    return th.stack(rows)


@pytest.mark.parametrize("implementation", [GaussNewtonFisher, LinearLayerFisher])
@pytest.mark.parametrize("name", sorted(ACTION_SPACES))
def test_fisher_vector_product_matches_dense_fisher(name: str, implementation: type) -> None:
    action_space, kwargs = ACTION_SPACES[name]
    policy = make_policy(action_space, kwargs)
    observations = th.randn(7, 3, dtype=th.float64, generator=th.Generator().manual_seed(1))
    if kwargs.get("use_sde"):
        policy.reset_noise(7)
    actor, critic = split_actor_critic_parameters(policy, observations)
    assert critic and actor

    dense = dense_kl_hessian(policy, observations, actor)
    if implementation is GaussNewtonFisher:
        fisher = GaussNewtonFisher(policy.get_distribution(observations), actor)
    else:
        with record_linear_calls(policy) as calls:
            distribution = policy.get_distribution(observations)
        fisher = gauss_newton_fisher(distribution, actor, linear_calls=calls)
        assert isinstance(fisher, LinearLayerFisher)  # the MLP policies all take the Jacobian path
    n = dense.shape[0]
    products = th.stack([fisher(column) for column in th.eye(n, dtype=th.float64)], dim=1)

    assert th.linalg.matrix_norm(dense).item() > 1e-3  # the oracle is not trivially zero
    relative_error = (th.linalg.matrix_norm(products - dense) / th.linalg.matrix_norm(dense)).item()
    assert relative_error <= 1e-6, relative_error


def test_fisher_damping_and_symmetry() -> None:
    policy = make_policy(spaces.Discrete(3), {})
    observations = th.randn(5, 3, dtype=th.float64)
    actor, _ = split_actor_critic_parameters(policy, observations)
    fisher = GaussNewtonFisher(policy.get_distribution(observations), actor, damping=0.5)
    n = sum(p.numel() for p in actor)
    u, v = th.randn(n, dtype=th.float64), th.randn(n, dtype=th.float64)
    undamped = GaussNewtonFisher(policy.get_distribution(observations), actor)
    assert th.allclose(fisher(v), undamped(v) + 0.5 * v)
    assert th.allclose(th.dot(u, fisher(v)), th.dot(v, fisher(u)))
    assert th.dot(v, undamped(v)).item() >= 0.0


def test_split_ignores_names_and_finds_shared_layers() -> None:
    # On SB3's MlpPolicy the structural split must agree with the names: actor and critic partition the parameters.
    policy = make_policy(spaces.Discrete(3), {})
    observations = th.randn(2, 3, dtype=th.float64)
    actor, critic = split_actor_critic_parameters(policy, observations)
    names = {id(p): n for n, p in policy.named_parameters()}
    assert all("value" in names[id(p)] for p in critic)
    assert not any("value" in names[id(p)] for p in actor)
    assert {id(p) for p in actor}.isdisjoint({id(p) for p in critic})
    assert len(actor) + len(critic) == len(list(policy.parameters()))


def _recorded_fisher(policy: th.nn.Module, observations: th.Tensor, actor: list, damping: float = 0.0):
    with record_linear_calls(policy) as calls:
        distribution = policy.get_distribution(observations)
    return gauss_newton_fisher(distribution, actor, damping=damping, linear_calls=calls)


def test_linear_layer_fisher_damping_and_shared_extractor() -> None:
    # A shared extractor layer feeds both heads; frozen bias: a layer may hold only some of the parameters.
    th.manual_seed(0)
    policy = ActorCriticPolicy(
        OBSERVATION_SPACE,
        spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
        lambda _: 1e-3,
        net_arch=[6],
        share_features_extractor=True,
    ).double()
    policy.mlp_extractor.policy_net[0].bias.requires_grad_(False)
    observations = th.randn(9, 3, dtype=th.float64)
    actor, _ = split_actor_critic_parameters(policy, observations)
    fisher = _recorded_fisher(policy, observations, actor, damping=0.3)
    assert isinstance(fisher, LinearLayerFisher)
    reference = GaussNewtonFisher(policy.get_distribution(observations), actor, damping=0.3)
    for vector in th.randn(3, sum(p.numel() for p in actor), dtype=th.float64):
        assert th.allclose(fisher(vector), reference(vector), rtol=1e-10, atol=1e-12)


def test_gauss_newton_fisher_falls_back_where_the_jacobian_path_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(spaces.Discrete(3), {})
    observations = th.randn(6, 3, dtype=th.float64)
    actor, _ = split_actor_critic_parameters(policy, observations)
    # Not recorded, or a layer called twice on the batch (the per-layer formula needs one call).
    assert isinstance(gauss_newton_fisher(policy.get_distribution(observations), actor), GaussNewtonFisher)
    with record_linear_calls(policy) as calls:
        policy.get_distribution(observations)
        distribution = policy.get_distribution(observations)
    assert isinstance(gauss_newton_fisher(distribution, actor, linear_calls=calls), GaussNewtonFisher)
    # Too many parameters outside Linear layers, or too large a Jacobian for the contractions to pay off.
    gaussian = make_policy(spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32), {})
    gaussian_actor, _ = split_actor_critic_parameters(gaussian, observations)
    assert isinstance(_recorded_fisher(gaussian, observations, gaussian_actor), LinearLayerFisher)
    monkeypatch.setattr("sb3_trpo_kfac.common.fisher.MAX_DIRECT_PARAMETERS", 1)  # log_std has 2
    assert isinstance(_recorded_fisher(gaussian, observations, gaussian_actor), GaussNewtonFisher)
    monkeypatch.setattr("sb3_trpo_kfac.common.fisher.MAX_JACOBIAN_ELEMENTS", 10)
    assert isinstance(_recorded_fisher(policy, observations, actor), GaussNewtonFisher)
    # A batch-mixing layer: nothing is recorded.
    policy.mlp_extractor.policy_net.append(th.nn.BatchNorm1d(5).double())
    with record_linear_calls(policy) as calls:
        policy.get_distribution(observations)
    assert calls == []


class TiedHead(th.nn.Module):
    """An action head reusing the first actor layer's weight, transposed (a tied encoder / decoder pair)."""

    def __init__(self, encoder: th.nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, latent: th.Tensor) -> th.Tensor:
        return th.nn.functional.linear(latent, self.encoder.weight.T)


class ScaledLinear(th.nn.Linear):
    """A Linear whose effective weight is not its ``weight`` (as in weight-normalized or low-rank adapted layers)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.scale = th.nn.Parameter(th.tensor(1.7))

    def forward(self, inputs: th.Tensor) -> th.Tensor:
        return th.nn.functional.linear(inputs, self.scale * self.weight, self.bias)


def _tie_head(policy: ActorCriticPolicy) -> None:
    policy.action_net = TiedHead(policy.mlp_extractor.policy_net[0])


def _scaled_head(policy: ActorCriticPolicy) -> None:
    policy.action_net = ScaledLinear(5, 3).double()


def _inplace_activation(policy: ActorCriticPolicy) -> None:
    policy.mlp_extractor.policy_net[1] = th.nn.ReLU(inplace=True)


@pytest.mark.parametrize("modify", [_tie_head, _scaled_head, _inplace_activation])
def test_gauss_newton_fisher_falls_back_where_linear_layers_do_not_explain_the_graph(modify: Callable) -> None:
    # Discrete(3) on 3 observations: the tied head maps the 5 latent units back to 3 logits with the encoder's weight.
    policy = make_policy(spaces.Discrete(3), {})
    observations = th.randn(7, 3, dtype=th.float64, generator=th.Generator().manual_seed(2))
    actor, _ = split_actor_critic_parameters(policy, observations)
    assert isinstance(_recorded_fisher(policy, observations, actor), LinearLayerFisher)  # SB3's MlpPolicy: fast path

    modify(policy)
    actor, _ = split_actor_critic_parameters(policy, observations)
    dense = dense_kl_hessian(policy, observations, actor)
    fisher = _recorded_fisher(policy, observations, actor)
    products = th.stack([fisher(column) for column in th.eye(dense.shape[0], dtype=th.float64)], dim=1)
    assert th.linalg.matrix_norm(dense).item() > 1e-3
    relative_error = (th.linalg.matrix_norm(products - dense) / th.linalg.matrix_norm(dense)).item()
    assert relative_error <= 1e-6, relative_error
    assert isinstance(fisher, GaussNewtonFisher)
