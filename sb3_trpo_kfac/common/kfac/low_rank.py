"""
Low-rank input factors: a large ``A`` (e.g. NatureCNN's 3137 x 3137) kept as its top eigenpairs ``(Λ_r, Q_r)`` and the
mean ``σ`` of its remaining eigenvalues on their complement, so a solve costs ``O(out · in · rank)`` instead of
``O(out · in²)``. Exact when ``A`` has rank <= ``rank``.
"""

import dataclasses
from typing import Any, ClassVar

import torch as th

from sb3_trpo_kfac.common.kfac.curvature import (
    BlockCurvature,
    Eigen,
    FieldKind,
    LowRankEigen,
    damped_inverse,
    factored_damping,
    top_eigen,
)
from sb3_trpo_kfac.common.kfac.inverse import inverse_failure
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors


def _top_eigen(
    name: str, factors: KroneckerFactors, rank: int | None, previous: LowRankEigen | None, failures: list[str]
) -> LowRankEigen | None:
    """The new top eigenpairs of ``A``, or the previous ones (with a message) if the subspace iteration failed."""
    assert rank is not None
    result = top_eigen(factors.a, rank, previous)
    if result is None:
        failures.append(f"KFAC: low-rank eigendecomposition of a factor of {name} failed; keeping the previous basis")
        return previous
    return result


@dataclasses.dataclass(frozen=True)
class LowRankEigenCurvature(BlockCurvature):
    """
    Exact damping with a low-rank ``A``: on the kept eigenvectors of ``A`` the eigenvalues of ``A ⊗ G + λI`` are
    ``λ_G λ_Aᵀ + λ``, on their complement ``λ_G σ + λ``. ``G`` is eigendecomposed in the batched ``eigh``.
    """

    a: LowRankEigen | None = None
    g: Eigen | None = None

    batched = ("g",)
    reads = ("a",)
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {
        "a": (LowRankEigen, ("dA", "QA", "sA")),
        "g": (Eigen, ("dG", "QG")),
    }

    @property
    def ready(self) -> bool:
        return self.a is not None and self.g is not None

    def compute(
        self, name: str, factors: KroneckerFactors, damping: float, rank: int | None, failures: list[str]
    ) -> dict[str, Any]:
        a = _top_eigen(name, factors, rank, self.a, failures)
        return {} if a is None else {"a": a}

    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        assert self.a is not None and self.g is not None
        q_a, q_g = self.a.vectors, self.g.vectors
        rotated = q_g.T @ mat
        kept = rotated @ q_a
        rest = (self.g.values * self.a.rest + damping)[:, None]
        kept = kept / (th.outer(self.g.values, self.a.values) + damping) - kept / rest
        return q_g @ (kept @ q_a.T + rotated / rest)


@dataclasses.dataclass(frozen=True)
class LowRankInverseCurvature(BlockCurvature):
    """
    Factored damping with a low-rank ``A``: ``(A + s I)⁻¹`` is ``1 / (λ_A + s)`` on the kept eigenvectors and
    ``1 / (σ + s)`` on their complement, ``s = π√λ`` (π from the traces of the full factors).
    """

    a: LowRankEigen | None = None
    g: th.Tensor | None = None  # (G + √λ/π I)⁻¹
    weights: tuple[th.Tensor, th.Tensor] | None = None  # 1 / (λ_A + s) and 1 / (σ + s)

    reads = ("a", "g")
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {
        "a": (LowRankEigen, ("dA", "QA", "sA")),
        "g": (None, ("G_inv",)),
        "weights": (tuple, ("wA", "wA_rest")),
    }

    @property
    def ready(self) -> bool:
        return self.a is not None and self.g is not None and self.weights is not None

    def compute(
        self, name: str, factors: KroneckerFactors, damping: float, rank: int | None, failures: list[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        a = _top_eigen(name, factors, rank, self.a, failures)
        if a is not None:
            out["a"] = a
        shift_a, shift_g = factored_damping(factors, damping)
        g_inv = damped_inverse(factors.g, shift_g)
        if g_inv is None:
            failures.append(inverse_failure(name))
        else:
            out["g"] = g_inv
        if a is not None:
            out["weights"] = (1.0 / (a.values + shift_a), 1.0 / (a.rest + shift_a))
        return out

    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        assert self.a is not None and self.g is not None and self.weights is not None
        q_a, (kept, rest) = self.a.vectors, self.weights
        left = self.g @ mat
        return ((left @ q_a) * (kept - rest)) @ q_a.T + left * rest


# the representations whose input factor is low-rank
LOW_RANK_TYPES = (LowRankEigenCurvature, LowRankInverseCurvature)
