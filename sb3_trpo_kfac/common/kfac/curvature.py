"""
K-FAC curvature: a block's damped inverse ``(A ⊗ G + λI)⁻¹`` from decompositions of its factors, in one of four
representations behind the :class:`BlockCurvature` interface.

- :class:`EigenCurvature`: ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ``; exact damping,
  ``V = Q_G [(Q_Gᵀ M Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``.
- :class:`InverseCurvature`: factored damping (Martens & Grosse 2015), ``V = (G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹`` with π
  the square root of the ratio of the mean eigenvalues (trace / dimension) of ``A`` and ``G``.
- :class:`LowRankEigenCurvature`, :class:`LowRankInverseCurvature`: the same with a large ``A`` kept as its top
  eigenpairs and the mean of the remaining eigenvalues on their complement (exact when ``A`` has that rank).

Fields are None until their factor's first successful decomposition; a failed one keeps the previous result. The
batched eigendecompositions of same-size factors, and running all this in a background thread, are
:mod:`.decomposition`'s; applying the solves to flat gradient buffers is :mod:`.solve`'s.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch as th

from sb3_trpo_kfac.common.kfac.products import WIDE_OUTPUT
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors

INVERSE_MODES = ("eigen", "inverse")
# Eigenvalues below this are treated as exact zeros (numerical noise of eigh on a PSD matrix).
EIGENVALUE_FLOOR = 1e-6

SelfCurvature = TypeVar("SelfCurvature", bound="BlockCurvature")
# a field's type in BlockCurvature.KEYS: None for a tensor, tuple for a tuple of tensors, or a dataclass of tensors
FieldKind = type | None


@dataclasses.dataclass(frozen=True)
class Eigen:
    """Eigendecomposition of a factor, eigenvalues below :data:`EIGENVALUE_FLOOR` set to 0."""

    values: th.Tensor
    vectors: th.Tensor


@dataclasses.dataclass(frozen=True)
class LowRankEigen:
    """Top eigenpairs of a factor (``vectors``: dim x rank) and the mean of its remaining eigenvalues."""

    values: th.Tensor
    vectors: th.Tensor
    rest: th.Tensor


def eigen(mat: th.Tensor) -> Eigen | None:
    """
    Eigendecomposition with a float64 retry; None if both fail or are not finite.

    The factor is decomposed shifted by ``EIGENVALUE_FLOOR * I`` and the shift subtracted from the eigenvalues (same
    eigenvectors). A factor with exactly zero rows and columns -- inputs that were never active, such as the one-hot
    observations of states not visited yet, or dead units -- makes MKL's divide-and-conquer ``eigh`` fail to converge
    in float32 and float64 alike, however benign the rest of the matrix; the shift removes the exact zeros and is below
    the level at which eigenvalues are told from zero.
    """
    for dtype in (mat.dtype, th.float64):
        shifted = mat.to(dtype, copy=True)
        shifted.diagonal().add_(EIGENVALUE_FLOOR)
        try:
            evals, evecs = th.linalg.eigh(shifted)
        except RuntimeError:
            continue
        if th.isfinite(evals).all() and th.isfinite(evecs).all():
            evals = evals - EIGENVALUE_FLOOR
            evals = th.where(evals < EIGENVALUE_FLOOR, th.zeros_like(evals), evals)
            return Eigen(evals.to(mat.dtype), evecs.to(mat.dtype))
    return None


def describe_factor(mat: th.Tensor) -> str:
    """
    Size and condition of a square factor, for a failure message.

    :param mat: the factor
    :return: e.g. ``"501x501, condition number 3.2e+07"`` or ``"64x64, 3 non-finite entries"``
    """
    size = f"{mat.shape[0]}x{mat.shape[1]}"
    n_bad = int((~th.isfinite(mat)).sum())
    if n_bad:
        return f"{size}, {n_bad} non-finite entries"
    try:
        singular = th.linalg.svdvals(mat.detach().to(th.float64))
    except RuntimeError:
        return f"{size}, largest entry {float(mat.abs().max()):.3g}"
    largest, smallest = float(singular[0]), float(singular[-1])
    condition = largest / smallest if smallest > 0 else math.inf
    return f"{size}, condition number {condition:.3g}, largest singular value {largest:.3g}"


def top_eigen(mat: th.Tensor, rank: int, previous: LowRankEigen | None) -> LowRankEigen | None:
    """
    Top ``rank`` eigenpairs of a PSD factor by subspace iteration (several sweeps from a fixed random start, one
    sweep warm-started from the previous basis afterwards) and the mean remaining eigenvalue; None if it failed.
    """
    dim = mat.shape[0]
    if previous is None:
        start = th.randn(dim, rank, generator=th.Generator().manual_seed(0), dtype=th.float64)
        basis, sweeps = start.to(mat.device, mat.dtype), 4
    else:
        basis, sweeps = previous.vectors, 1
    try:
        for _ in range(sweeps):
            basis = th.linalg.qr(mat @ basis).Q
        # a large factor: the tall product first (the wide product with a short inner side is the slow shape)
        projected = basis.T @ (mat @ basis) if mat.numel() >= WIDE_OUTPUT else basis.T @ mat @ basis
        result = eigen((projected + projected.T) / 2)
    except RuntimeError:
        return None
    if result is None:
        return None
    rest = ((mat.trace() - result.values.sum()) / (dim - rank)).clamp(min=0.0)
    return LowRankEigen(result.values, basis @ result.vectors, rest)


def damped_inverse(mat: th.Tensor, shift: float) -> th.Tensor | None:
    """Inverse of ``mat + shift I`` (Cholesky) with a float64 retry; None if both fail or are not finite."""
    for dtype in (mat.dtype, th.float64):
        shifted = mat.to(dtype) + shift * th.eye(mat.shape[0], dtype=dtype, device=mat.device)
        chol, info = th.linalg.cholesky_ex(shifted)
        if info.item() == 0:
            inv = th.cholesky_inverse(chol)
            if th.isfinite(inv).all():
                return inv.to(mat.dtype)
    return None


def factored_damping(factors: KroneckerFactors, damping: float) -> tuple[float, float]:
    """The factored damping's ``(π√λ, √λ/π)``, the shifts of ``A`` and ``G``."""
    mean_a, mean_g = factors.a.trace() / factors.a.shape[0], factors.g.trace() / factors.g.shape[0]
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


class BlockCurvature(ABC):
    """
    ``(A ⊗ G + λI)⁻¹`` of one block, from the last decompositions of its factors.

    A curvature update runs :meth:`compute` (this block's own decompositions, possibly in the background worker)
    while the factors named in :attr:`batched` are eigendecomposed together with the other blocks' same-size factors;
    the results are swapped in with :meth:`updated`. In the optimizer's saved state, each field is stored under the
    keys of :attr:`KEYS`.
    """

    # factors ("a", "g") eigendecomposed in the batched eigh of a curvature update, into the fields of those names
    batched: ClassVar[tuple[str, ...]] = ()
    # factors that compute() reads (a background update gets a copy of them)
    reads: ClassVar[tuple[str, ...]] = ()
    # whether same-shape blocks are solved together (stack / solve_stacked)
    stackable: ClassVar[bool] = False
    # per field: its type (None: a tensor) and its keys in the saved format
    KEYS: ClassVar[dict[str, tuple[FieldKind, tuple[str, ...]]]] = {}

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether every decomposition the solve needs exists."""

    def compute(
        self, name: str, factors: KroneckerFactors, damping: float, rank: int | None, failures: list[str]
    ) -> dict[str, Any]:
        """
        This block's own decompositions. Pure: it may run in the worker thread.

        :param name: the block's name (for messages)
        :param factors: the block's factors (a copy in a background update)
        :param damping: λ
        :param rank: number of eigenpairs a low-rank factor keeps
        :param failures: a failed decomposition appends a message here (its field is then left unchanged)
        :return: the new field values
        """
        return {}

    def updated(self: SelfCurvature, **fields: Any) -> SelfCurvature:
        return dataclasses.replace(self, **fields)  # type: ignore[type-var]

    @abstractmethod
    def solve(self, mat: th.Tensor, damping: float) -> th.Tensor:
        """``(A ⊗ G + λI)⁻¹ vec(mat)`` for one ``out x (in + 1)`` matrix (only if :attr:`ready`)."""

    def solve_into(self, mat: th.Tensor, damping: float, out: th.Tensor) -> None:
        """:meth:`solve` written into ``out`` (a representation that can avoid the temporary overrides this)."""
        out.copy_(self.solve(mat, damping))

    def rows_pay_off(self, rows: int) -> bool:
        """Whether :meth:`solve_rows_into` of a gradient of this many rows is cheaper than :meth:`solve_into`."""
        return False

    def solve_rows_into(self, deltas: th.Tensor, inputs: th.Tensor, scale: float, damping: float, out: th.Tensor) -> None:
        """:meth:`solve_into` of ``scale · deltasᵀ inputs`` (:mod:`.gradient_rows`), where :meth:`rows_pay_off`."""
        raise NotImplementedError(f"{type(self).__name__} has no solve of gradient rows")

    @classmethod
    def stack(cls, curvatures: list[Any], damping: float) -> tuple[th.Tensor, ...]:
        """The solve factors of same-shape blocks, stacked for :meth:`solve_stacked` (:attr:`stackable` only)."""
        raise NotImplementedError(f"{cls.__name__} has no batched solve")

    @staticmethod
    def solve_stacked(factors: tuple[th.Tensor, ...], mats: th.Tensor, out: th.Tensor | None = None) -> th.Tensor:
        """The solve of stacked same-shape block matrices (``factors`` from :meth:`stack`)."""
        raise NotImplementedError

    def entries(self) -> dict[str, th.Tensor]:
        """The existing fields under their saved-format keys."""
        out: dict[str, th.Tensor] = {}
        for name, (kind, keys) in self.KEYS.items():
            value = getattr(self, name)
            if value is not None:
                out.update(zip(keys, _parts(kind, value)))
        return out

    @classmethod
    def from_entries(cls: type[SelfCurvature], entries: dict[str, th.Tensor]) -> SelfCurvature:
        """:param entries: as returned by :meth:`entries` (fields whose keys are missing stay None)"""
        fields: dict[str, Any] = {}
        for name, (kind, keys) in cls.KEYS.items():
            if all(key in entries for key in keys):
                values = [entries[key] for key in keys]
                fields[name] = values[0] if kind is None else tuple(values) if kind is tuple else kind(*values)
        return cls(**fields)

    def to(self: SelfCurvature, dtype: th.dtype, device: th.device) -> SelfCurvature:
        """The same decompositions in ``dtype`` on ``device``."""
        return self.from_entries({key: value.to(device=device, dtype=dtype) for key, value in self.entries().items()})


def _parts(kind: FieldKind, value: Any) -> list[th.Tensor]:
    """The tensors of a field's value, in the order of its saved-format keys."""
    if kind is None:
        return [value]
    if kind is tuple:
        return list(value)
    return [getattr(value, field.name) for field in dataclasses.fields(value)]
