"""
Helpers shared by the benchmark scripts: the settings of a shipped rl-zoo3 entry, and timing in turn.

The benchmarks read the hyperparameters they run from the files the zoo commands read (ours: the shipped
``zoo_hyperparams/{algo}.yml`` through :func:`sb3_trpo_kfac.zoo.hyperparams_path`; the peers: rl-zoo3's own
``rl_zoo3/hyperparams/{algo}.yml``), so a figure always belongs to the entry a user runs and nothing is copied by hand.
A benchmark is run as a script (``python benchmarks/NAME.py``), which puts this folder on ``sys.path``: it imports
this module as ``common``.
"""

import dataclasses
import importlib.util
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

#: Who ships a hyperparameter file: this package (our TRPO and ACKTR) or rl-zoo3 (the peers, sb3-contrib's TRPO too).
OURS = "sb3_trpo_kfac"
RL_ZOO3 = "rl_zoo3"
SHIPPERS = (OURS, RL_ZOO3)
# Keys of an entry that rl-zoo3 uses itself (ExperimentManager._preprocess_hyperparams) instead of passing them to
# the algorithm's constructor.
ZOO_KEYS = (
    "n_envs",
    "n_timesteps",
    "policy",
    "normalize",
    "env_wrapper",
    "frame_stack",
    "env_kwargs",
    "vec_env_wrapper",
    "callback",
    "monitor_kwargs",
)
# Zoo keys no benchmark needs yet: refused rather than silently dropped, so a benchmark never runs less than the entry.
UNSUPPORTED_KEYS = ("env_kwargs", "vec_env_wrapper", "callback", "monitor_kwargs")
# The keywords rl-zoo3 turns from "lin_<value>" into a linear schedule (ExperimentManager._preprocess_schedules).
SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf", "delta_std")


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """
    rl-zoo3's "lin_<value>": from ``initial_value`` at the start of training linearly down to 0 at its end.

    :param initial_value: the value at ``progress_remaining`` 1
    """

    initial_value: float

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.initial_value


def hyperparams_file(algo: str, shipped_by: str) -> Path:
    """
    The hyperparameter file the zoo command reads for ``algo``.

    :param algo: the zoo's algorithm name ("acktr", "trpo", "a2c", "ppo", ...)
    :param shipped_by: ``OURS`` (``python -m sb3_trpo_kfac``) or ``RL_ZOO3`` (``python -m rl_zoo3.train``)
    :return: the path of ``{algo}.yml``
    """
    if shipped_by == OURS:
        from sb3_trpo_kfac.zoo import hyperparams_path

        return Path(hyperparams_path(algo))
    if shipped_by == RL_ZOO3:
        # The package's folder without importing it: importing rl_zoo3 loads Optuna, SB3 and sb3-contrib.
        spec = importlib.util.find_spec("rl_zoo3")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("rl_zoo3 is not installed (pip install -e '.[benchmarks]')")
        path = Path(next(iter(spec.submodule_search_locations))) / "hyperparams" / f"{algo}.yml"
        if not path.is_file():
            raise ValueError(f"rl-zoo3 ships no hyperparameters for algo {algo!r} (no {path})")
        return path
    raise ValueError(f"shipped_by must be one of {SHIPPERS}, not {shipped_by!r}")


def zoo_entries(algo: str, shipped_by: str) -> dict[str, dict[str, Any]]:
    """
    Every entry of a shipped hyperparameter file, as rl-zoo3 loads it (YAML anchors and merge keys resolved).

    :param algo: the zoo's algorithm name
    :param shipped_by: ``OURS`` or ``RL_ZOO3``
    :return: the entries by env id
    """
    return yaml.safe_load(hyperparams_file(algo, shipped_by).read_text())


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """
    One env's entry of a shipped hyperparameter file, split as rl-zoo3 splits it before training.

    :param algo: the zoo's algorithm name
    :param env_id: the env the entry is for
    :param shipped_by: ``OURS`` or ``RL_ZOO3``
    :param settings: the entry as written in the file, overrides applied (what a benchmark reports)
    :param policy: the policy name
    :param kwargs: the algorithm's constructor keywords (schedules and ``policy_kwargs`` converted)
    :param n_envs: number of environments
    :param n_timesteps: the entry's training budget
    :param normalize: ``VecNormalize`` keywords, or None when the entry does not normalize
    :param env_wrapper: the entry's ``env_wrapper`` as written, or None
    :param frame_stack: the entry's ``frame_stack`` (frames stacked by ``VecFrameStack``), or None
    """

    algo: str
    env_id: str
    shipped_by: str
    settings: dict[str, Any]
    policy: str
    kwargs: dict[str, Any]
    n_envs: int
    n_timesteps: int
    normalize: dict[str, Any] | None
    env_wrapper: Any = None
    frame_stack: int | None = None

    def make_env(self, seed: int) -> Any:
        """
        The training environments as rl-zoo3 builds them for this entry: ``n_envs`` copies, each in a ``Monitor``
        inside the entry's wrapper, the whole in ``VecNormalize`` when the entry normalizes, then in ``VecFrameStack``
        when it stacks frames.

        :param seed: the seed of the first environment (the others get the next ones)
        :return: the ``VecEnv``
        """
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

        if self.env_id.endswith("NoFrameskip-v4") or self.env_id.startswith("ALE/"):
            import ale_py  # the Atari envs register on import (as rl_zoo3.import_envs does)
            import gymnasium

            gymnasium.register_envs(ale_py)
        wrapper_class = None
        if self.env_wrapper is not None:
            from rl_zoo3.utils import get_wrapper_class

            wrapper_class = get_wrapper_class({"env_wrapper": self.env_wrapper})
        env = make_vec_env(self.env_id, n_envs=self.n_envs, seed=seed, wrapper_class=wrapper_class)
        env = env if self.normalize is None else VecNormalize(env, **self.normalize)
        return env if self.frame_stack is None else VecFrameStack(env, self.frame_stack)

    def describe(self, **extra: Any) -> str:
        """
        One JSON line saying what a benchmark runs with this entry (what the scripts' ``--dry-run`` prints).

        :param extra: further fields (a budget, a case name)
        :return: the JSON text; values JSON cannot hold (schedules, classes) as their ``repr``
        """
        fields: dict[str, Any] = {"algo": self.algo, "env_id": self.env_id, "shipped_by": self.shipped_by}
        fields.update(settings=self.settings, policy=self.policy, kwargs=self.kwargs, n_envs=self.n_envs)
        fields.update(n_timesteps=self.n_timesteps, normalize=self.normalize, **extra)
        return json.dumps(fields, default=repr, sort_keys=True)


def _schedule(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if not value.startswith("lin_"):
        raise ValueError(f"{key}: only rl-zoo3's linear schedule 'lin_<value>' is supported, not {value!r}")
    return LinearSchedule(float(value[len("lin_") :]))


def _normalize_kwargs(settings: dict[str, Any]) -> dict[str, Any] | None:
    """``VecNormalize`` keywords of an entry as rl-zoo3 derives them (ExperimentManager._preprocess_normalization)."""
    normalize = settings.get("normalize", False)
    if normalize is False:
        return None
    if isinstance(normalize, str):  # e.g. "dict(norm_obs=False, norm_reward=True)"
        normalize = eval(normalize, {})
    if normalize is True:
        kwargs: dict[str, Any] = {}
    elif isinstance(normalize, dict):
        kwargs = dict(normalize)
    else:
        raise ValueError(f"normalize: expected a bool, a dict or a dict's source text, not {normalize!r}")
    if "gamma" in settings:  # the return statistics use the algorithm's discount
        kwargs["gamma"] = settings["gamma"]
    return kwargs


def zoo_entry(
    algo: str,
    env_id: str,
    shipped_by: str = OURS,
    overrides: Mapping[str, Any] | None = None,
    entry_name: str | None = None,
) -> ZooEntry:
    """
    The settings a zoo command trains ``algo`` on ``env_id`` with, for a benchmark to run them itself.

    :param algo: the zoo's algorithm name
    :param env_id: the env to train on
    :param shipped_by: ``OURS`` or ``RL_ZOO3``
    :param overrides: entry keys to replace or add before the entry is split (as rl-zoo3's ``--hyperparams``)
    :param entry_name: the entry to read (default: ``env_id``'s own; e.g. ``"atari"``, which rl-zoo3 uses for any
        Atari env without an entry of its own: the zoo's fallbacks are never chosen implicitly here)
    :return: the entry
    """
    entries = zoo_entries(algo, shipped_by)
    name = env_id if entry_name is None else entry_name
    if name not in entries:
        raise ValueError(f"{name!r} has no {algo} entry in {hyperparams_file(algo, shipped_by)}")
    settings = {**entries[name], **(overrides or {})}
    unsupported = [key for key in UNSUPPORTED_KEYS if key in settings]
    if unsupported:
        raise ValueError(f"{algo} {env_id}: the benchmarks do not apply the entry keys {unsupported}")
    kwargs = {key: _schedule(key, value) if key in SCHEDULE_KEYS else value for key, value in settings.items()}
    kwargs = {key: value for key, value in kwargs.items() if key not in ZOO_KEYS}
    if isinstance(kwargs.get("policy_kwargs"), str):  # e.g. "dict(net_arch=[256, 256])", evaluated as rl-zoo3 does
        import torch as th
        from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

        # the names rl-zoo3's exp_manager has in scope when it evaluates the entry (its Atari entries name RMSpropTFLike)
        names = {"th": th, "nn": th.nn, "RMSpropTFLike": RMSpropTFLike}
        kwargs["policy_kwargs"] = eval(kwargs["policy_kwargs"], names)
    return ZooEntry(
        algo=algo,
        env_id=env_id,
        shipped_by=shipped_by,
        settings=settings,
        policy=settings.get("policy", "MlpPolicy"),
        kwargs=kwargs,
        n_envs=int(settings.get("n_envs", 1)),
        n_timesteps=int(settings["n_timesteps"]),
        normalize=_normalize_kwargs(settings),
        env_wrapper=settings.get("env_wrapper"),
        frame_stack=settings.get("frame_stack"),
    )


def timed(run: Callable[[], object]) -> float:
    """
    :param run: what to time
    :return: its wall time in seconds
    """
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_in_turn(
    runs: Mapping[str, Callable[[], object]],
    rounds: int,
    warm_up: Mapping[str, Callable[[], object]] | None = None,
    before_each: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """
    Time several runs in turn, in one process: after a warm-up of each, ``rounds`` rounds in which every run is timed
    once, in the order given. Alternating spreads any drift of the machine (clock frequency, neighbouring jobs) over
    all of them alike, which timing each in one block would not.

    :param runs: the runs to time, by name
    :param rounds: how many times each is timed
    :param warm_up: per name, what to run once before the timing (allocations, first decompositions);
        default: the run itself
    :param before_each: per name, what to run, untimed, before each of its runs and before its warm-up (e.g. reset
        the parameters so that every timed run does the same work)
    :return: per name, the seconds of each round
    """
    if not runs:
        raise ValueError("runs: nothing to time")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    warm_up, before_each = dict(warm_up or runs), dict(before_each or {})
    for argument, given in (("warm_up", warm_up), ("before_each", before_each)):
        unknown = set(given) - set(runs)
        if unknown:
            raise ValueError(f"{argument}: no run named {sorted(unknown)}")
    for name in runs:
        if name in before_each:
            before_each[name]()
        warm_up.get(name, runs[name])()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if name in before_each:
                before_each[name]()
            times[name].append(timed(run))
    return times
