"""
Constructor arguments of TRPO, ACKTR and KFAC: every keyword refuses a bad value at construction, before the
environment is built, with an error naming it that is both a ValueError / TypeError and an AssertionError (what
sb3-contrib raises); every value the shipped zoo entries, rl-zoo3's own TRPO / A2C entries and SB3's A2C accept
still constructs.
"""

import copy
import inspect
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import yaml
from rl_zoo3.exp_manager import ExperimentManager
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, IdentityEnv, SimpleMultiObsEnv
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sb3_trpo_kfac import ACKTR, KFAC, TRPO
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError
from sb3_trpo_kfac.zoo import hyperparams_path

V, T = ArgumentError, ArgumentTypeError
INF, NAN = float("inf"), float("nan")


class NotABuffer:
    pass


def schedule_going_negative(progress_remaining: float) -> float:
    return -1.0


def schedule_of_text(progress_remaining: float) -> str:
    return "fast"


def shown(value: object) -> str:
    """Test id of a value, the same in every process (pytest-xdist compares them): no memory addresses."""
    return getattr(value, "__name__", None) or repr(value)


# Keywords both algorithms share (SB3's, checked by us since SB3 checks none of them): (keyword, bad value, error).
COMMON_CASES = [
    ("policy", "MlpPolicyy", V),
    ("policy", nn.Linear, T),
    ("policy", 3, T),
    ("env", 42, T),
    ("env", "NoSuchEnvironment-v0", V),
    ("learning_rate", 0.0, V),
    ("learning_rate", -1e-3, V),
    ("learning_rate", INF, V),
    ("learning_rate", NAN, V),
    ("learning_rate", "3e-4", T),
    ("learning_rate", schedule_going_negative, V),
    ("learning_rate", schedule_of_text, T),
    ("n_steps", 0, V),
    ("n_steps", 2.5, T),
    ("n_steps", True, T),
    ("gamma", 1.5, V),
    ("gamma", INF, V),
    ("gae_lambda", -0.1, V),
    ("use_sde", "False", T),
    ("use_sde", 1, T),
    ("sde_sample_freq", -2, V),
    ("sde_sample_freq", 4.0, T),
    ("rollout_buffer_class", NotABuffer, T),
    ("rollout_buffer_class", "RolloutBuffer", T),
    ("rollout_buffer_kwargs", ["gamma", 0.9], T),
    ("rollout_buffer_kwargs", {1: 0.9}, T),
    ("normalize_advantage", "no", T),
    ("normalize_advantage", None, T),
    ("stats_window_size", 0, V),
    ("stats_window_size", 10.0, T),
    ("tensorboard_log", 1, T),
    ("policy_kwargs", "dict(net_arch=[8])", T),
    ("verbose", 3, V),
    ("verbose", -1, V),
    ("verbose", "1", T),
    ("seed", -1, V),
    ("seed", 2**32, V),
    ("seed", 1.5, T),
    ("device", "gpu", V),
    ("device", 0, T),
    ("_init_setup_model", "yes", T),
]

CASES = {
    TRPO: [
        *COMMON_CASES,
        ("batch_size", 0, V),
        ("batch_size", "64", T),
        ("cg_max_steps", 0, V),
        ("cg_max_steps", 2.5, T),
        ("cg_damping", -0.1, V),
        ("cg_damping", INF, V),
        ("line_search_shrinking_factor", 1.0, V),
        ("line_search_shrinking_factor", 0.0, V),
        ("line_search_max_iter", 0, V),
        ("n_critic_updates", -1, V),
        ("target_kl", 0.0, V),
        ("target_kl", INF, V),
        ("target_kl", NAN, V),
        ("sub_sampling_factor", 0, V),
        ("fisher_subsample", 0.0, V),
        ("fisher_subsample", 1.5, V),
        ("cg_preconditioner", "KFAC", V),
        ("cg_preconditioner", True, T),
    ],
    ACKTR: [
        *COMMON_CASES,
        ("ent_coef", -1.0, V),
        ("ent_coef", INF, V),
        ("ent_coef", "auto", T),
        ("vf_coef", -0.5, V),
        ("vf_coef", INF, V),
        ("max_grad_norm", 0.0, V),
        ("max_grad_norm", NAN, V),
        ("rms_prop_eps", -1e-5, V),
        ("rms_prop_eps", "1e-5", T),
        ("use_rms_prop", True, V),
        ("use_rms_prop", "False", T),
        ("kfac_clip", 0.0, V),
        ("kfac_clip", INF, V),
        ("vf_kfac_clip", -0.1, V),
        ("vf_kfac_clip", INF, V),
        ("vf_kfac_clip", "0.1", T),
        ("n_critic_updates", 0, V),
        ("kfac_damping", -1.0, V),
        ("kfac_damping", INF, V),
        ("momentum", 1.0, V),
        ("momentum", -0.1, V),
        ("kfac_stats_decay", 1.0, V),
        ("kfac_stats_decay", 2.0, V),
        ("kfac_update", 0, V),
        ("kfac_stats_interval", 2.5, T),
        ("kfac_inverse", "qr", V),
        ("kfac_inverse", None, V),
        ("kfac_inverse", 1, T),
        ("kfac_low_rank", 0, V),
        ("kfac_low_rank", 8.0, T),
        ("kfac_low_rank", "full", V),
        ("kfac_stats_samples", 0, V),
        ("kfac_stats_samples", 1.5, T),
        ("kfac_async", 1, T),
        ("kfac_async", "True", T),
        ("kfac_refine", -1, V),
        ("kfac_split_decompositions", 1, T),
        ("vf_fisher_coef", -1.0, V),
        ("vf_fisher_coef", INF, V),
        ("kfac_cold_iter", -2, V),
        ("target_kl", 0.0, V),
        ("target_kl", INF, V),
        ("target_kl", NAN, V),
        ("target_kl", "0.002", T),
    ],
}


@pytest.fixture
def no_env_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an environment fails the test: the arguments must be refused before."""

    def make(*args, **kwargs):
        raise AssertionError("an environment was built before the arguments were checked")

    monkeypatch.setattr(gym, "make", make)


@pytest.mark.parametrize("algorithm", [TRPO, ACKTR])
def test_every_keyword_has_a_bad_value_case(algorithm) -> None:
    parameters = inspect.signature(algorithm.__init__).parameters.items()
    # ACKTR's **renamed takes the former names of its K-FAC keywords (tests/kfac/test_saved_state.py)
    keywords = {name for name, parameter in parameters if parameter.kind is not parameter.VAR_KEYWORD} - {"self"}
    assert {keyword for keyword, _, _ in CASES[algorithm]} == keywords


@pytest.mark.parametrize(
    "algorithm, keyword, value, error",
    [(algorithm, *case) for algorithm, cases in CASES.items() for case in cases],
    ids=[
        f"{algorithm.__name__}-{keyword}={shown(value)}" for algorithm, cases in CASES.items() for keyword, value, _ in cases
    ],
)
def test_bad_value_fails_before_the_env_is_built(no_env_built, algorithm, keyword, value, error) -> None:
    kwargs = {"policy": "MlpPolicy", "env": "CartPole-v1", keyword: value}
    with pytest.raises(error) as raised:
        algorithm(**kwargs)
    assert isinstance(raised.value, AssertionError)  # what sb3-contrib raises for its own checks
    assert isinstance(raised.value, ValueError if error is V else TypeError)
    assert f"`{keyword}" in str(raised.value)


def test_the_bad_value_test_would_see_an_env_built(no_env_built) -> None:
    # the fixture is effective: valid arguments go on to build the environment
    for algorithm in (TRPO, ACKTR):
        with pytest.raises(AssertionError, match="an environment was built"):
            algorithm("MlpPolicy", "CartPole-v1")


@pytest.mark.parametrize(
    "algorithm, kwargs, keyword",
    [
        (TRPO, dict(env=IdentityEnv(3), use_sde=True), "use_sde"),
        (ACKTR, dict(env=IdentityEnv(3), use_sde=True), "use_sde"),
        (ACKTR, dict(env=IdentityEnv(3), n_steps=1, normalize_advantage=True), "n_steps"),
        (TRPO, dict(env=IdentityEnv(3), n_steps=1), "n_steps"),
        (TRPO, dict(env=DummyVecEnv([lambda: IdentityEnv(3)]), n_steps=1), "n_steps"),
        (TRPO, dict(env=SimpleMultiObsEnv()), "policy"),
        (ACKTR, dict(env=IdentityEnv(3), policy_kwargs=dict(optimizer_kwargs=dict(eps=1e-4))), "policy_kwargs"),
    ],
)
def test_bad_combinations_with_the_environment(algorithm, kwargs, keyword) -> None:
    with pytest.raises(ArgumentError, match=f"`{keyword}"):
        algorithm(**{"policy": "MlpPolicy", **kwargs})


def test_unsupported_action_space_is_refused_naming_env() -> None:
    class TupleActions(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,))
        action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(2)))

    for algorithm in (TRPO, ACKTR):
        with pytest.raises(ArgumentError, match="`env`: action space Tuple"):
            algorithm("MlpPolicy", TupleActions())


def test_accepted_values_become_python_numbers() -> None:
    """numpy scalars and ints where floats are expected (rl-zoo3's YAML and Optuna give them), schedules, flags."""
    model = TRPO(
        "MlpPolicy",
        IdentityEnv(3),
        learning_rate=np.float32(1e-3),
        n_steps=np.int64(16),
        batch_size=np.int32(8),
        gamma=1,
        target_kl=np.float64(0.02),
        cg_damping=0,
        normalize_advantage=np.bool_(True),
        use_sde=np.bool_(False),
        seed=np.int64(3),
        verbose=np.int8(0),
        stats_window_size=np.int16(5),
        sde_sample_freq=np.int64(-1),
        rollout_buffer_class=RolloutBuffer,
        rollout_buffer_kwargs={},
        device=th.device("cpu"),
    )
    for name, kind in [
        ("learning_rate", float),
        ("n_steps", int),
        ("batch_size", int),
        ("gamma", float),
        ("target_kl", float),
        ("cg_damping", float),
        ("normalize_advantage", bool),
        ("use_sde", bool),
        ("seed", int),
        ("verbose", int),
    ]:
        assert type(getattr(model, name)) is kind, name
    assert model.lr_schedule(1.0) == pytest.approx(1e-3)
    model.learn(32)  # the seed reached gymnasium's reset, which takes Python ints only

    acktr = ACKTR(
        "MultiInputPolicy",
        SimpleMultiObsEnv(),
        learning_rate=lambda progress: 0.25 * progress,
        max_grad_norm=INF,  # A2C: no clipping
        ent_coef=0,
        kfac_clip=np.float32(0.01),
        vf_kfac_clip=1,
        n_critic_updates=np.int64(2),
        kfac_low_rank=np.int64(8),
        kfac_async=np.bool_(False),
        rollout_buffer_class=DictRolloutBuffer,
        sde_sample_freq=0,
        verbose=2,
        seed=2**32 - 1,
        tensorboard_log=Path("runs"),
        device="cpu",
    )
    assert acktr.max_grad_norm == INF and acktr.policy.optimizer.preconditioner.kfac_cold_max_grad_norm == INF
    assert type(acktr.kfac_clip) is float and type(acktr.ent_coef) is float and acktr.kfac_async is False


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=INF), V, "lr"),
        (dict(momentum=1.0), V, "momentum"),
        (dict(kfac_stats_decay=1.0), V, "kfac_stats_decay"),
        (dict(kfac_damping=INF), V, "kfac_damping"),
        (dict(kfac_clip=INF), V, "kfac_clip"),
        (dict(weight_decay=NAN), V, "weight_decay"),
        (dict(kfac_inverse="cholesky"), V, "kfac_inverse"),
        (dict(kfac_async=1), T, "kfac_async"),
        (dict(kfac_cold_max_grad_norm=0.0), V, "kfac_cold_max_grad_norm"),
    ],
)
def test_kfac_arguments(kwargs, error, name) -> None:
    with pytest.raises(error, match=f"`{name}`") as raised:
        KFAC(nn.Linear(2, 2), **kwargs)
    assert isinstance(raised.value, AssertionError)
    with pytest.raises(ArgumentTypeError, match="`model`"):
        KFAC([nn.Parameter(th.zeros(2))])
    assert KFAC(nn.Linear(2, 2), kfac_cold_max_grad_norm=INF).preconditioner.kfac_cold_max_grad_norm == INF


# ----------------------------------------------------------------------------------------------------------------
# Zoo entries: the shipped ones, and rl-zoo3's own for sb3-contrib's TRPO and SB3's A2C
# ----------------------------------------------------------------------------------------------------------------


def zoo_constructor_kwargs(entry: dict) -> dict:
    """What rl-zoo3's ExperimentManager passes to the constructor for this entry (its own preprocessing)."""
    manager = ExperimentManager.__new__(ExperimentManager)
    manager.verbose, manager.n_timesteps, manager.n_evaluations = 0, 0, None
    manager.optimize_hyperparameters, manager.normalize, manager.normalize_kwargs = False, False, {}
    hyperparams, _, _, _ = manager._preprocess_hyperparams(copy.deepcopy(entry))
    return hyperparams


def load_entries(path: str) -> dict:
    with open(path) as file:
        return yaml.safe_load(file)


# Box2D builds from source (swig and a compiler), so the tests' extra leaves it out: these entries run on a stand-in
# with the environment's spaces (checked against the real one where Box2D is installed)
BOX2D_SPACES = {
    "LunarLander-v3": (gym.spaces.Box(-np.inf, np.inf, (8,)), gym.spaces.Discrete(4)),
    "LunarLanderContinuous-v3": (gym.spaces.Box(-np.inf, np.inf, (8,)), gym.spaces.Box(-1, 1, (2,))),
    "BipedalWalker-v3": (gym.spaces.Box(-np.inf, np.inf, (24,)), gym.spaces.Box(-1, 1, (4,))),
}


class SpacesOnly(gym.Env):
    """An environment with given spaces, for constructing a model (never stepped)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_box2d_stand_ins_have_the_real_spaces() -> None:
    try:
        import Box2D  # noqa: F401
    except ImportError:
        # no Box2D here: the stand-ins' spaces are those gymnasium documents (and the entries reference)
        assert set(BOX2D_SPACES) <= set(gym.registry)
        return
    for env_id, (observation_space, action_space) in BOX2D_SPACES.items():
        env = gym.make(env_id)
        assert env.observation_space.shape == observation_space.shape and env.action_space == action_space, env_id


SHIPPED = [
    (algorithm, env_id)
    for algorithm in (TRPO, ACKTR)
    for env_id in load_entries(hyperparams_path(algorithm.__name__.lower()))
]


@pytest.mark.parametrize("algorithm, env_id", SHIPPED, ids=[f"{a.__name__}-{e}" for a, e in SHIPPED])
def test_shipped_zoo_entries_construct(algorithm, env_id) -> None:
    entry = load_entries(hyperparams_path(algorithm.__name__.lower()))[env_id]
    kwargs = zoo_constructor_kwargs(entry)
    n_envs = entry.get("n_envs", 1)
    if env_id == "atari":
        # ale-py is not installed: a stand-in of the entry's observation shape and number of environments, without
        # network nor buffer (the keywords are checked all the same; the buffer alone would take hundreds of MB)
        frames = entry["frame_stack"]
        env = DummyVecEnv([lambda: FakeImageEnv(screen_height=84, screen_width=84, n_channels=frames)] * n_envs)
        model = algorithm(env=env, _init_setup_model=False, **kwargs)
    elif env_id in BOX2D_SPACES:
        env = DummyVecEnv([lambda: SpacesOnly(*BOX2D_SPACES[env_id])] * n_envs)
        model = algorithm(env=env, **kwargs)
    else:
        env = make_vec_env("CartPole-v1" if env_id == "default" else env_id, n_envs=n_envs)
        model = algorithm(env=env, **kwargs)
    assert model.n_envs == n_envs
    for key in ("n_steps", "gamma", "gae_lambda", "target_kl", "cg_damping", "kfac_clip", "n_critic_updates"):
        if key in kwargs:
            assert getattr(model, key) == kwargs[key], key
    if "learning_rate" in entry:
        expected = entry["learning_rate"]
        expected = float(expected.split("_")[1]) if isinstance(expected, str) else expected
        assert model.learning_rate(1.0) == pytest.approx(expected)


RL_ZOO3_HYPERPARAMS = Path(inspect.getfile(ExperimentManager)).parent / "hyperparams"
RL_ZOO3_ENTRIES = [(TRPO, "trpo", env_id) for env_id in load_entries(RL_ZOO3_HYPERPARAMS / "trpo.yml")] + [
    (ACKTR, "a2c", env_id) for env_id in load_entries(RL_ZOO3_HYPERPARAMS / "a2c.yml")
]


@pytest.mark.parametrize("algorithm, algo, env_id", RL_ZOO3_ENTRIES, ids=[f"{a}-{e}" for _, a, e in RL_ZOO3_ENTRIES])
def test_rl_zoo3_entries_pass_the_checks(algorithm, algo, env_id) -> None:
    """
    sb3-contrib TRPO entries with our TRPO, A2C entries with ACKTR (their optimizer_class becoming ACKTR's step rule;
    less use_rms_prop, whose RMSprop default ACKTR does not have).
    """
    kwargs = zoo_constructor_kwargs(load_entries(RL_ZOO3_HYPERPARAMS / f"{algo}.yml")[env_id])
    if algorithm is ACKTR:
        kwargs.pop("use_rms_prop", None)
    model = algorithm(env=None, _init_setup_model=False, **kwargs)
    assert model.n_steps == kwargs.get("n_steps", model.n_steps)
    assert math.isfinite(model.learning_rate(1.0) if callable(model.learning_rate) else model.learning_rate)
