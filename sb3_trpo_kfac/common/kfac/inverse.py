"""Factored damping (Martens & Grosse 2015): ``V = (G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹``, cheaper than eigh."""

import dataclasses
from typing import Any, ClassVar

import torch as th

from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature, FieldKind, damped_inverse, factored_damping
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors


def inverse_failure(name: str) -> str:
    return f"KFAC: inversion of a factor of {name} failed; keeping the previous inverse"


@dataclasses.dataclass(frozen=True)
class InverseCurvature(BlockCurvature):
    """
    The damping split between the factors, ``(A + π√λ I) ⊗ (G + √λ/π I)`` with π the square root of the ratio of the
    mean eigenvalues (trace / dimension) of ``A`` and ``G``; its inverse is the product of two Cholesky inverses.
    """

    a: th.Tensor | None = None  # (A + π√λ I)⁻¹
    g: th.Tensor | None = None  # (G + √λ/π I)⁻¹

    reads = ("a", "g")
    stackable = True
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {"a": (None, ("A_inv",)), "g": (None, ("G_inv",))}

    @property
    def ready(self) -> bool:
        return self.a is not None and self.g is not None

    def compute(
        self, name: str, factors: KroneckerFactors, damping: float, rank: int | None, failures: list[str]
    ) -> dict[str, Any]:
        shift_a, shift_g = factored_damping(factors, damping)
        out = {}
        for field, factor, shift in (("g", factors.g, shift_g), ("a", factors.a, shift_a)):
            inv = damped_inverse(factor, shift)
            if inv is None:
                failures.append(inverse_failure(name))
            else:
                out[field] = inv
        return out

    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        return self.solve_stacked(self.stack([self], damping), mat.unsqueeze(0))[0]

    @classmethod
    def stack(cls, curvatures: list[Any], damping: float) -> tuple[th.Tensor, ...]:
        return th.stack([c.g for c in curvatures]), th.stack([c.a for c in curvatures])

    @staticmethod
    def solve_stacked(factors: tuple[th.Tensor, ...], mats: th.Tensor, out: th.Tensor | None = None) -> th.Tensor:
        g_inv, a_inv = factors
        return th.bmm(th.bmm(g_inv, mats), a_inv, out=out)
