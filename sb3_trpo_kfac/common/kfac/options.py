"""
The K-FAC knobs and their checks, defined once: :class:`KFACPreconditioner` (and so :class:`KFAC`) runs them, and
ACKTR runs the same ones up front so that a bad value fails before its environment is built. Each knob has the same
name wherever it is accepted; an error names it.
"""

from collections.abc import Callable
from typing import Any

from sb3_trpo_kfac.common.kfac.curvature import INVERSE_MODES
from sb3_trpo_kfac.common.validation import check_bool, check_choice, check_float, check_int

# per knob: its check, returning the value as a Python number / bool / str
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "kfac_clip": lambda name, value: check_float(name, value, 0.0, low_inclusive=False),
    "kfac_damping": lambda name, value: check_float(name, value, 0.0, low_inclusive=False),
    # statistics with kfac_stats_decay 1 would never change
    "kfac_stats_decay": lambda name, value: check_float(name, value, 0.0, 1.0, high_inclusive=False),
    "kfac_stats_interval": lambda name, value: check_int(name, value, 1),
    "kfac_update": lambda name, value: check_int(name, value, 1),
    "kfac_cold_iter": lambda name, value: check_int(name, value, 0),
    # inf: no clipping
    "kfac_cold_max_grad_norm": lambda name, value: check_float(name, value, 0.0, low_inclusive=False, allow_inf=True),
    "kfac_inverse": lambda name, value: check_choice(name, value, INVERSE_MODES),
    "kfac_low_rank": lambda name, value: None if value is None else check_int(name, value, 1),
    "kfac_low_rank_min_dim": lambda name, value: check_int(name, value, 1),
    "kfac_async": check_bool,
    "kfac_refine": lambda name, value: check_int(name, value, 0),
    "kfac_split_decompositions": check_bool,
}


def check_kfac_arguments(**knobs: Any) -> dict[str, Any]:
    """
    :param knobs: K-FAC knobs by name (any subset)
    :return: the checked values, by name
    """
    return {name: _CHECKS[name](name, value) for name, value in knobs.items()}


def check_momentum(momentum: object) -> float:
    """The default step rule's momentum: the step is ``lr (1 − momentum)`` times the momentum buffer, so < 1."""
    return check_float("momentum", momentum, 0.0, 1.0, high_inclusive=False)
