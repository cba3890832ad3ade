"""Exact damping through eigendecompositions: ``V = Q_G [(Q_Gᵀ M Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``."""

import dataclasses
from typing import Any, ClassVar

import torch as th

from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature, Eigen, FieldKind


@dataclasses.dataclass(frozen=True)
class EigenCurvature(BlockCurvature):
    """
    ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``: then ``A ⊗ G + λI`` has eigenvectors ``Q_G ⊗ Q_A`` and eigenvalues
    ``λ_G λ_Aᵀ + λ``, and its inverse is exact. Both factors are eigendecomposed in the batched ``eigh``.
    """

    a: Eigen | None = None
    g: Eigen | None = None

    batched = ("a", "g")
    stackable = True
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {
        "a": (Eigen, ("dA", "QA")),
        "g": (Eigen, ("dG", "QG")),
    }

    @property
    def ready(self) -> bool:
        return self.a is not None and self.g is not None

    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        return self.solve_stacked(self.stack([self], damping), mat.unsqueeze(0))[0]

    @classmethod
    def stack(cls, curvatures: list[Any], damping: float) -> tuple[th.Tensor, ...]:
        q_g, q_a = _stacked([c.g.vectors for c in curvatures]), _stacked([c.a.vectors for c in curvatures])
        d_g, d_a = _stacked([c.g.values for c in curvatures]), _stacked([c.a.values for c in curvatures])
        scale = (d_g.unsqueeze(2) * d_a.unsqueeze(1) + damping).reciprocal_()
        # both layouts, made once per curvature update: bmm reads a transposed view more slowly
        return q_g.contiguous(), q_g.mT.contiguous(), q_a.contiguous(), q_a.mT.contiguous(), scale

    @staticmethod
    def solve_stacked(factors: tuple[th.Tensor, ...], mats: th.Tensor, out: th.Tensor | None = None) -> th.Tensor:
        q_g, q_g_t, q_a, q_a_t, scale = factors
        # th.bmm rather than @: the generic matmul's broadcasting checks cost more than these small products
        return th.bmm(th.bmm(q_g, th.bmm(th.bmm(q_g_t, mats), q_a) * scale), q_a_t, out=out)


def _stacked(tensors: list[th.Tensor]) -> th.Tensor:
    """The tensors along a new first dimension: a view for one (a block alone in its batch), a copy otherwise."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else th.stack(tensors)
