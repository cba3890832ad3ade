"""
Low-rank input factors: a large ``A`` (e.g. NatureCNN's 3137 x 3137) kept as its top eigenpairs ``(Λ_r, Q_r)`` and the
mean ``σ`` of its remaining eigenvalues on their complement, so a solve costs ``O(out · in · rank)`` instead of
``O(out · in²)``. Exact when ``A`` has rank <= ``rank``. :class:`TwoSidedLowRankEigenCurvature` keeps ``G`` that way
too, for layers whose output side is large as well (NatureCNN's 512): a solve then costs ``O(out · in · ranks)``.
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
from sb3_trpo_kfac.common.kfac.products import wide_mm
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors

# kfac_low_rank="auto": blocks with more than AUTO_MIN_SIZE parameters (NatureCNN's 3136 -> 512 layer, not its convs
# nor usual MLP layers) keep AUTO_RANK eigenpairs of each factor larger than that, the rest stays exact
AUTO_RANK = 64
AUTO_MIN_SIZE = 2**20


def _top_eigen(
    name: str,
    factors: KroneckerFactors,
    rank: int | None,
    previous: LowRankEigen | None,
    failures: list[str],
    side: str = "a",
) -> LowRankEigen | None:
    """The new top eigenpairs of a factor, or the previous ones (with a message) if the subspace iteration failed."""
    assert rank is not None
    result = top_eigen(getattr(factors, side), rank, previous)
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


@dataclasses.dataclass(frozen=True)
class TwoSidedLowRankEigenCurvature(BlockCurvature):
    """
    Exact damping with both factors low-rank: ``A ⊗ G + λI`` has eigenvalues ``λ_G λ_Aᵀ + λ`` on pairs of kept
    eigenvectors, ``λ_G σ_A + λ`` and ``σ_G λ_A + λ`` on a kept one beside the other factor's complement, and
    ``σ_G σ_A + λ`` on the two complements. With ``L = Q_Gᵀ M``, ``R = M Q_A``, ``P = L Q_A``, the four parts of ``M``
    each scaled by its eigenvalue sum to ``c M + Q_G (d_G ∘ L + X Q_Aᵀ) + (R ∘ d_A) Q_Aᵀ`` (``c = 1 / (σ_G σ_A + λ)``,
    ``d`` and ``X`` below): four products of ``M``'s size times a rank.
    """

    a: LowRankEigen | None = None
    g: LowRankEigen | None = None

    reads = ("a", "g")
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {
        "a": (LowRankEigen, ("dA", "QA", "sA")),
        "g": (LowRankEigen, ("dG", "QG", "sG")),
    }

    @property
    def ready(self) -> bool:
        return self.a is not None and self.g is not None

    def compute(
        self, name: str, factors: KroneckerFactors, damping: float, rank: int | None, failures: list[str]
    ) -> dict[str, Any]:
        out = {}
        for side in ("a", "g"):
            found = _top_eigen(name, factors, rank, getattr(self, side), failures, side)
            if found is not None:
                out[side] = found
        return out

    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        out = th.empty_like(mat)
        self.solve_into(mat, damping, out)
        return out

    def solve_into(self, mat: th.Tensor, damping: float, out: th.Tensor) -> None:
        # into the caller's buffer: a fresh matrix of this size costs page faults comparable to a product
        assert self.a is not None and self.g is not None
        a, g = self.a, self.g
        rest = 1.0 / (float(g.rest) * float(a.rest) + damping)
        d_g = 1.0 / (g.values * a.rest + damping) - rest  # kept G side, A's complement, minus the complements'
        d_a = 1.0 / (g.rest * a.values + damping) - rest
        left, right = g.vectors.T @ mat, mat @ a.vectors
        core = (1.0 / (th.outer(g.values, a.values) + damping) - d_g[:, None] - d_a[None, :] - rest) * (left @ a.vectors)
        inner = th.addmm(left * d_g[:, None], core, a.vectors.T)
        # Q_G inner + (R ∘ d_A) Q_Aᵀ as one product: one pass over the output
        wide_mm(th.cat([g.vectors, right * d_a], 1), th.cat([inner, a.vectors.T], 0), out, mat, rest)

    def rows_pay_off(self, rows: int) -> bool:
        # the solve above: products with rank_G + rank_A columns twice; this one: rows + rank_A columns once
        assert self.a is not None and self.g is not None
        return rows + len(self.a.values) < 2 * (len(self.g.values) + len(self.a.values))

    def solve_rows_into(self, deltas: th.Tensor, inputs: th.Tensor, scale: float, damping: float, out: th.Tensor) -> None:
        # M = c δᵀ ā (n rows): with L = Q_Gᵀ M = c (δ Q_G)ᵀ ā and R = M Q_A = c δᵀ (ā Q_A), the solve above is
        # (c (σ δᵀ + Q_G (d_G ∘ Q_Gᵀ δᵀ))) ā + (Q_G core + R ∘ d_A) Q_Aᵀ: one product with n + rank columns
        assert self.a is not None and self.g is not None
        a, g = self.a, self.g
        rest = 1.0 / (float(g.rest) * float(a.rest) + damping)
        d_g = 1.0 / (g.values * a.rest + damping) - rest
        d_a = 1.0 / (g.rest * a.values + damping) - rest
        deltas_g = scale * (deltas @ g.vectors)  # (c δ Q_G): n x rank
        inputs_a = inputs @ a.vectors  # ā Q_A: n x rank
        core = (1.0 / (th.outer(g.values, a.values) + damping) - d_g[:, None] - d_a[None, :] - rest) * (
            deltas_g.T @ inputs_a
        )
        on_inputs = th.addmm(scale * rest * deltas.T, g.vectors, d_g[:, None] * deltas_g.T)
        on_basis = th.addmm((deltas.T @ inputs_a) * (scale * d_a), g.vectors, core)
        wide_mm(th.cat([on_inputs, on_basis], 1), th.cat([inputs, a.vectors.T], 0), out)
# the representations whose input factor is low-rank
LOW_RANK_TYPES = (LowRankEigenCurvature, LowRankInverseCurvature, TwoSidedLowRankEigenCurvature)
# those with a solve from the gradient's rows (BlockCurvature.solve_rows_into)
ROW_SOLVING_TYPES = (TwoSidedLowRankEigenCurvature,)
