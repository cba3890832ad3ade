"""
Command line entry: rl-zoo3's ``train`` / ``enjoy`` (and plotting scripts) with our algorithms registered.

``python -m sb3_trpo_kfac train --algo acktr --env CartPole-v1`` behaves exactly like
``python -m rl_zoo3.cli train ...`` -- same flags, logs, saved models, ``config.yml`` and tensorboard output in the
same places -- except that "trpo" / "acktr" are ours and, for those two, ``--conf-file`` defaults to the
hyperparameter file shipped with this package.
"""

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from sb3_trpo_kfac.zoo import ALGO_NAMES, hyperparams_path, register

_USAGE = """usage: {prog} {{train,enjoy,plot_train,plot_from_file,all_plots}} [rl-zoo3 options]

rl-zoo3 with sb3_trpo_kfac's TRPO ("trpo") and ACKTR ("acktr") registered. For "trpo"/"acktr" the
hyperparameters default to the files shipped with sb3_trpo_kfac (override with --conf-file).
`{prog} train -h` lists rl-zoo3's options.

examples:
  {prog} train --algo acktr --env CartPole-v1
  {prog} enjoy --algo acktr --env CartPole-v1 -f logs/
  {prog} train --algo trpo --env Pendulum-v1 -optimize --n-trials 100 --storage study.log --study-name trpo-pendulum
"""

_SCRIPTS = ("train", "enjoy", "plot_train", "plot_from_file", "all_plots")


def _peek(args: Sequence[str]) -> argparse.Namespace:
    """
    Read the few rl-zoo3 ``train`` options this entry cares about, with argparse's own rules (abbreviations,
    ``--opt=value``), as rl-zoo3 will read them; everything else is left to rl-zoo3.

    :param args: the arguments after ``train``
    :return: ``algo``, ``conf_file`` and ``optimize``
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("-optimize", "--optimize-hyperparameters", dest="optimize", action="store_true")
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


def _require(module: str, why: str) -> None:
    # rl-zoo3 imports these without declaring them: say so now rather than crash later (after a whole study).
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{why} needs the `{module}` package: pip install {module}")


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run an rl-zoo3 script with our algorithms registered.

    :param argv: ``[script, *rl-zoo3 options]``; defaults to ``sys.argv[1:]``
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "sb3-trpo-kfac" if sys.argv and not sys.argv[0].endswith("__main__.py") else "python -m sb3_trpo_kfac"
    if not argv or argv[0] in ("-h", "--help"):
        # Asked for help: stdout, success. No command at all: a usage error, like argparse's.
        print(_USAGE.format(prog=prog), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    script, args = argv[0], argv[1:]
    if script not in _SCRIPTS:
        raise SystemExit(f"{prog}: unknown command {script!r}, expected one of {', '.join(_SCRIPTS)}")

    register()
    # rl-zoo3's scripts parse sys.argv themselves.
    if script == "train":
        args = with_default_conf_file(args)
        if _peek(args).optimize:
            _require("pandas", "rl-zoo3's optimization report (study.trials_dataframe)")
        from rl_zoo3.train import train

        sys.argv = [f"{prog} train", *args]
        train()
    elif script == "enjoy":
        _require("requests", "rl-zoo3's enjoy script")
        from rl_zoo3.enjoy import enjoy

        sys.argv = [f"{prog} enjoy", *args]
        enjoy()
    else:
        # Imported one by one: each plotting script has its own optional dependencies.
        plot = importlib.import_module(f"rl_zoo3.plots.{script}")
        sys.argv = [f"{prog} {script}", *args]
        getattr(plot, script)()
