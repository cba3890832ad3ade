import copy
import inspect

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.policies import ActorCriticPolicy

import sb3_trpo_kfac.common.fisher as fisher_module
from sb3_trpo_kfac import ACKTR, TRPO

SMALL = dict(n_steps=64, batch_size=32, n_critic_updates=2, cg_max_steps=5, seed=0)

ENV_CASES = {
    "discrete": (lambda: IdentityEnv(4), "MlpPolicy", {}),
    "box": (lambda: IdentityEnvBox(-1, 1), "MlpPolicy", {}),
    "multidiscrete": (lambda: IdentityEnvMultiDiscrete(3), "MlpPolicy", {}),
    "multibinary": (lambda: IdentityEnvMultiBinary(3), "MlpPolicy", {}),
    "gsde": (lambda: IdentityEnvBox(-1, 1), "MlpPolicy", {"use_sde": True, "sde_sample_freq": 4}),
    "cnn_shared": (
        lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True),
        "CnnPolicy",
        {"policy_kwargs": {"features_extractor_kwargs": {"features_dim": 16}}},
    ),
    "cnn_separate_box": (
        lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=False),
        "CnnPolicy",
        {"policy_kwargs": {"share_features_extractor": False, "features_extractor_kwargs": {"features_dim": 16}}},
    ),
    "multi_input": (lambda: SimpleMultiObsEnv(random_start=True), "MultiInputPolicy", {}),
    "mlp_separate": (lambda: IdentityEnv(3), "MlpPolicy", {"policy_kwargs": {"share_features_extractor": False}}),
}


class PolicySnapshot(BaseCallback):
    """Copies the policy when a rollout ends, i.e. just before ``train()``."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.before = copy.deepcopy(self.model.policy.state_dict())


def true_mean_kl(model: TRPO, old_state: dict) -> float:
    """KL(π_old ‖ π_new) over the last rollout, summed over action dimensions, computed independently."""
    observations = next(model.rollout_buffer.get(batch_size=None)).observations
    new_state = copy.deepcopy(model.policy.state_dict())
    with th.no_grad():
        new = copy.copy(model.policy.get_distribution(observations))
        model.policy.load_state_dict(old_state)
        old = model.policy.get_distribution(observations)
        kl = kl_divergence(old, new)
    model.policy.load_state_dict(new_state)
    return kl.reshape(kl.shape[0], -1).sum(dim=1).mean().item()


@pytest.mark.parametrize("case", sorted(ENV_CASES))
def test_every_space_and_policy_trains_within_trust_region(case: str) -> None:
    make_env, policy, kwargs = ENV_CASES[case]
    model = TRPO(policy, make_env(), target_kl=0.02, **SMALL, **kwargs)
    snapshot = PolicySnapshot()
    model.learn(total_timesteps=3 * SMALL["n_steps"], callback=snapshot)
    assert model.logger.name_to_value["train/non_finite_step"] == 0.0
    kl = true_mean_kl(model, snapshot.before)
    if model.logger.name_to_value["train/is_line_search_success"] == 1.0:
        assert 0.0 < kl <= 0.02 * (1 + 1e-4)
    else:
        assert kl == 0.0
    for param in model.policy.parameters():
        assert th.isfinite(param).all()


def test_line_search_accepts_full_step_on_cartpole_and_kl_bound_holds() -> None:
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, target_kl=0.01, seed=1)
    snapshot = PolicySnapshot()
    model.learn(total_timesteps=256, callback=snapshot)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    kl = true_mean_kl(model, snapshot.before)
    assert 0.002 < kl <= 0.01 * (1 + 1e-4)
    # The logged KL is the KL of the accepted step.
    assert model.logger.name_to_value["train/kl_divergence_loss"] == pytest.approx(kl, rel=1e-3)
    assert model.logger.name_to_value["train/cg_residual"] < 1.0


class RenamedPolicy(ActorCriticPolicy):
    """A custom policy none of whose parameter names contains 'value'."""

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        head = self._modules.pop("value_net")
        self.critic_head = head
        trunk = self.mlp_extractor._modules.pop("value_net")
        self.mlp_extractor.critic_trunk = trunk

    def __getattr__(self, name: str):
        if name == "value_net" and "critic_head" in self.__dict__["_modules"]:
            return self.__dict__["_modules"]["critic_head"]
        return super().__getattr__(name)


def test_structural_split_on_renamed_policy_and_critic_never_moves_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    from stable_baselines3.common.torch_layers import MlpExtractor

    monkeypatch.setattr(
        MlpExtractor, "forward_critic", lambda self, features: self._modules["critic_trunk"](features), raising=True
    )
    model = TRPO(RenamedPolicy, IdentityEnv(3), **SMALL)
    assert not any("value" in name for name, _ in model.policy.named_parameters())
    # Block the policy step: only the critic update may run, and it must leave every actor parameter alone.
    monkeypatch.setattr(model, "_policy_step", lambda *args: {k: 0.0 for k in ("policy_objective", "kl_divergence_loss", "is_line_search_success", "line_search_step_fraction", "non_finite_step", "zero_gradient_step", "cg_residual")})
    snapshot = PolicySnapshot()
    model.learn(total_timesteps=SMALL["n_steps"], callback=snapshot)
    critic = model._critic_params
    names = {id(p): n for n, p in model.policy.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in critic} >= {"critic_head"}
    assert all("critic" in names[id(p)] for p in critic)
    after = model.policy.state_dict()
    for name, value in snapshot.before.items():
        moved = not th.equal(value, after[name])
        assert moved == ("critic" in name), name


def test_shared_cnn_extractor_belongs_to_actor() -> None:
    make_env, policy, kwargs = ENV_CASES["cnn_shared"]
    model = TRPO(policy, make_env(), **SMALL, **kwargs)
    model.learn(total_timesteps=SMALL["n_steps"])
    extractor = {id(p) for p in model.policy.features_extractor.parameters()}
    assert extractor <= {id(p) for p in model._actor_params}
    assert extractor.isdisjoint({id(p) for p in model._critic_params})


def test_fisher_subsample_and_sub_sampling_factor_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # The MLP actor's Fisher products take the per-sample Jacobian path, on the subsample (256 / 2 * 0.2 = 26 rows).
    built = []
    original = fisher_module.LinearLayerFisher.__init__
    monkeypatch.setattr(
        fisher_module.LinearLayerFisher,
        "__init__",
        lambda self, blocks, *args, **kwargs: built.append(len(blocks[0][0])) or original(self, blocks, *args, **kwargs),
    )
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, fisher_subsample=0.2, sub_sampling_factor=2, seed=0)
    model.learn(total_timesteps=512)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert built == [26, 26]


class PoisonAdvantages(BaseCallback):
    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.before = copy.deepcopy(self.model.policy.state_dict())
        self.model.rollout_buffer.advantages[:] = np.nan


def test_non_finite_step_leaves_policy_unchanged() -> None:
    model = TRPO("MlpPolicy", IdentityEnvBox(-1, 1), n_critic_updates=0, **{k: v for k, v in SMALL.items() if k != "n_critic_updates"})
    poison = PoisonAdvantages()
    model.learn(total_timesteps=SMALL["n_steps"], callback=poison)
    assert model.logger.name_to_value["train/non_finite_step"] == 1.0
    assert model.logger.name_to_value["train/is_line_search_success"] == 0.0
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, poison.before[name]), name


def test_save_load_predict_identical_and_optimizer_state(tmp_path) -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", use_sde=True, n_steps=128, batch_size=64, seed=0)
    model.learn(total_timesteps=256)
    model.save(tmp_path / "trpo")
    loaded = TRPO.load(tmp_path / "trpo")
    observations = np.stack([model.observation_space.sample() for _ in range(10)])
    np.testing.assert_array_equal(
        model.predict(observations, deterministic=True)[0], loaded.predict(observations, deterministic=True)[0]
    )
    saved_state = model.policy.optimizer.state_dict()["state"]
    loaded_state = loaded.policy.optimizer.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys() and len(saved_state) > 0
    for key in saved_state:
        assert th.equal(saved_state[key]["exp_avg"], loaded_state[key]["exp_avg"])
    assert loaded.fisher_subsample == model.fisher_subsample and loaded.target_kl == model.target_kl
    # Training continues after loading.
    loaded.set_env(model.get_env())
    loaded.learn(total_timesteps=128, reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 128


def test_accepts_every_sb3_contrib_keyword_with_same_default() -> None:
    ours = inspect.signature(TRPO.__init__).parameters
    theirs = inspect.signature(ContribTRPO.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name


def test_critic_optimizer_matches_sb3_contrib_but_fused() -> None:
    ours = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, learning_rate=3e-4)
    theirs = ContribTRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, learning_rate=3e-4)
    (our_group,), (their_group,) = ours.policy.optimizer.param_groups, theirs.policy.optimizer.param_groups
    assert type(ours.policy.optimizer) is type(theirs.policy.optimizer) is th.optim.Adam
    assert our_group["fused"] and not their_group["fused"]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
        assert our_group[key] == their_group[key], key
    assert our_group["eps"] == 1e-5  # SB3's Adam default for policies
    # A user's optimizer_kwargs are left as given.
    custom = TRPO("MlpPolicy", "CartPole-v1", n_steps=64, policy_kwargs=dict(optimizer_kwargs=dict(eps=1e-3)))
    assert custom.policy.optimizer.param_groups[0]["eps"] == 1e-3


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(target_kl=0.0), ValueError, "target_kl"),
        (dict(target_kl=-1.0), ValueError, "target_kl"),
        (dict(cg_max_steps=0), ValueError, "cg_max_steps"),
        (dict(cg_max_steps=2.5), TypeError, "cg_max_steps"),
        (dict(cg_damping=-0.1), ValueError, "cg_damping"),
        (dict(line_search_shrinking_factor=1.0), ValueError, "line_search_shrinking_factor"),
        (dict(line_search_max_iter=0), ValueError, "line_search_max_iter"),
        (dict(n_critic_updates=-1), ValueError, "n_critic_updates"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size="64"), TypeError, "batch_size"),
        (dict(fisher_subsample=0.0), ValueError, "fisher_subsample"),
        (dict(fisher_subsample=1.5), ValueError, "fisher_subsample"),
        (dict(sub_sampling_factor=0), ValueError, "sub_sampling_factor"),
        (dict(gamma=1.5), ValueError, "gamma"),
        (dict(gae_lambda=-0.1), ValueError, "gae_lambda"),
        (dict(learning_rate=-1e-3), ValueError, "learning_rate"),
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(n_steps=1), ValueError, "n_steps"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        TRPO("MlpPolicy", IdentityEnv(2), **kwargs)


def test_policy_kwargs_of_the_caller_are_not_modified() -> None:
    policy_kwargs = {"net_arch": [8]}
    model = TRPO("MlpPolicy", IdentityEnv(2), n_steps=64, batch_size=32, policy_kwargs=policy_kwargs)
    assert policy_kwargs == {"net_arch": [8]}
    assert model.policy.optimizer.param_groups[0]["fused"]  # our default still reaches the policy
    # The same dict can be passed on; ACKTR refuses optimizer_kwargs, which the caller never gave.
    ACKTR("MlpPolicy", IdentityEnv(2), policy_kwargs=policy_kwargs)


class ScaleAdvantages(BaseCallback):
    """Multiplies the rollout's advantages (not its returns: the critic is unaffected) by ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.before = copy.deepcopy(self.model.policy.state_dict())
        self.model.rollout_buffer.advantages *= self.scale


def test_tiny_gradient_takes_the_same_step_as_a_large_one() -> None:
    # The natural step does not depend on the gradient's scale. 2^-27 (7e-9) scales exactly in floating point, so
    # the step must be bit for bit that of the unscaled advantages; conjugate gradient with an absolute tolerance
    # stopped at 0 iterations and the update was dropped as "non-finite".
    def train(scale: float) -> TRPO:
        model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, normalize_advantage=False, seed=1)
        model.learn(total_timesteps=256, callback=ScaleAdvantages(scale))
        return model

    reference, tiny = train(1.0), train(2.0**-27)
    for model in (reference, tiny):
        logged = model.logger.name_to_value
        assert logged["train/is_line_search_success"] == 1.0
        assert logged["train/non_finite_step"] == 0.0 and logged["train/zero_gradient_step"] == 0.0
        assert logged["train/cg_iterations"] > 1
    for (name, expected), actual in zip(reference.policy.state_dict().items(), tiny.policy.state_dict().values()):
        assert th.equal(expected, actual), name


def test_zero_gradient_is_logged_as_such_and_leaves_the_policy() -> None:
    kwargs = {**SMALL, "n_critic_updates": 0}
    model = TRPO("MlpPolicy", IdentityEnvBox(-1, 1), normalize_advantage=False, **kwargs)
    zero = ScaleAdvantages(0.0)
    model.learn(total_timesteps=SMALL["n_steps"], callback=zero)
    logged = model.logger.name_to_value
    assert logged["train/non_finite_step"] == 0.0 and logged["train/is_line_search_success"] == 0.0
    assert logged["train/zero_gradient_step"] == 1.0
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, zero.before[name]), name


class InjectNonFinite(gym.Wrapper):
    """Makes the reward, or one coordinate of the observation, of the ``at``-th step NaN or inf."""

    def __init__(self, env: gym.Env, kind: str, at: int) -> None:
        super().__init__(env)
        self.kind, self.at, self.t = kind, at, 0

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        if self.t == self.at:
            if self.kind == "nan_reward":
                reward = float("nan")
            elif self.kind == "inf_reward":
                reward = float("inf")
            else:
                observation = observation.copy()
                observation[0] = np.inf
        return observation, reward, terminated, truncated, info


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # explained_variance of inf returns
@pytest.mark.parametrize("kind", ["nan_reward", "inf_reward", "inf_observation"])
def test_non_finite_data_never_reaches_the_parameters(kind: str) -> None:
    # One bad step in the second rollout; before, it turned every critic parameter and Adam moment into NaN, and
    # every later policy step was skipped as non-finite.
    env = InjectNonFinite(gym.make("Pendulum-v1"), kind, at=70)
    model = TRPO("MlpPolicy", env, n_steps=64, batch_size=32, n_critic_updates=2, cg_max_steps=5, seed=0)
    model.learn(total_timesteps=128)

    def finite() -> bool:
        adam = [t for state in model.policy.optimizer.state.values() for t in state.values() if t.is_floating_point()]
        return all(th.isfinite(t).all() for t in [*model.policy.parameters(), *adam])

    assert finite()
    skipped = model.logger.name_to_value["train/critic_skipped_steps"]
    assert skipped > 0
    # Later, clean batches train both the critic and the policy.
    before = copy.deepcopy(model.policy.state_dict())
    model.learn(total_timesteps=128, reset_num_timesteps=False)
    assert finite()
    logged = model.logger.name_to_value
    assert logged["train/critic_skipped_steps"] == skipped
    assert logged["train/non_finite_step"] == 0.0 and np.isfinite(logged["train/value_loss"])
    after = model.policy.state_dict()
    moved = {name for name in before if not th.equal(before[name], after[name])}
    critic = {name for name, p in model.policy.named_parameters() if any(p is q for q in model._critic_params)}
    assert critic and critic <= moved
    assert moved - critic  # the actor moved too


class FirstCandidateRaises:
    """Wraps ``policy.get_distribution``: the first line-search candidate (a call without gradients) raises."""

    def __init__(self, policy: ActorCriticPolicy, error: Exception) -> None:
        self.get_distribution, self.error, self.raised = policy.get_distribution, error, False

    def __call__(self, observations):
        if not th.is_grad_enabled() and not self.raised:
            self.raised = True
            raise self.error
        return self.get_distribution(observations)


class Snapshot(PolicySnapshot):
    def __init__(self, patch=None) -> None:
        super().__init__()
        self.patch = patch

    def _on_rollout_end(self) -> None:
        super()._on_rollout_end()
        if self.patch is not None:
            self.model.policy.get_distribution = self.patch(self.model.policy)


def test_invalid_line_search_candidate_is_rejected_like_a_bad_one() -> None:
    # As torch's argument validation raises for a candidate whose scale overflowed: the next, shorter one is tried.
    model = TRPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, target_kl=0.01, seed=1)
    snapshot = Snapshot(lambda policy: FirstCandidateRaises(policy, ValueError("invalid scale")))
    model.learn(total_timesteps=256, callback=snapshot)
    assert model.logger.name_to_value["train/is_line_search_success"] == 1.0
    assert model.logger.name_to_value["train/line_search_step_fraction"] == pytest.approx(0.8)


def test_policy_is_restored_when_the_line_search_raises() -> None:
    model = TRPO("MlpPolicy", IdentityEnvBox(-1, 1), **{**SMALL, "n_critic_updates": 0})
    snapshot = Snapshot(lambda policy: FirstCandidateRaises(policy, RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        model.learn(total_timesteps=SMALL["n_steps"], callback=snapshot)
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, snapshot.before[name]), name


def test_huge_trust_region_never_leaves_an_invalid_policy() -> None:
    # target_kl=1e10: the full steps overflow log_std, and torch's validation of the candidate's Normal raised out
    # of the line search, leaving log_std at -25503.
    snapshot = PolicySnapshot()
    model = TRPO("MlpPolicy", IdentityEnvBox(-1, 1), target_kl=1e10, **SMALL)
    model.learn(total_timesteps=2 * SMALL["n_steps"], callback=snapshot)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    observations = next(model.rollout_buffer.get(batch_size=None)).observations
    with th.no_grad():
        model.policy.get_distribution(observations)  # validates: a finite, positive scale
    if model.logger.name_to_value["train/is_line_search_success"] == 0.0:
        actor = {name for name, p in model.policy.named_parameters() if any(p is q for q in model._actor_params)}
        after = model.policy.state_dict()
        assert all(th.equal(snapshot.before[name], after[name]) for name in actor)
