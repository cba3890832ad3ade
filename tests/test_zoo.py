"""
RL Zoo integration: shipped hyperparameter files, registration, samplers, and the real
``python -m sb3_trpo_kfac train|enjoy`` command run in subprocesses (train, enjoy, load, optimize, distributed study).
"""

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import optuna
import pytest
import torch as th
import yaml
from rl_zoo3.utils import SimpleLinearSchedule
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

import sb3_trpo_kfac
from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.trpo import TRPO
from sb3_trpo_kfac.zoo import ALGO_NAMES, hyperparams_path, register, robust_objective
from sb3_trpo_kfac.zoo.cli import main, with_default_conf_file
from sb3_trpo_kfac.zoo.samplers import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

ALGOS = {"trpo": TRPO, "acktr": ACKTR}

REQUIRED_ENTRIES = [
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Pendulum-v1",
    "LunarLander-v3",
    "LunarLanderContinuous-v3",
    "BipedalWalker-v3",
    "HalfCheetah-v5",
    "Hopper-v5",
    "Walker2d-v5",
    "Ant-v5",
    "Swimmer-v5",
    "atari",
]
# Keys rl-zoo3 consumes itself instead of passing them to the constructor.
ZOO_KEYS = {"n_envs", "n_timesteps", "policy", "normalize", "env_wrapper", "frame_stack", "policy_kwargs"}
# Entries whose environments ship with gymnasium itself: built for real below.
CLASSIC_CONTROL = ["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0", "Pendulum-v1"]


def load_shipped(algo: str) -> dict:
    with open(hyperparams_path(algo)) as file:
        return yaml.safe_load(file)


def constructor_keywords(algo: str) -> set[str]:
    return set(inspect.signature(ALGOS[algo].__init__).parameters) - {"self", "env"}


def to_constructor_kwargs(entry: dict) -> dict:
    """The part of an entry rl-zoo3 hands to the constructor, with its string conventions resolved."""
    kwargs = {key: value for key, value in entry.items() if key not in ZOO_KEYS - {"policy", "policy_kwargs"}}
    if isinstance(kwargs.get("learning_rate"), str):
        kwargs["learning_rate"] = SimpleLinearSchedule(kwargs["learning_rate"].split("_")[1])
    if isinstance(kwargs.get("policy_kwargs"), str):
        kwargs["policy_kwargs"] = eval(kwargs["policy_kwargs"], {"nn": nn})
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# In-process checks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_shipped_hyperparams_entries_and_keys(algo):
    path = Path(hyperparams_path(algo))
    # Found through the installed package, not through the working directory.
    assert path.is_file() and path.name == f"{algo}.yml"
    hyperparams = load_shipped(algo)
    assert set(REQUIRED_ENTRIES) <= set(hyperparams)
    allowed = constructor_keywords(algo) | ZOO_KEYS
    for env_id, entry in hyperparams.items():
        assert entry["n_timesteps"] > 0, env_id
        unknown = set(entry) - allowed
        assert not unknown, f"{algo}.yml {env_id}: {sorted(unknown)} are not {ALGOS[algo].__name__} keywords"
    assert hyperparams["atari"]["policy"] == "CnnPolicy"


@pytest.mark.parametrize("algo", ALGO_NAMES)
@pytest.mark.parametrize("env_id", CLASSIC_CONTROL)
def test_shipped_hyperparams_construct(algo, env_id):
    entry = load_shipped(algo)[env_id]
    model = ALGOS[algo](env=gym.make(env_id), **to_constructor_kwargs(entry))
    for key, value in entry.items():
        if key in ("gamma", "gae_lambda", "n_steps", "target_kl", "kfac_clip", "n_critic_updates", "cg_damping"):
            assert getattr(model, key) == pytest.approx(value), key


def test_register_patches_every_rl_zoo3_module():
    import rl_zoo3
    import rl_zoo3.enjoy
    import rl_zoo3.train
    from rl_zoo3 import exp_manager, hyperparams_opt
    from rl_zoo3.exp_manager import ExperimentManager

    register()
    objective = ExperimentManager.objective
    register()  # idempotent: the objective is wrapped once
    assert ExperimentManager.objective is objective
    for algos in (rl_zoo3.ALGOS, rl_zoo3.train.ALGOS, rl_zoo3.enjoy.ALGOS, exp_manager.ALGOS):
        assert algos["trpo"] is sb3_trpo_kfac.TRPO
        assert algos["acktr"] is ACKTR
        assert algos["ppo"].__name__ == "PPO"  # the others are left alone
    for samplers in (hyperparams_opt.HYPERPARAMS_SAMPLER, exp_manager.HYPERPARAMS_SAMPLER):
        assert samplers["trpo"] is HYPERPARAMS_SAMPLER["trpo"]
        assert samplers["acktr"] is HYPERPARAMS_SAMPLER["acktr"]
    for converters in (hyperparams_opt.HYPERPARAMS_CONVERTER, exp_manager.HYPERPARAMS_CONVERTER):
        assert converters["acktr"] is HYPERPARAMS_CONVERTER["acktr"]


def test_default_conf_file_only_for_our_algos_without_one():
    shipped = hyperparams_path("acktr")
    assert with_default_conf_file(["--algo", "acktr", "--env", "CartPole-v1"])[-2:] == ["--conf-file", shipped]
    assert with_default_conf_file(["--algo=trpo"])[-2:] == ["--conf-file", hyperparams_path("trpo")]
    for args in (
        ["--algo", "acktr", "--conf-file", "mine.yml"],
        ["--algo", "acktr", "-conf", "mine.yml"],
        ["--algo", "acktr", "--conf", "mine.yml"],  # argparse abbreviation, as rl-zoo3 reads it
        ["--algo", "ppo", "--env", "CartPole-v1"],
        ["--env", "CartPole-v1"],  # rl-zoo3's default algo is ppo
    ):
        assert with_default_conf_file(args) == args


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "train,enjoy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--algo acktr" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'fit'"):
        main(["fit", "--algo", "acktr"])


def _draw(algo: str, n_envs: int, n_actions: int, seed: int, n_trials: int = 25) -> list[tuple[dict, dict]]:
    """Sample with a random sampler; return (trial.params, sampled kwargs) of valid draws, checking bad ones."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n_trials):
        trial = study.ask()
        try:
            kwargs = HYPERPARAMS_SAMPLER[algo](trial, n_actions, n_envs, {})
        except ValueError as error:
            # The only rejected combinations: a rollout too small for curvature statistics or a minibatch
            assert "n_steps" in str(error) or "fisher_subsample" in str(error) or "batch_size" in str(error)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        draws.append((trial.params, kwargs))
        study.tell(trial, 0.0)
    return draws


@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_samplers_give_valid_constructor_keywords(algo):
    n_valid = 0
    for n_envs, n_actions in ((1, 0), (8, 0), (2, 1)):
        env = make_vec_env("Pendulum-v1" if n_actions else "CartPole-v1", n_envs=n_envs)
        for params, kwargs in _draw(algo, n_envs, n_actions, seed=n_envs + 10 * n_actions):
            assert set(kwargs) <= constructor_keywords(algo)
            assert kwargs["n_steps"] * n_envs >= 32
            assert 0.0 < kwargs["gamma"] < 1.0 and 0.0 < kwargs["gae_lambda"] < 1.0
            assert ("log_std_init" in kwargs["policy_kwargs"]) == (n_actions > 0)
            # The converter maps the stored raw params to the same keywords (a schedule comes out as "lin_x").
            converted = HYPERPARAMS_CONVERTER[algo](params)
            assert set(converted) == set(kwargs)
            if algo == "trpo":
                assert kwargs["cg_preconditioner"] in (None, "kfac")
            if isinstance(kwargs["learning_rate"], SimpleLinearSchedule):
                assert converted["learning_rate"] == f"lin_{kwargs['learning_rate'].initial_value}"
            model = ALGOS[algo]("MlpPolicy", env, **kwargs)
            assert model.gamma == pytest.approx(kwargs["gamma"])
            n_valid += 1
    assert n_valid >= 20


def test_acktr_linear_schedule_round_trip():
    trial = optuna.trial.FixedTrial(
        {
            "n_steps_pow": 5,
            "one_minus_gamma": 0.01,
            "one_minus_gae_lambda": 0.05,
            "learning_rate": 0.2,
            "lr_schedule": "linear",
            "kfac_clip": 0.001,
            "trust_region": "separate",
            "vf_kfac_clip": 0.1,
            "n_critic_updates": 5,
            "kfac_damping": 0.01,
            "kfac_stats_decay": 0.99,
            "kfac_update": 2,
            "kfac_inverse": "eigen",
            "vf_coef": 0.5,
            "vf_fisher_coef": 1.0,
            "ent_coef": 0.01,
            "max_grad_norm": 0.5,
            "normalize_advantage": True,
            "net_arch": "small",
            "activation_fn": "tanh",
        }
    )
    kwargs = HYPERPARAMS_SAMPLER["acktr"](trial, 0, 4, {})
    assert isinstance(kwargs["learning_rate"], SimpleLinearSchedule)
    assert kwargs["learning_rate"](0.5) == pytest.approx(0.1)
    assert kwargs["vf_kfac_clip"] == 0.1 and kwargs["n_critic_updates"] == 5 and "trust_region" not in kwargs
    assert kwargs["n_steps"] == 32 and kwargs["gamma"] == pytest.approx(0.99)
    assert kwargs["policy_kwargs"] == {"net_arch": dict(pi=[64, 64], vf=[64, 64]), "activation_fn": nn.Tanh}
    # What --trial-id feeds back into rl-zoo3's config parsing: its "lin_x" string convention.
    assert HYPERPARAMS_CONVERTER["acktr"](trial.params)["learning_rate"] == "lin_0.2"
    model = ACKTR("MlpPolicy", "CartPole-v1", **kwargs)
    assert model.lr_schedule(1.0) == pytest.approx(0.2)
    # 8 steps of one env are too few samples for the K-FAC statistics: rejected, so the trial is pruned.
    small = optuna.trial.FixedTrial({**trial.params, "n_steps_pow": 3})
    with pytest.raises(ValueError, match="n_steps"):
        HYPERPARAMS_SAMPLER["acktr"](small, 0, 1, {})
    assert HYPERPARAMS_SAMPLER["acktr"](small, 0, 8, {})["n_steps"] == 8


class _FakeExperiment:
    def __init__(self, algo: str, outcome):
        self.algo = algo
        self.outcome = outcome

    def objective(self, trial: optuna.Trial) -> float:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    "outcome",
    [
        ValueError("batch_size 512 > n_steps * n_envs"),
        AssertionError("bad"),
        th.linalg.LinAlgError("eigh failed"),
        FloatingPointError("overflow"),
        float("nan"),
        float("inf"),
    ],
)
def test_bad_trials_are_pruned_never_abort_the_study(outcome):
    objective = robust_objective(_FakeExperiment.objective)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: objective(_FakeExperiment("acktr", outcome), trial), n_trials=3)
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.PRUNED] * 3
    assert all("pruned_reason" in trial.user_attrs for trial in study.trials)
    study.optimize(lambda trial: objective(_FakeExperiment("trpo", 7.0), trial), n_trials=1)
    assert study.best_value == 7.0 and "worker" in study.best_trial.user_attrs


def test_bugs_and_other_algorithms_keep_rl_zoo3_behaviour():
    objective = robust_objective(_FakeExperiment.objective)
    study = optuna.create_study()
    with pytest.raises(RuntimeError, match="a bug"):
        study.optimize(lambda trial: objective(_FakeExperiment("trpo", RuntimeError("a bug")), trial), n_trials=1)
    with pytest.raises(ValueError):
        study.optimize(lambda trial: objective(_FakeExperiment("ppo", ValueError("x")), trial), n_trials=1)


# ---------------------------------------------------------------------------------------------------------------
# The real command, in subprocesses
# ---------------------------------------------------------------------------------------------------------------

# One torch thread per process: the CI machine has 2 cores and small MLPs are faster single-threaded.
FAST = ["--num-threads", "1", "--eval-freq", "-1"]


def zoo(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_trpo_kfac", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.mark.parametrize(
    ("algo", "expected"),
    [("trpo", {"n_critic_updates": 20, "n_steps": 512, "n_envs": 2}), ("acktr", {"n_steps": 10, "n_envs": 8})],
)
def test_train_enjoy_and_load(tmp_path, algo, expected):
    result = zoo("train", "--algo", algo, "--env", "CartPole-v1", "-n", "2000", "--seed", "3", "-P", *FAST, cwd=tmp_path)
    assert f"Loading hyperparameters from: {hyperparams_path(algo)}" in result.stdout
    assert "/2,000" in result.stdout  # the -P progress bar ran to the end

    run = tmp_path / "logs" / algo / "CartPole-v1_1"
    model_path = run / "CartPole-v1.zip"
    assert model_path.is_file() and (run / "0.monitor.csv").is_file()
    config = yaml.load((run / "CartPole-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    for key, value in expected.items():
        assert config[key] == value
    args = yaml.load((run / "CartPole-v1" / "args.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert args["algo"] == algo and args["conf_file"] == hyperparams_path(algo)

    # 600 steps: CartPole-v1 ends every episode by step 500, so at least one episode is reported.
    result = zoo("enjoy", "--algo", algo, "--env", "CartPole-v1", "-f", "logs", "--no-render", "-n", "600", cwd=tmp_path)
    assert f"Loading {Path('logs') / algo / 'CartPole-v1_1' / 'CartPole-v1.zip'}" in result.stdout
    assert "Episode Reward" in result.stdout

    # The zoo-trained model is one of ours, loadable from plain Python.
    model = ALGOS[algo].load(model_path, device="cpu")
    assert type(model) is ALGOS[algo]
    assert model.n_envs == expected["n_envs"] and model.n_steps == expected["n_steps"]
    assert model.num_timesteps >= 2000
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(int(action))


def test_optimize_then_train_from_a_trial(tmp_path):
    storage = tmp_path / "optuna" / "trpo.log"
    # Trial budgets are tiny: each trial still runs at least one full rollout.
    zoo(
        "train", "--algo", "trpo", "--env", "CartPole-v1", "-optimize", "--n-trials", "2", "--n-timesteps", "1000",
        "--n-startup-trials", "1", "--n-evaluations", "1", "--eval-episodes", "2", "--sampler", "random",
        "--storage", str(storage), "--study-name", "trpo-cartpole", "--no-optim-plots", "--seed", "2", *FAST,
        cwd=tmp_path,
    )  # fmt: skip
    assert len(list((tmp_path / "logs" / "trpo").glob("report_CartPole-v1_2-trials-1000-random-median_*.csv"))) == 1
    study = optuna.load_study(study_name="trpo-cartpole", storage=journal(storage))
    states = [trial.state for trial in study.trials]
    assert len(states) == 2 and optuna.trial.TrialState.FAIL not in states
    sampled = {"target_kl", "cg_damping", "cg_preconditioner", "fisher_subsample"}
    assert all(set(trial.params) >= sampled for trial in study.trials)

    # Train with trial 1's hyperparameters, read back through our converter.
    zoo(
        "train", "--algo", "trpo", "--env", "CartPole-v1", "-n", "600", "--storage", str(storage),
        "--study-name", "trpo-cartpole", "--trial-id", "1", *FAST, cwd=tmp_path,
    )  # fmt: skip
    runs = sorted((tmp_path / "logs" / "trpo").glob("CartPole-v1_*/CartPole-v1/config.yml"))
    config = yaml.load(runs[-1].read_text(), Loader=yaml.UnsafeLoader)
    params = study.trials[1].params
    assert config["target_kl"] == pytest.approx(params["target_kl"])
    assert config["n_steps"] == 2 ** params["n_steps_pow"]
    assert config["gamma"] == pytest.approx(1 - params["one_minus_gamma"])


def test_two_workers_share_one_journal_study(tmp_path):
    storage = tmp_path / "study.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [
                sys.executable, "-m", "sb3_trpo_kfac", "train", "--algo", "acktr", "--env", "CartPole-v1",
                "-optimize", "--n-trials", "2", "--n-timesteps", "800", "--n-startup-trials", "1",
                "--n-evaluations", "1", "--eval-episodes", "2", "--storage", str(storage), "--study-name", "shared",
                "--no-optim-plots", "--seed", str(seed), "-f", f"logs_{seed}", *FAST,
            ],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed in (11, 12)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="shared", storage=journal(storage))
    assert len(study.trials) == 4
    assert all(trial.state != optuna.trial.TrialState.FAIL for trial in study.trials)
    workers_seen = {trial.user_attrs["worker"] for trial in study.trials}
    assert len(workers_seen) == 2  # both processes ran trials of the one study
    assert sorted(trial.number for trial in study.trials) == [0, 1, 2, 3]
    assert math.isfinite(study.best_value)
    assert all(np.isfinite(trial.value) for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE)
