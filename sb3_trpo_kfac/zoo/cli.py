"""
Command line entry: rl-zoo3's scripts (``train``, ``enjoy``, ``record_video``, the plots, ...) with our algorithms
registered.

``python -m sb3_trpo_kfac train --algo acktr --env CartPole-v1`` behaves exactly like
``python -m rl_zoo3.cli train ...`` -- same flags, logs, saved models, ``config.yml`` and tensorboard output in the
same places -- except that "trpo" / "acktr" are ours and, for those two, ``--conf-file`` defaults to the
hyperparameter file shipped with this package. Each command checks up front for the optional packages it needs and
names the extra of this package that installs them.
"""

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import runpy
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sb3_trpo_kfac.zoo import ALGO_NAMES, hyperparams_path, register

PACKAGE = "sb3_trpo_kfac"


@dataclasses.dataclass(frozen=True)
class Command:
    """
    One subcommand: an rl-zoo3 script run in this process with our algorithms registered.

    :param module: the rl-zoo3 module
    :param function: its entry function, or None for a script whose code runs under ``if __name__ == "__main__"``
    :param summary: one line for the usage text
    :param needs: modules it imports that rl-zoo3 does not declare
    :param extra: the extra of this package that installs them (None: they are dependencies of this package)
    """

    module: str
    function: str | None
    summary: str
    needs: tuple[str, ...] = ()
    extra: str | None = None


COMMANDS: dict[str, Command] = {
    "train": Command("rl_zoo3.train", "train", "train, continue (-i) or tune (-optimize) an agent"),
    "enjoy": Command("rl_zoo3.enjoy", "enjoy", "run, render and evaluate a trained agent", ("requests",)),
    "record_video": Command("rl_zoo3.record_video", None, "record an mp4 of a trained agent", ("moviepy",), "video"),
    "record_training": Command(
        "rl_zoo3.record_training", None, "one mp4 of a run's checkpoints, final and best models", ("moviepy",), "video"
    ),
    "plot_train": Command(
        "rl_zoo3.plots.plot_train",
        "plot_train",
        "training curves from the monitor files",
        ("matplotlib", "seaborn"),
        "plots",
    ),
    "all_plots": Command(
        "rl_zoo3.plots.all_plots",
        "all_plots",
        "evaluation curves and a results table of many runs",
        ("matplotlib", "seaborn", "scipy"),
        "plots",
    ),
    "plot_from_file": Command(
        "rl_zoo3.plots.plot_from_file",
        "plot_from_file",
        "plots (-o image) from the file all_plots -o writes",
        ("matplotlib", "seaborn", "pandas"),
        "plots",
    ),
    "benchmark": Command("rl_zoo3.benchmark", None, "evaluate every trained agent of a log folder (--no-hub: offline)"),
    "push_to_hub": Command(
        "rl_zoo3.push_to_hub",
        None,
        "upload an agent, its video and model card to the Hugging Face Hub",
        ("moviepy",),
        "video",
    ),
    "load_from_hub": Command("rl_zoo3.load_from_hub", None, "download an agent from the Hugging Face Hub"),
}

# Environments that gymnasium renders with pygame (package "pygame-ce" or "pygame").
_PYGAME_ENVS = ("gymnasium.envs.classic_control", "gymnasium.envs.box2d", "gymnasium.envs.toy_text")


def _usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    lines = []
    for name, command in COMMANDS.items():
        extra = f'  [needs: pip install "{PACKAGE}[{command.extra}]"]' if command.extra else ""
        lines.append(f"  {name:<{width}}  {command.summary}{extra}")
    return f"""usage: {prog} {{{",".join(COMMANDS)}}} [rl-zoo3 options]

rl-zoo3 with sb3_trpo_kfac's TRPO ("trpo") and ACKTR ("acktr") registered. For "trpo"/"acktr" the
hyperparameters default to the files shipped with sb3_trpo_kfac (override with --conf-file).
`{prog} COMMAND -h` lists rl-zoo3's options of a command.

commands:
{chr(10).join(lines)}
  (-tb needs "{PACKAGE}[tensorboard]"; rendering and recording classic control, Box2D and toy-text envs
  need pygame, in "{PACKAGE}[video]"; everything: "{PACKAGE}[extra]")

examples:
  {prog} train --algo acktr --env CartPole-v1
  {prog} enjoy --algo acktr --env CartPole-v1 -f logs/
  {prog} record_video --algo acktr --env CartPole-v1 -f logs/ -n 500
  {prog} train --algo trpo --env Pendulum-v1 -optimize --n-trials 100 --storage study.log --study-name trpo-pendulum

data-parallel (one process per rank; -n, --eval-freq, --save-freq count all ranks' steps, --n-envs and the
entry's n_envs / n_steps are per rank; rank 0 alone writes the log folder):
  torchrun --nproc-per-node 2 -m {PACKAGE} train --algo trpo --env CartPole-v1
"""


def _peek(args: Sequence[str]) -> argparse.Namespace:
    """
    Read the few rl-zoo3 options this entry cares about, with argparse's own rules (abbreviations, ``--opt=value``),
    as rl-zoo3 will read them; everything else is left to rl-zoo3.

    :param args: the arguments after the command
    :return: the options below, with rl-zoo3's defaults
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("-optimize", "--optimize-hyperparameters", dest="optimize", action="store_true")
    parser.add_argument("-tb", "--tensorboard-log", default="")
    parser.add_argument("--track", action="store_true")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--no-render", action="store_true")
    parser.add_argument("-r", "--rliable", action="store_true")
    parser.add_argument("-o", "--output-folder", default=None)
    known, _ = parser.parse_known_args(list(args))
    return known


def with_default_conf_file(args: Sequence[str]) -> list[str]:
    """
    Add ``--conf-file <shipped {algo}.yml>`` to rl-zoo3 ``train`` arguments when the algorithm is ours and the user
    gave no config file; otherwise return the arguments unchanged.

    :param args: the arguments after ``train``
    :return: the arguments to hand to rl-zoo3
    """
    known = _peek(args)
    if known.conf_file is None and known.algo in ALGO_NAMES:
        return [*args, "--conf-file", hyperparams_path(known.algo)]
    return list(args)


def saved_config_as_conf_file(args: Sequence[str]) -> list[str]:
    """
    Let ``--conf-file`` name the ``config.yml`` an rl-zoo3 run saved (``logs/{algo}/{env}_{N}/{env}/config.yml``):
    the hyperparameters the run used, e.g. to continue it with ``-i`` without the entry's values replacing them.

    rl-zoo3 writes that file as a Python-tagged ``OrderedDict`` of one run's values, which its own ``--conf-file``
    (a ``yaml.safe_load``-ed file of entries keyed by env id) cannot read. Such a file is handed to rl-zoo3 as a
    generated Python config file (rl-zoo3's ``.py`` format) holding its values as the entry of ``--env``; any other
    file is left alone.

    :param args: the arguments after ``train``
    :return: the arguments to hand to rl-zoo3
    """
    known = _peek(args)
    path = known.conf_file
    if path is None or not path.endswith((".yml", ".yaml")) or not os.path.isfile(path):
        return list(args)
    with open(path) as file:
        if not file.readline().startswith("!!python/object/apply:collections.OrderedDict"):
            return list(args)
    # Loaded in rl-zoo3's process the way rl-zoo3 reads this file itself (utils.get_saved_hyperparams).
    saved = str(Path(path).resolve())
    source = (
        f"# Written by {PACKAGE}: the hyperparameters saved in {saved!r}, as the entry of {known.env!r}\n"
        "import yaml\n\n"
        f"with open({saved!r}) as file:\n"
        f"    hyperparams = {{{known.env!r}: dict(yaml.load(file, Loader=yaml.UnsafeLoader))}}\n"
    )
    generated = Path(tempfile.mkdtemp(prefix=f"{PACKAGE}_")) / "saved_config.py"
    generated.write_text(source)
    # argparse keeps the last value given: the generated file replaces the user's, however that was spelled.
    return [*args, "--conf-file", str(generated)]


def _missing(modules: Sequence[str]) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module) is None]


def _fail(message: str) -> NoReturn:
    # One line on stderr, exit code 1, no traceback.
    raise SystemExit(message)


def _require(prog: str, what: str, modules: Sequence[str], extra: str | None) -> None:
    """
    Exit with one line naming what to install if any of ``modules`` cannot be imported.

    :param prog: the program name, for the message
    :param what: the command or option that needs them
    :param modules: importable module names
    :param extra: the extra of this package that installs them; None: name the packages themselves
    """
    missing = _missing(modules)
    if missing:
        install = f'pip install "{PACKAGE}[{extra}]"' if extra else f"pip install {' '.join(missing)}"
        _fail(f"{prog}: {what} needs {', '.join(missing)}, not installed: {install}")


def _renders_with_pygame(env_id: str) -> bool:
    import gymnasium as gym

    spec = gym.envs.registry.get(env_id)
    entry_point = spec.entry_point if spec is not None else None
    return isinstance(entry_point, str) and entry_point.startswith(_PYGAME_ENVS)


def check_requirements(prog: str, name: str, args: Sequence[str]) -> None:
    """
    Check up front that a command's optional dependencies are installed, rather than fail inside rl-zoo3 (after a
    whole training run or study in the worst case). Exits with one line naming the extra to install.

    :param prog: the program name, for the message
    :param name: the command
    :param args: its arguments
    """
    command = COMMANDS[name]
    _require(prog, name, command.needs, command.extra)
    known = _peek(args)
    if name == "train":
        if known.tensorboard_log:
            _require(prog, "train -tb", ("tensorboard",), "tensorboard")
        if known.track:
            # Weights & Biases, synchronised from the tensorboard logs rl-zoo3 then writes
            _require(prog, "train --track", ("wandb", "tensorboard"), "extra")
        if known.optimize:
            # rl-zoo3's optimization report (study.trials_dataframe)
            _require(prog, "train -optimize", ("pandas",), None)
            if known.sampler == "auto":
                _require(prog, "train -optimize --sampler auto", ("optunahub",), "extra")
    if name == "plot_from_file" and known.rliable:
        _require(prog, "plot_from_file --rliable", ("rliable",), "extra")
    if name == "push_to_hub":
        _check_push_to_hub(prog)
    renders = name in ("record_video", "record_training", "push_to_hub") or (name == "enjoy" and not known.no_render)
    if renders and _renders_with_pygame(known.env):
        _require(prog, f"{name} (rendering {known.env})", ("pygame",), "video")


def _check_push_to_hub(prog: str) -> None:
    # rl-zoo3 2.9.2's push_to_hub imports a function that sb3-team-hf-integration 3.2 (huggingface_sb3) no longer has.
    try:
        from huggingface_sb3.push_to_hub import generate_metadata  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as error:
        from importlib.metadata import version

        _fail(
            f"{prog}: push_to_hub cannot run: rl-zoo3 {version('rl_zoo3')}'s push_to_hub does not work with the "
            f"installed huggingface_sb3 (sb3-team-hf-integration {version('sb3-team-hf-integration')}): {error}"
        )


@contextlib.contextmanager
def _ffmpeg_on_path(prog: str, name: str) -> Iterator[None]:
    """
    Make an ``ffmpeg`` executable callable by name, as ``record_training`` and ``push_to_hub`` call it
    (``os.system("ffmpeg ...")``): the system's, or else the one the ``imageio-ffmpeg`` package ships (moviepy's).

    :param prog: the program name, for the message if there is none
    :param name: the command
    """
    if shutil.which("ffmpeg") is not None:
        yield
        return
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]

        executable = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        _fail(
            f'{prog}: {name} needs the ffmpeg executable, not found: pip install "{PACKAGE}[video]" (or install ffmpeg)'
        )
    with tempfile.TemporaryDirectory(prefix=f"{PACKAGE}_ffmpeg_") as folder:
        os.symlink(executable, os.path.join(folder, "ffmpeg"))
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = folder + os.pathsep + path
        try:
            yield
        finally:
            os.environ["PATH"] = path


@contextlib.contextmanager
def _zoo_subprocesses_run_here() -> Iterator[None]:
    """
    rl-zoo3's ``record_training`` and ``benchmark`` run other rl-zoo3 scripts as ``python -m rl_zoo3.record_video``
    and ``python enjoy.py`` (a file of rl-zoo3's repository, not of the installed package): run them as our command
    with this interpreter instead, so that they know our algorithms.
    """
    original = subprocess.call

    def call(popenargs: Any, *args: Any, **kwargs: Any) -> int:
        if isinstance(popenargs, list) and popenargs[:3] == ["python", "-m", "rl_zoo3.record_video"]:
            popenargs = [sys.executable, "-m", PACKAGE, "record_video", *popenargs[3:]]
        elif isinstance(popenargs, list) and popenargs[:2] == ["python", "enjoy.py"]:
            popenargs = [sys.executable, "-m", PACKAGE, "enjoy", *popenargs[2:]]
        return original(popenargs, *args, **kwargs)

    subprocess.call = call  # type: ignore[assignment]
    try:
        yield
    finally:
        subprocess.call = original


def _run(prog: str, name: str, args: list[str]) -> None:
    """
    Check a command's requirements, register our algorithms and run the rl-zoo3 script in this process.

    :param prog: the program name, for messages and the scripts' usage lines
    :param name: the command
    :param args: its arguments
    """
    command = COMMANDS[name]
    check_requirements(prog, name, args)
    register()
    if name == "train":
        args = with_default_conf_file(saved_config_as_conf_file(args))
    output = _peek(args).output_folder
    if name == "record_training" and output is not None and not os.path.isabs(output):
        # rl-zoo3 lists the clips for ffmpeg's concat by this path, which ffmpeg reads relative to the list's folder
        args = [*args, "--output-folder", os.path.abspath(output)]
    # rl-zoo3's scripts parse sys.argv themselves.
    sys.argv = [f"{prog} {name}", *args]
    with contextlib.ExitStack() as stack:
        if name == "train":  # under torchrun with several processes: this rank's arguments, in a process group
            from sb3_trpo_kfac.zoo.data_parallel import data_parallel_train  # imports torch

            sys.argv = [sys.argv[0], *stack.enter_context(data_parallel_train(prog, args))]
        if name in ("record_training", "push_to_hub"):
            stack.enter_context(_ffmpeg_on_path(prog, name))
        if name in ("record_training", "benchmark"):
            stack.enter_context(_zoo_subprocesses_run_here())
        if command.function is None:
            runpy.run_module(command.module, run_name="__main__")
        else:
            # Imported one by one: each script has its own optional dependencies.
            getattr(importlib.import_module(command.module), command.function)()


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (e.g. ``| head``), rather than another pipe being broken."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):
        return True  # cannot tell (Windows): the usual cause
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _exit_quietly_if_stdout_closed(error: BrokenPipeError, code: int | str | None) -> NoReturn:
    """
    Stop without a traceback if stdout's reader went away (``| head``), as argparse's own ``--help`` does;
    re-raise ``error`` if it came from another pipe.

    :param error: the broken pipe
    :param code: the exit status (or message) to exit with
    """
    if not _stdout_closed():
        raise error
    # Nothing more may be flushed into the closed pipe, by us or at interpreter exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(code) from None


def _flush_stdout(code: int | str | None) -> None:
    # A reader that went away shows here at the latest, not in a traceback at interpreter exit.
    if sys.stdout is None:  # no console (pythonw)
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError as error:
        _exit_quietly_if_stdout_closed(error, code)


def _main(argv: list[str]) -> None:
    prog = "sb3-trpo-kfac" if sys.argv and not sys.argv[0].endswith("__main__.py") else f"python -m {PACKAGE}"
    if not argv or argv[0] in ("-h", "--help"):
        # Asked for help: stdout, success. No command at all: a usage error, like argparse's.
        code = 0 if argv else 2
        try:
            print(_usage(prog), file=sys.stdout if argv else sys.stderr)
        except BrokenPipeError as error:
            _exit_quietly_if_stdout_closed(error, code)
        raise SystemExit(code)
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        _fail(f"{prog}: unknown command {name!r}, expected one of {', '.join(COMMANDS)}")
    _run(prog, name, args)


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run an rl-zoo3 script with our algorithms registered.

    :param argv: ``[command, *rl-zoo3 options]``; defaults to ``sys.argv[1:]``
    """
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        _flush_stdout(exit_.code)
        raise
    except BrokenPipeError as error:
        _exit_quietly_if_stdout_closed(error, 1)  # cut short (e.g. training output piped to head)
    _flush_stdout(0)
