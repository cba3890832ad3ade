"""
Loading saved models: before SB3's ``load`` rebuilds a model, tell which algorithm saved the file, and refuse a file
of another algorithm, or an unreadable one, with one message saying what the file holds and what was expected.

SB3's ``save()`` writes no algorithm name, only the model's attributes, so the algorithm is recognized by the
attributes that only it saves (its constructor keywords). Every file this package has written carries them.
"""

import contextlib
import inspect
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.save_util import load_from_zip_file

from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError

OURS = "sb3_trpo_kfac"
SB3 = "stable-baselines3"
CONTRIB = "sb3-contrib"
_MODULES = {OURS: "sb3_trpo_kfac", SB3: "stable_baselines3", CONTRIB: "sb3_contrib"}
_LIBRARIES = {module: library for library, module in _MODULES.items()}

# Attributes only one algorithm saves, checked in this order (ours first: they also have every A2C attribute).
_SIGNATURES = (
    ({"kfac_clip", "vf_fisher_coef"}, "ACKTR", OURS),
    ({"cg_damping", "fisher_subsample"}, "TRPO", OURS),
    ({"cg_damping", "line_search_shrinking_factor"}, "TRPO", CONTRIB),
)
# An algorithm's policies live in its folder (stable_baselines3.sac.policies): the class names that are not the folder
# name in capitals.
_ALGORITHM_FOLDERS = {"crossq": "CrossQ", "qrdqn": "QRDQN"}


@dataclass(frozen=True)
class SavedModel:
    """
    What a model file holds.

    :param algorithm: the class name of the algorithm that saved it (``"TRPO"``, ``"A2C"``, ...), or a description
        when ``library`` is None
    :param library: ``"sb3_trpo_kfac"``, ``"stable-baselines3"`` or ``"sb3-contrib"``; None if not recognized
    """

    algorithm: str
    library: str | None

    def __str__(self) -> str:
        if self.library is None:
            return f"a model of an algorithm not recognized here ({self.algorithm})"
        article = "an" if self.algorithm[0] in "AEIOU" else "a"
        return f"{article} {self.algorithm} model (saved by {self.library})"

    @property
    def loader(self) -> str | None:
        """The ``load`` that reads this file, e.g. ``"stable_baselines3.A2C.load"``."""
        return None if self.library is None else f"{_MODULES[self.library]}.{self.algorithm}.load"


def identify_saved_model(data: dict[str, Any]) -> SavedModel:
    """
    :param data: the attributes of a model file (``load_from_zip_file``'s first result)
    :return: the algorithm that saved them
    """
    keys = set(data)
    for signature, algorithm, library in _SIGNATURES:
        if signature <= keys:
            return SavedModel(algorithm, library)
    policy_class = data.get("policy_class")
    module = getattr(policy_class, "__module__", "")
    package, _, rest = module.partition(".")
    if {"clip_range", "n_epochs"} <= keys:
        if package == "sb3_contrib" and "recurrent" in rest:
            return SavedModel("RecurrentPPO", CONTRIB)
        if package == "sb3_contrib" and "maskable" in rest:
            return SavedModel("MaskablePPO", CONTRIB)
        return SavedModel("PPO", SB3)
    folder = rest.split(".")[0]
    if package in _LIBRARIES and folder not in ("", "common"):
        algorithm = _ALGORITHM_FOLDERS.get(folder, folder.upper())
        if algorithm == "TD3" and data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0:
            algorithm = "DDPG"  # SB3's DDPG is its TD3 without the policy delay and with the target noise clipped to 0
        return SavedModel(algorithm, _LIBRARIES[package])
    if {"n_steps", "gae_lambda", "ent_coef", "vf_coef"} <= keys and module == "stable_baselines3.common.policies":
        return SavedModel("A2C", SB3)  # the on-policy algorithm without attributes of its own
    if policy_class is None:
        return SavedModel("no policy class in the file", None)
    return SavedModel(f"policy class {module}.{getattr(policy_class, '__qualname__', policy_class)}", None)


def _shown_path(path: object) -> str:
    shown = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", None)
    return "`path`" if shown is None else f"`path` ({shown!s})"


def read_model_data(path: object, custom_objects: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    Read a model file's attributes with SB3's ``load_from_zip_file``, leaving a file object where it was.

    :param path: the ``path`` argument of ``load``: a path (str or path-like) or a readable binary file object
    :param custom_objects: as in ``load``
    :return: the saved attributes
    :raises ArgumentError: if the file is not a readable model zip (truncated, corrupt, or not written by ``save()``)
    """
    if not isinstance(path, (str, os.PathLike, io.BufferedIOBase)):
        raise ArgumentTypeError(f"`path` must be a path or a binary file object, got {type(path).__name__}")
    position = path.tell() if isinstance(path, io.BufferedIOBase) and path.seekable() else None
    try:
        with warnings.catch_warnings():  # SB3's own load reads the file next and warns about it then
            warnings.simplefilter("ignore")
            source = os.fspath(path) if isinstance(path, os.PathLike) else path
            data, params, _ = load_from_zip_file(source, custom_objects=custom_objects, device="cpu")
    except (FileNotFoundError, IsADirectoryError, PermissionError, ImportError):
        raise  # no file, or one that needs a module missing here (e.g. saved with numpy 2, read with numpy 1)
    except Exception as error:
        message = f"{_shown_path(path)}: not a readable model zip ({type(error).__name__}: {error})"
        raise ArgumentError(message) from error
    finally:
        if position is not None:
            path.seek(position)  # type: ignore[union-attr]
    if data is None:
        raise ArgumentError(
            f"{_shown_path(path)}: not a readable model zip (it has no 'data' entry: a truncated file, or not written "
            "by a model's save())"
        )
    if "policy" not in params:
        raise ArgumentError(f"{_shown_path(path)}: not a readable model zip (it has no 'policy' parameters)")
    return data


def check_model_file(
    algorithm: type[OnPolicyAlgorithm],
    accepted: tuple[SavedModel, ...],
    path: object,
    custom_objects: dict[str, Any] | None,
    load_kwargs: dict[str, Any],
) -> tuple[SavedModel, dict[str, Any]]:
    """
    The checks of ``algorithm.load(path, ..., **load_kwargs)`` before SB3 rebuilds the model.

    :param algorithm: the class whose ``load`` was called
    :param accepted: the kinds of file it loads
    :param path: the file
    :param custom_objects: as in ``load``
    :param load_kwargs: the attributes ``load`` is asked to set: those that are constructor keywords are checked as
        the constructor checks them (the file's own values are not: whatever an earlier version saved still loads)
    :return: what the file holds (one of ``accepted``) and its attributes
    :raises ArgumentError: if the file is unreadable or holds another algorithm's model
    """
    data = read_model_data(path, custom_objects)
    saved = identify_saved_model(data)
    if saved not in accepted:
        hint = f"; load it with {saved.loader}" if saved.loader is not None else ""
        raise ArgumentError(f"{_shown_path(path)}: this file holds {saved}, expected {accepted[0].algorithm}{hint}")
    keywords = set(inspect.signature(algorithm.__init__).parameters) - {"self", "env", "device", "_init_setup_model"}
    # dicts copied: SB3's load compares the given policy_kwargs with the saved ones afterwards
    to_check: dict[str, Any] = {
        key: dict(value) if isinstance(value, dict) else value for key, value in load_kwargs.items() if key in keywords
    }
    if to_check:
        # the constructor's own checks, on an instance without environment or network
        arguments: dict[str, Any] = {"policy": "MlpPolicy", **to_check, "env": None, "device": "cpu"}
        with contextlib.redirect_stdout(io.StringIO()):
            algorithm(**arguments, _init_setup_model=False)
    return saved, data


def kl_dimensions(action_space: spaces.Space) -> int:
    """
    :param action_space: a model's action space
    :return: the number of action dimensions sb3-contrib's TRPO averages its KL over (Gaussian and Bernoulli
        actions; one for categorical ones, whose KL it sums)
    """
    if isinstance(action_space, (spaces.Box, spaces.MultiBinary)):
        return int(np.prod(action_space.shape))
    return 1
