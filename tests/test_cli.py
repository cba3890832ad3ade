"""
The command ``python -m sb3_trpo_kfac COMMAND``: every rl-zoo3 script as a subcommand with our algorithms registered,
optional dependencies checked up front (one line naming the extra), a closed stdout, and the plotting / video
commands and ``train -i`` run for real on two short training runs.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.zoo import cli
from sb3_trpo_kfac.zoo.cli import COMMANDS, check_requirements, main

PROG = "sb3-trpo-kfac"
# Commands whose rl-zoo3 parser restricts --algo to the registered algorithms.
ALGO_CHOICES = ("train", "enjoy", "record_video", "record_training", "push_to_hub", "load_from_hub")
# One torch thread per process: the CI machine has 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def push_to_hub_can_run() -> bool:
    try:
        from huggingface_sb3.push_to_hub import generate_metadata  # noqa: F401
    except ImportError:
        return False
    return True


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the command; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "sb3_trpo_kfac", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# ---------------------------------------------------------------------------------------------------------------
# Help, and the optional dependencies
# ---------------------------------------------------------------------------------------------------------------


def test_usage_lists_every_command_with_its_extra(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name, spec in COMMANDS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert (f'"sb3_trpo_kfac[{spec.extra}]"' in line) == (spec.extra is not None), line


# In one process, the scripts imported for other commands' help are already there when runpy runs a script.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [PROG])  # the scripts parse sys.argv: restored afterwards
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    if name == "push_to_hub" and not push_to_hub_can_run():
        # rl-zoo3 2.9.2's script imports a function sb3-team-hf-integration 3.2 removed: said in one line
        assert "push_to_hub cannot run" in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
        return
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if name in ALGO_CHOICES:
        assert "acktr" in out and "trpo" in out  # our algorithms are valid --algo choices


@pytest.mark.parametrize(
    ("args", "blocked", "extra"),
    [
        (["plot_train", "--help"], "seaborn", "plots"),
        (["all_plots", "--help"], "scipy", "plots"),
        (["plot_from_file", "--help"], "matplotlib", "plots"),
        (["plot_from_file", "-i", "results.pkl", "--rliable"], "rliable", "extra"),
        (["record_video", "--algo", "acktr"], "moviepy", "video"),
        (["record_training", "--algo", "acktr"], "moviepy", "video"),
        (["record_video", "--algo", "acktr", "--env", "Acrobot-v1"], "pygame", "video"),
        (["enjoy", "--algo", "acktr", "--env", "CartPole-v1"], "pygame", "video"),
        (["train", "--algo", "acktr", "-tb", "runs"], "tensorboard", "tensorboard"),
        (["train", "--algo", "acktr", "--track"], "wandb", "extra"),
        (["train", "--algo", "acktr", "-optimize", "--sampler", "auto"], "optunahub", "extra"),
    ],
)
def test_missing_extra_is_named_before_anything_runs(args, blocked, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, blocked, None)  # importlib finds no such module
    monkeypatch.setattr(sys, "argv", [PROG])

    def registered():
        raise AssertionError("reached rl-zoo3")

    monkeypatch.setattr(cli, "register", registered)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert blocked in message and f'pip install "sb3_trpo_kfac[{extra}]"' in message


@pytest.mark.parametrize(
    "args",
    [
        ["enjoy", "--algo", "acktr", "--env", "CartPole-v1", "--no-render"],  # no rendering
        ["record_video", "--algo", "acktr", "--env", "HalfCheetah-v5"],  # MuJoCo renders without pygame
        ["train", "--algo", "acktr", "--env", "CartPole-v1"],
    ],
)
def test_pygame_only_where_it_renders(args, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)
    check_requirements(PROG, args[0], args[1:])


def test_missing_extra_through_the_command_is_one_line_exit_1(tmp_path):
    # The real entry module, in a process where seaborn cannot be imported.
    code = (
        "import runpy, sys; sys.modules['seaborn'] = None; sys.argv = ['-m', 'plot_train', '--help']; "
        "runpy.run_module('sb3_trpo_kfac', run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'python -m sb3_trpo_kfac: plot_train needs seaborn, not installed: pip install "sb3_trpo_kfac[plots]"'
    ]
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------------------------
# A reader that goes away
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--help"], 0),  # as argparse's own --help (a command's --help is argparse's, which ignores a failed write)
        (["train", "--algo", "acktr", "--env", "CartPole-v1", "-n", "2000", "--eval-freq", "-1"], 1),  # cut short
    ],
)
def test_closed_stdout_exits_quietly(args, status, tmp_path):
    # `... | head` where head is gone before anything is written: the read end is closed before the start.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sb3_trpo_kfac", *args],
            cwd=tmp_path, env=ENV, stdout=write_end, stderr=subprocess.PIPE, text=True, check=False, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == status
    assert result.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_other_broken_pipes_still_raise(monkeypatch):
    # e.g. a SubprocVecEnv worker that died: not a reader of stdout going away, so not silenced
    def broken(*args):
        raise BrokenPipeError("worker pipe")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(BrokenPipeError, match="worker pipe"):
        main(["train", "--algo", "acktr"])


def test_zoo_subprocesses_run_as_our_commands(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda args, *rest, **kwargs: calls.append(args) or 0)
    with cli._zoo_subprocesses_run_here():
        # what rl-zoo3's record_training and benchmark run
        subprocess.call(["python", "-m", "rl_zoo3.record_video", "--algo", "acktr"])
        subprocess.call(["python", "enjoy.py", "--algo", "acktr", "--no-render"])
        subprocess.call(["ffmpeg", "-i", "x.mp4"])
    subprocess.call(["python", "enjoy.py"])  # restored afterwards
    assert calls == [
        [sys.executable, "-m", "sb3_trpo_kfac", "record_video", "--algo", "acktr"],
        [sys.executable, "-m", "sb3_trpo_kfac", "enjoy", "--algo", "acktr", "--no-render"],
        ["ffmpeg", "-i", "x.mp4"],
        ["python", "enjoy.py"],
    ]


# ---------------------------------------------------------------------------------------------------------------
# Real runs: two short trainings (the second continues the first), then plots and videos of them
# ---------------------------------------------------------------------------------------------------------------

RUN = ["--algo", "acktr", "--env", "CartPole-v1", "-n", "480", "--num-threads", "1"]
# 8 environments: an evaluation (2 episodes) every 20 steps of each, at 160, 320 and 480 steps
EVAL = ["--eval-freq", "160", "--eval-episodes", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two ACKTR CartPole runs with evaluations: logs/acktr/CartPole-v1_1 and _2, _2 continuing _1 (``-i``)."""
    folder = tmp_path_factory.mktemp("zoo")
    command("train", *RUN, *EVAL, "--seed", "0", "-params", "kfac_clip:0.02", cwd=folder)
    run = folder / "logs" / "acktr" / "CartPole-v1_1"
    # docs/zoo.md, "Continuing a run": the run's saved config keeps its values (here kfac_clip 0.02, not the entry's)
    result = command(
        "train", *RUN, *EVAL, "--seed", "1", "-i", str(run / "CartPole-v1.zip"),
        "--conf-file", str(run / "CartPole-v1" / "config.yml"), cwd=folder,
    )  # fmt: skip
    assert "Loading pretrained agent" in result.stdout
    return folder


def test_continue_with_the_saved_config_keeps_its_values(runs):
    entry = yaml.safe_load(Path(cli.hyperparams_path("acktr")).read_text())["CartPole-v1"]
    assert entry["kfac_clip"] == 0.01  # what plain `-i` would apply instead
    run = runs / "logs" / "acktr" / "CartPole-v1_2"
    config = yaml.load((run / "CartPole-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    assert config["kfac_clip"] == 0.02
    model = ACKTR.load(run / "CartPole-v1.zip", device="cpu")
    assert model.kfac_clip == 0.02
    assert [group["kfac_clip"] for group in model.policy.optimizer.param_groups] == [0.02]
    # rl-zoo3 restarts the step counter of a continued run (documented)
    assert model.num_timesteps == 480


def test_plots_from_the_runs(runs):
    # training curves: plot_train only shows its figure (nothing to save; Agg: no window)
    command("plot_train", "-a", "acktr", "-e", "CartPole-v1", "-f", "logs", "-w", "2", cwd=runs)
    # evaluation curves of the two runs, saved, then plotted to a PNG
    result = command(
        "all_plots", "-a", "acktr", "-e", "CartPole-v1", "-f", "logs", "-o", "results", "--no-display", cwd=runs
    )
    assert "CartPole-v1" in result.stdout  # the results table
    with open(runs / "results.pkl", "rb") as file:
        results = pickle.load(file)
    assert results["CartPole-v1"]["ACKTR-logs"]["last_evals"].shape == (2,)  # both runs
    command("plot_from_file", "-i", "results.pkl", "-o", "scores.png", "--format", "png", cwd=runs)
    assert (runs / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def is_mp4(path: Path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[4:8] == b"ftyp"


def test_record_video(runs):
    command(
        "record_video", "--algo", "acktr", "--env", "CartPole-v1", "-f", "logs", "--exp-id", "1", "-n", "50",
        "-o", "videos", cwd=runs,
    )  # fmt: skip
    videos = list((runs / "videos").glob("*.mp4"))
    assert [video.name for video in videos] == ["final-model-acktr-CartPole-v1-step-0-to-step-50.mp4"]
    assert is_mp4(videos[0])


def test_record_training(runs):
    # rl-zoo3 records each model in a `python -m rl_zoo3.record_video` subprocess, ours in our record_video
    result = command(
        "record_training", "--algo", "acktr", "--env", "CartPole-v1", "-f", "logs", "--exp-id", "2", "-n", "30",
        "-o", "training_videos", cwd=runs,
    )  # fmt: skip
    assert "Saving video to" in result.stdout
    assert is_mp4(runs / "training_videos" / "training.mp4")  # final and best model, joined by ffmpeg
