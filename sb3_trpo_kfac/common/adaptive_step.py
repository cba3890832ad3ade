"""
A step size adapted to the measured KL of each update (OpenAI baselines' continuous-control ACKTR): after the step, the
mean KL(π_old ‖ π_new) on the batch is compared with a target; outside [target / 2, 2 · target] a step factor f is
divided or multiplied by 1.5 for the next update.

f multiplies the whole K-FAC step of a parameter group: its learning rate η by f and its trust-region radius κ by f².
Then ν = min(1, sqrt(f² κ / (f² η² Vᵀ∇))) is unchanged and the step η (1 − m) buf, momentum included, is exactly f
times the one without the factor, whether the trust region binds or not. Scaling η alone (baselines, whose trust
region rarely binds) would do nothing while it binds (ν η = sqrt(κ / Vᵀ∇) does not depend on η), and κ alone
nothing while it does not; the factor would then drift to a bound without effect.
"""

import math
from typing import Any

# the change per update; the KL of a step scales about as f², so one change moves it 2.25x, less than the 4x width of
# the band [target / 2, 2 · target]: the rule settles inside instead of jumping over it
KL_STEP_CHANGE = 1.5
# f in [1/100, 10]: the step may shrink 100x (KL ~1e-4x) and grow 10x (KL ~100x) from the configured one, so a target
# two orders of magnitude from kfac_clip is reached, and a stretch of near-zero KL (e.g. constant advantages) cannot
# wind the step up further than 10x before the signal returns
KL_STEP_FACTOR_MIN = 0.01
KL_STEP_FACTOR_MAX = 10.0


def adapt_kl_step_factor(factor: float, kl: float, target_kl: float) -> float:
    """
    :param factor: the step factor the update used
    :param kl: its measured mean KL(π_old ‖ π_new)
    :param target_kl: the target
    :return: the factor of the next update: ``factor / 1.5`` if ``kl > 2 · target_kl``, ``factor · 1.5`` if
        ``kl < target_kl / 2``, else (and for a non-finite ``kl``) ``factor``; clamped to
        [``KL_STEP_FACTOR_MIN``, ``KL_STEP_FACTOR_MAX``]
    """
    if not math.isfinite(kl):
        return factor
    if kl > 2.0 * target_kl:
        factor /= KL_STEP_CHANGE
    elif kl < target_kl / 2.0:
        factor *= KL_STEP_CHANGE
    return min(max(factor, KL_STEP_FACTOR_MIN), KL_STEP_FACTOR_MAX)


def scale_kfac_step(param_group: dict[str, Any], lr: float, kfac_clip: float, factor: float) -> None:
    """
    Make a K-FAC parameter group's next step ``factor`` times the one at ``lr`` and ``kfac_clip``: η ← f η, κ ← f² κ.

    :param param_group: the group (its ``lr`` and ``kfac_clip`` are overwritten)
    :param lr: the learning rate without the factor (the schedule's current value)
    :param kfac_clip: the trust-region radius without the factor
    :param factor: f
    """
    param_group["lr"] = factor * lr
    param_group["kfac_clip"] = factor**2 * kfac_clip
