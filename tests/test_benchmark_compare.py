"""
The side-by-side benchmark (benchmarks/compare_with_peers.py): the zoo commands it builds, the peer hyperparameter
file it derives for env versions rl-zoo3 lacks, and the steps-to-threshold rule. The training itself is the zoo's.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_with_peers.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_with_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_peer_conf_file_copies_the_entry_of_another_version(compare, tmp_path):
    import rl_zoo3

    shipped = yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / "ppo.yml").read_text())
    assert "HalfCheetah-v5" not in shipped  # what the aliasing is for; drop it when rl-zoo3 gains v5 entries
    path = compare.peer_conf_file(compare.ALGOS["ppo"], ["CartPole-v1", "HalfCheetah-v5"], tmp_path)
    copied = yaml.safe_load(path.read_text())
    assert copied == {"CartPole-v1": shipped["CartPole-v1"], "HalfCheetah-v5": shipped["HalfCheetah-v4"]}
    # every env present: rl-zoo3's own file is used as it is
    assert compare.peer_conf_file(compare.ALGOS["a2c"], ["CartPole-v1", "Pendulum-v1"], tmp_path) is None
    with pytest.raises(SystemExit, match="NoSuchEnv-v1"):
        compare.peer_conf_file(compare.ALGOS["a2c"], ["NoSuchEnv-v1"], tmp_path)


def test_train_commands(compare, tmp_path):
    setting = compare.ENVS["CartPole-v1"]
    ours = compare.train_command(compare.ALGOS["trpo"], "CartPole-v1", 3, setting, False, tmp_path, None)
    assert ours[1:5] == ["-m", "sb3_trpo_kfac", "train", "--algo"] and "--conf-file" not in ours
    peer = compare.train_command(
        compare.ALGOS["sb3-contrib-trpo"], "CartPole-v1", 3, setting, True, tmp_path, tmp_path / "c.yml"
    )
    assert peer[1:5] == ["-m", "rl_zoo3.train", "--algo", "trpo"]
    options = dict(zip(peer[5::2], peer[6::2]))
    assert options["-n"] == str(setting.quick_budget) and options["--eval-freq"] == str(setting.quick_eval_freq)
    assert options["--seed"] == "3" and options["--conf-file"] == str(tmp_path / "c.yml")


def test_steps_to_threshold(compare):
    steps = np.array([1000, 2000, 3000])
    assert compare.steps_to_threshold(steps, np.array([10.0, 480.0, 400.0]), 475.0) == 2000
    assert compare.steps_to_threshold(steps, np.array([10.0, 20.0, 30.0]), 475.0) == float("inf")


def test_final_return_averages_the_last_tenth(compare):
    steps = np.arange(1, 11) * 10_000  # evaluations at 10k ... 100k
    returns = np.arange(10, dtype=float)[:, None] * np.ones((1, 3))
    assert compare.final_return(steps, returns) == pytest.approx(8.5)  # the 90k and 100k evaluations


def test_only_successful_runs_count_as_finished(compare, tmp_path):
    assert compare.finished(tmp_path) is None  # never ran (or was interrupted before the end)
    (tmp_path / "result.json").write_text('{"returncode": 1, "wall_time_s": 3.0}')
    assert compare.finished(tmp_path) is None  # failed: run again, never reported
    (tmp_path / "result.json").write_text('{"returncode": 0, "wall_time_s": 3.0}')
    assert compare.finished(tmp_path)["wall_time_s"] == 3.0
