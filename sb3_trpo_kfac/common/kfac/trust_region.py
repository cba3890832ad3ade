"""
ACKTR's trust region (Wu et al. 2017): each parameter group's preconditioned gradient ``V`` is scaled by
``ν = min(1, sqrt(kfac_clip / (lr² Vᵀ F V)))``, with ``Vᵀ F V = Vᵀ ∇`` for the K-FAC solve (``V = F⁻¹ ∇`` in blocks,
``F = I`` for the raw gradients outside blocks). A cold-start step instead moves along the clipped gradient, ν = 1.
"""

import dataclasses
import math
from typing import Any

import torch as th

from sb3_trpo_kfac.common.kfac.layout import GroupBuffers


@dataclasses.dataclass
class Preconditioned:
    """One step's preconditioned gradients: per parameter group, ``V`` in its direction buffer and its scale ν."""

    groups: list[GroupBuffers]
    present: list[list[int]]  # per group: the positions of the parameters that have a gradient
    nus: list[float]

    def write_gradients(self) -> None:
        """``p.grad ← ν V`` for every parameter that has a gradient (the others keep None)."""
        for group, indices, nu in zip(self.groups, self.present, self.nus):
            grads, directions = [], []
            for i in indices:
                grad = group.params[i].grad
                if grad is not None:
                    grads.append(grad)
                    directions.append(group.direction_views[i])
            if grads:
                # torch's private _foreach kernels: one call for all parameters, whatever the layer count
                th._foreach_copy_(grads, directions)
                th._foreach_mul_(grads, nu)


def cold_directions(groups: list[GroupBuffers], max_grad_norm: float) -> None:
    """Directions of a cold-start step: the gradients, clipped together to a global norm of ``max_grad_norm``."""
    norm = th.linalg.vector_norm(th.stack([group.gradient.norm() for group in groups]))
    clip = min(1.0, max_grad_norm / (float(norm) + 1e-6))
    for group in groups:
        th.mul(group.gradient, clip, out=group.direction)


def trust_region(
    groups: list[GroupBuffers], param_groups: list[dict[str, Any]], cold: bool
) -> tuple[list[float], list[float]]:
    """
    :param groups: the parameter groups' buffers, directions filled
    :param param_groups: their ``lr`` and ``kfac_clip``
    :param cold: a cold-start step (no trust region: ν = 1, and ``F = I`` for all of it)
    :return: per group, ``lr² Vᵀ F V`` (the quadratic model of the KL of the step ``lr V``) and ν
    """
    terms = th.stack([th.dot(g.direction, g.direction if cold else g.gradient) for g in groups]).tolist()
    vfvs, nus = [], []
    for param_group, term in zip(param_groups, terms):
        vfv = param_group["lr"] ** 2 * term
        vfvs.append(vfv)
        nus.append(1.0 if cold or not vfv > 0 else min(1.0, math.sqrt(param_group["kfac_clip"] / vfv)))
    return vfvs, nus
