"""Global gradient-norm clipping with less per-call overhead than ``th.nn.utils.clip_grad_norm_``."""

from collections.abc import Iterable

import numpy as np
import torch as th
from torch import nn


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """
    Scale the gradients in place so that their global 2-norm is at most ``max_norm``: the same result, bit for
    bit, as ``th.nn.utils.clip_grad_norm_``. Torch's version groups the tensors by device and dtype and computes
    the scale in tensor arithmetic, a fixed cost per call that is a sizeable part of ACKTR's K-FAC step on a small
    network; this computes the scale as a numpy scalar instead (measurements in docs/performance.md).

    :param parameters: parameters whose ``.grad`` to clip (those without one are left out)
    :param max_norm: the largest global norm kept
    :return: the global norm before clipping
    """
    with_grad = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if not grads:
        return 0.0
    kinds = {(g.device, g.dtype) for g in grads}
    if len(kinds) > 1 or next(iter(kinds))[1] not in (th.float32, th.float64):  # torch's general path
        return float(th.nn.utils.clip_grad_norm_(with_grad, max_norm))
    real = np.float32 if grads[0].dtype == th.float32 else np.float64
    total = real(th.linalg.vector_norm(th.stack(th._foreach_norm(grads))).item())
    # torch's clip_grad_norm_ computes min(max_norm / (total + 1e-6), 1) in the gradients' dtype, the division
    # as a reciprocal times max_norm (Tensor.__rtruediv__); so does this, rounding alike
    coef = real(1) / (total + real(1e-6)) * real(max_norm)
    if not coef >= 1:  # multiplying by 1 changes nothing (a NaN norm spreads, as in torch)
        th._foreach_mul_(grads, float(coef))
    return float(total)
