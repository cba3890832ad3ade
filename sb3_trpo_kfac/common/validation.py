"""
Constructor argument checks: a bad value fails at construction, before the environment or the policy is built, with
an error naming the argument.

The errors are both what this package documents (``ValueError`` / ``TypeError``) and what sb3-contrib raises for the
same mistakes (``AssertionError``, e.g. its TRPO's ``n_steps=1`` with advantage normalization), so code written
against either catches them. Numbers are accepted as Python or numpy scalars (ints where a float is expected, as
rl-zoo3's YAML files give them) and returned as Python numbers.
"""

import math
import numbers
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.vec_env import VecEnv

# The action spaces TRPO and ACKTR support (SB3's ActorCriticPolicy distributions).
SUPPORTED_ACTION_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


class ArgumentError(ValueError, AssertionError):
    """A bad argument value. Also an ``AssertionError``, which sb3-contrib raises for the same mistakes."""


class ArgumentTypeError(TypeError, AssertionError):
    """An argument of the wrong type. Also an ``AssertionError``, which sb3-contrib raises for the same mistakes."""


def _shown(value: object) -> str:
    return f"{type(value).__name__} ({value!r})"


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """
    :param name: argument name shown in the error
    :param value: the value given (a Python or numpy integer, not a bool)
    :param minimum: smallest allowed value (inclusive), or None
    :param maximum: largest allowed value (inclusive), or None
    :return: the value as an int
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"`{name}` must be an int, got {_shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"`{name}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> float:
    """
    :param name: argument name shown in the error
    :param value: the value given (any real number, not a bool)
    :param low: lower bound, or None
    :param high: upper bound, or None
    :param low_inclusive: whether ``low`` itself is allowed
    :param high_inclusive: whether ``high`` itself is allowed
    :param allow_inf: whether +inf is allowed (where it means "no limit"); NaN never is
    :return: the value as a float
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"`{name}` must be a number, got {_shown(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise ArgumentError(f"`{name}` must be a finite number, got {value}")
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low or too_high:
        left = "[" if low_inclusive and low is not None else "("
        right = "]" if high_inclusive and high is not None else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ArgumentError(f"`{name}` must be in {interval}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """
    A flag: ``True`` or ``False`` (or a numpy bool). Strings such as ``"False"`` and numbers are refused: they would
    silently switch a feature on.

    :param name: argument name shown in the error
    :param value: the value given
    :return: the value as a bool
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"`{name}` must be a bool (True or False), got {_shown(value)}")
    return bool(value)


def check_choice(name: str, value: object, choices: Collection[str | None]) -> Any:
    """
    :param name: argument name shown in the error
    :param value: the value given
    :param choices: the allowed values (strings, and None where allowed)
    :return: the value
    """
    if value is not None and not isinstance(value, str):
        raise ArgumentTypeError(f"`{name}` must be one of {tuple(choices)}, got {_shown(value)}")
    if value not in choices:
        raise ArgumentError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_kwargs_dict(name: str, value: object) -> dict[str, Any] | None:
    """
    :param name: argument name shown in the error
    :param value: None or a dict of keyword arguments (string keys)
    :return: the value
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ArgumentTypeError(f"`{name}` must be a dict of keyword arguments or None, got {_shown(value)}")
    bad_keys = [key for key in value if not isinstance(key, str)]
    if bad_keys:
        raise ArgumentTypeError(f"`{name}`: keyword names must be strings, got {bad_keys!r}")
    return value


def check_learning_rate(name: str, value: object) -> float | Callable[[float], float]:
    """
    :param name: argument name shown in the error
    :param value: a positive finite number, or a schedule: a callable of the progress remaining (from 1 to 0) whose
        value at the start (1.0) is a finite number >= 0 (a warm-up schedule may start at 0)
    :return: the number as a float, or the schedule
    """
    if not callable(value):
        return check_float(name, value, low=0.0, low_inclusive=False)
    try:
        start = value(1.0)
    except Exception as error:
        message = f"`{name}`: the schedule fails at progress 1.0 ({type(error).__name__}: {error})"
        raise ArgumentError(message) from error
    if not isinstance(start, numbers.Real):
        try:  # SB3 takes float() of the schedule's values (a 0-d tensor, ...)
            start = float(start)  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise ArgumentTypeError(f"`{name}(1.0)` must be a number, got {_shown(start)}") from error
    check_float(f"{name}(1.0)", start, low=0.0)
    return value


def check_env(name: str, env: object) -> None:
    """
    :param name: argument name shown in the error
    :param env: None, a registered Gymnasium environment id, or an environment object (Gymnasium, vectorized, or
        anything SB3 converts, e.g. a Gym 0.21/0.26 environment: an object with ``reset`` and ``step``)
    """
    if env is None or isinstance(env, (gym.Env, VecEnv)):
        return
    if isinstance(env, str):
        try:
            gym.spec(env)  # looks the id up without building the environment
        except (gym.error.Error, ImportError) as error:
            raise ArgumentError(f"`{name}`: no Gymnasium environment is registered as {env!r} ({error})") from error
        return
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise ArgumentTypeError(f"`{name}` must be an environment or a registered environment id, got {_shown(env)}")


def n_envs_of(env: object) -> int | None:
    """
    :param env: the ``env`` argument of a constructor
    :return: the number of environments SB3 will run (a non-vectorized env is wrapped as one), or None without env
    """
    if env is None:
        return None
    return env.num_envs if isinstance(env, VecEnv) else 1


def check_rollout_size(n_steps: int, env: object, normalize_advantage: bool) -> None:
    """
    Advantage normalization divides by the standard deviation of the rollout's advantages: one sample has none
    (the advantages, the loss and every step would be NaN).

    :param n_steps: steps per environment per rollout
    :param env: the ``env`` argument of the constructor (unknown size without one: not checked)
    :param normalize_advantage: whether advantages are normalized
    """
    n_envs = n_envs_of(env)
    if normalize_advantage and n_envs is not None and n_steps * n_envs <= 1:
        raise ArgumentError(
            "`n_steps` * n_envs must be greater than 1 to normalize advantages (`normalize_advantage=True`), "
            f"got n_steps={n_steps} and n_envs={n_envs}"
        )


def check_on_policy_arguments(
    policy_aliases: Mapping[str, type[BasePolicy]],
    *,
    policy: object,
    env: object,
    learning_rate: object,
    n_steps: object,
    gamma: object,
    gae_lambda: object,
    use_sde: object,
    sde_sample_freq: object,
    rollout_buffer_class: object,
    rollout_buffer_kwargs: object,
    stats_window_size: object,
    tensorboard_log: object,
    policy_kwargs: object,
    verbose: object,
    seed: object,
    device: object,
) -> dict[str, Any]:
    """
    The checks of the keywords TRPO and ACKTR pass on to SB3's ``OnPolicyAlgorithm``, which checks none of them.

    :param policy_aliases: the algorithm's policy names (``"MlpPolicy"``, ...)
    :param policy: a policy name of ``policy_aliases`` or an ``ActorCriticPolicy`` subclass
    :param env: see :func:`check_env`; an environment object's action space must be one TRPO / ACKTR supports
    :param learning_rate: see :func:`check_learning_rate`
    :param n_steps: steps per environment per rollout, >= 1
    :param gamma: discount factor in [0, 1]
    :param gae_lambda: GAE factor in [0, 1]
    :param use_sde: bool (gSDE needs a Box action space)
    :param sde_sample_freq: int >= -1 (-1 and 0: sample the noise at the start of each rollout only)
    :param rollout_buffer_class: None or a ``RolloutBuffer`` subclass
    :param rollout_buffer_kwargs: None or a dict
    :param stats_window_size: int >= 1
    :param tensorboard_log: None, or a directory (str or path)
    :param policy_kwargs: None or a dict
    :param verbose: 0, 1 or 2
    :param seed: None or an int in [0, 2**32 - 1] (numpy's seed range)
    :param device: ``"auto"``, a torch device or a device string
    :return: these keywords with their values checked, numbers as Python numbers, for ``OnPolicyAlgorithm``
    """
    if isinstance(policy, str):
        if policy not in policy_aliases:
            raise ArgumentError(f"`policy` must be one of {sorted(policy_aliases)} or a policy class, got {policy!r}")
    elif not (isinstance(policy, type) and issubclass(policy, ActorCriticPolicy)):
        raise ArgumentTypeError(f"`policy` must be a policy name or ActorCriticPolicy subclass, got {_shown(policy)}")
    check_env("env", env)
    use_sde = check_bool("use_sde", use_sde)
    if isinstance(env, (gym.Env, VecEnv)):  # checks SB3 makes once the environment is built, or not at all
        if not isinstance(env.action_space, SUPPORTED_ACTION_SPACES):
            supported = ", ".join(space.__name__ for space in SUPPORTED_ACTION_SPACES)
            raise ArgumentError(f"`env`: action space {env.action_space} is not supported (expected {supported})")
        if use_sde and not isinstance(env.action_space, spaces.Box):
            raise ArgumentError(f"`use_sde=True` needs a continuous (Box) action space, got {env.action_space}")
        if isinstance(env.observation_space, spaces.Dict) and policy in ("MlpPolicy", "CnnPolicy"):
            raise ArgumentError(f"`policy`: the observations are a Dict space, use 'MultiInputPolicy', not {policy!r}")
    if rollout_buffer_class is not None and not (
        isinstance(rollout_buffer_class, type) and issubclass(rollout_buffer_class, RolloutBuffer)
    ):
        raise ArgumentTypeError(
            f"`rollout_buffer_class` must be a RolloutBuffer subclass or None, got {_shown(rollout_buffer_class)}"
        )
    if tensorboard_log is not None and not isinstance(tensorboard_log, (str, os.PathLike)):
        message = f"`tensorboard_log` must be a directory (str or path) or None, got {_shown(tensorboard_log)}"
        raise ArgumentTypeError(message)
    if not isinstance(device, (str, th.device)):
        raise ArgumentTypeError(f"`device` must be 'auto', a torch.device or a device string, got {_shown(device)}")
    if isinstance(device, str) and device != "auto":
        try:
            th.device(device)
        except RuntimeError as error:
            raise ArgumentError(f"`device`: {device!r} is not a torch device ({error})") from error
    return dict(
        policy=policy,
        env=env,
        learning_rate=check_learning_rate("learning_rate", learning_rate),
        n_steps=check_int("n_steps", n_steps, minimum=1),
        gamma=check_float("gamma", gamma, 0.0, 1.0),
        gae_lambda=check_float("gae_lambda", gae_lambda, 0.0, 1.0),
        use_sde=use_sde,
        sde_sample_freq=check_int("sde_sample_freq", sde_sample_freq, minimum=-1),
        rollout_buffer_class=rollout_buffer_class,
        rollout_buffer_kwargs=check_kwargs_dict("rollout_buffer_kwargs", rollout_buffer_kwargs),
        stats_window_size=check_int("stats_window_size", stats_window_size, minimum=1),
        tensorboard_log=tensorboard_log,
        policy_kwargs=check_kwargs_dict("policy_kwargs", policy_kwargs),
        verbose=check_int("verbose", verbose, minimum=0, maximum=2),
        seed=None if seed is None else check_int("seed", seed, minimum=0, maximum=2**32 - 1),
        device=device,
    )
