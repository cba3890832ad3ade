"""
rl-zoo3 integration: registration of ``TRPO`` and ``ACKTR``, the shipped hyperparameter files, Optuna samplers.

rl-zoo3 has no plugin mechanism. Its modules (``train``, ``enjoy``, ``exp_manager``, ``record_video``, ...) all bind
the same ``rl_zoo3.utils.ALGOS`` dict and ``rl_zoo3.hyperparams_opt`` sampler/converter dicts by reference, so
:func:`register` fills those dicts in place before rl-zoo3's own ``train()`` / ``enjoy()`` run. Use it directly::

    from sb3_trpo_kfac.zoo import register
    register()
    # ... then call rl_zoo3's train() / enjoy() as usual

or through the command ``python -m sb3_trpo_kfac COMMAND ...`` (``train``, ``enjoy``, ``record_video``, ...;
console script ``sb3-trpo-kfac``).
"""

import functools
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from sb3_trpo_kfac.zoo.samplers import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

__all__ = ["ALGO_NAMES", "hyperparams_path", "register"]

#: The rl-zoo3 algorithm names this package provides ("trpo" replaces sb3-contrib's TRPO).
ALGO_NAMES = ("trpo", "acktr")


def hyperparams_path(algo: str) -> str:
    """
    Path of the shipped rl-zoo3 hyperparameter file for one of our algorithms.

    Found through ``importlib.resources`` so that it works from a source checkout, an editable and a regular
    (wheel) install alike.

    :param algo: "trpo" or "acktr"
    :return: a filesystem path to ``{algo}.yml``
    """
    if algo not in ALGO_NAMES:
        raise ValueError(f"No shipped hyperparameters for algo {algo!r}, expected one of {ALGO_NAMES}")
    resource = resources.files("sb3_trpo_kfac.zoo_hyperparams").joinpath(f"{algo}.yml")
    if isinstance(resource, Path):
        return str(resource)
    # Zipped install: rl-zoo3 opens the file by name, so give it a real one.
    target = Path(tempfile.mkdtemp(prefix="sb3_trpo_kfac_")) / f"{algo}.yml"
    with resources.as_file(resource) as path:
        shutil.copyfile(path, target)
    return str(target)


def _numerical_errors() -> tuple[type[BaseException], ...]:
    import torch as th

    # A bad step size or damping can make an eigendecomposition or a float operation fail: that is a bad trial.
    return (AssertionError, ValueError, FloatingPointError, th.linalg.LinAlgError)


def robust_objective(objective: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
    """
    Wrap rl-zoo3's ``ExperimentManager.objective`` so that, for our algorithms, no bad trial aborts a study.

    rl-zoo3 prunes a trial only for an ``AssertionError`` / ``ValueError`` raised inside ``model.learn()``; one raised
    by the sampler or by the constructor (an invalid sampled combination) would propagate and stop the study.
    The wrapper prunes a trial on those errors wherever they arise, on numerical failures
    (``FloatingPointError``, ``torch.linalg.LinAlgError``) and on a NaN/inf result; any other exception is a bug and
    still propagates. It also records which host/process ran each trial (user attribute ``worker``), which tells
    the workers of a distributed study apart. Other algorithms keep rl-zoo3's behaviour.

    :param objective: rl-zoo3's objective method
    :return: the wrapped method
    """
    import optuna

    @functools.wraps(objective)
    def wrapped(self: Any, trial: Any) -> float:
        if getattr(self, "algo", None) not in ALGO_NAMES:
            return objective(self, trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            value = objective(self, trial)
        except optuna.TrialPruned:
            raise
        except _numerical_errors() as error:
            trial.set_user_attr("pruned_reason", f"{type(error).__name__}: {error}"[:500])
            raise optuna.TrialPruned(f"{type(error).__name__}: {error}") from error
        if value is None or not math.isfinite(value):
            trial.set_user_attr("pruned_reason", f"non-finite mean reward {value}")
            raise optuna.TrialPruned(f"non-finite mean reward {value}")
        return value

    wrapped.__sb3_trpo_kfac_robust__ = True  # type: ignore[attr-defined]
    return wrapped


def register() -> None:
    """
    Make rl-zoo3 use ``sb3_trpo_kfac.TRPO`` for "trpo" and ``sb3_trpo_kfac.ACKTR`` for "acktr".

    Fills ``rl_zoo3.utils.ALGOS``, ``rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER`` and ``HYPERPARAMS_CONVERTER`` in
    place (every rl-zoo3 module sees the change) and makes hyperparameter optimization prune, rather than abort on,
    bad trials of our algorithms (see :func:`robust_objective`). Idempotent.

    rl-zoo3 still looks for ``rl_zoo3/hyperparams/{algo}.yml`` by default: pass ``--conf-file`` (see
    :func:`hyperparams_path`), or use ``python -m sb3_trpo_kfac``, which does.
    """
    # Imported here: registration is the only place that needs rl-zoo3 and both algorithms loaded.
    from rl_zoo3 import hyperparams_opt, utils
    from rl_zoo3.exp_manager import ExperimentManager

    from sb3_trpo_kfac.acktr import ACKTR
    from sb3_trpo_kfac.trpo import TRPO

    utils.ALGOS["trpo"] = TRPO
    utils.ALGOS["acktr"] = ACKTR
    hyperparams_opt.HYPERPARAMS_SAMPLER.update(HYPERPARAMS_SAMPLER)
    hyperparams_opt.HYPERPARAMS_CONVERTER.update(HYPERPARAMS_CONVERTER)
    if not getattr(ExperimentManager.objective, "__sb3_trpo_kfac_robust__", False):
        ExperimentManager.objective = robust_objective(ExperimentManager.objective)  # type: ignore[method-assign]
