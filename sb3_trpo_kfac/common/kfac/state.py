"""
What the preconditioner keeps per block: the curvature representation it uses, and its factors and curvature converted
with the parameters and written in the saved format (torch's optimizer state, under :data:`STATE_KEYS`).
"""

from collections.abc import Iterator

import torch as th

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature
from sb3_trpo_kfac.common.kfac.eigen import EigenCurvature
from sb3_trpo_kfac.common.kfac.inverse import InverseCurvature
from sb3_trpo_kfac.common.kfac.low_rank import (
    AUTO_MIN_SIZE,
    AUTO_RANK,
    LowRankEigenCurvature,
    LowRankInverseCurvature,
    TwoSidedLowRankEigenCurvature,
)
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors

# the curvature representation of a block, by kfac_inverse and whether its input factor is low-rank
CURVATURE_TYPES: dict[tuple[str, bool], type[BlockCurvature]] = {
    ("eigen", False): EigenCurvature,
    ("eigen", True): LowRankEigenCurvature,
    ("inverse", False): InverseCurvature,
    ("inverse", True): LowRankInverseCurvature,
}
ALL_TYPES: tuple[type[BlockCurvature], ...] = (*CURVATURE_TYPES.values(), TwoSidedLowRankEigenCurvature)
# keys of a block's entries in the optimizer's saved state: its factors and its decompositions
STATE_KEYS = (
    "A",
    "G",
    *dict.fromkeys(k for kind in ALL_TYPES for _, keys in kind.KEYS.values() for k in keys),
)


def kept_eigenpairs(low_rank: int | str | None) -> int | None:
    """The rank of the low-rank factors for a ``kfac_low_rank`` setting (``"auto"``: :data:`AUTO_RANK`)."""
    return AUTO_RANK if low_rank == "auto" else low_rank  # type: ignore[return-value]


def curvature_types(
    blocks: list[KFACBlock], kfac_inverse: str, low_rank: int | str | None, low_rank_min_dim: int
) -> dict[KFACBlock, type[BlockCurvature]]:
    """
    :param blocks: the blocks
    :param kfac_inverse: ``"eigen"`` or ``"inverse"``
    :param low_rank: eigenpairs kept of a large input factor, None, or ``"auto"``: in blocks of more than
        :data:`AUTO_MIN_SIZE` parameters, :data:`AUTO_RANK` eigenpairs of each factor larger than that (both sides
        with ``"eigen"``, the input side with ``"inverse"``), whatever ``low_rank_min_dim``
    :param low_rank_min_dim: smallest input-factor dimension that is kept low-rank (an integer ``low_rank``)
    :return: each block's curvature representation
    """
    kinds: dict[KFACBlock, type[BlockCurvature]] = {}
    rank = kept_eigenpairs(low_rank)
    for block in blocks:
        out_dim, in_dim = block.matrix_shape  # of G and A
        if low_rank == "auto":
            large = out_dim * in_dim > AUTO_MIN_SIZE
            low_a, low_g = large and in_dim > AUTO_RANK, large and out_dim > AUTO_RANK
        else:
            low_a, low_g = rank is not None and in_dim > low_rank_min_dim and in_dim > rank, False
        if low_a and low_g and kfac_inverse == "eigen":
            kinds[block] = TwoSidedLowRankEigenCurvature
        else:
            kinds[block] = CURVATURE_TYPES[(kfac_inverse, low_a)]
    return kinds


def convert(
    kinds: dict[KFACBlock, tuple[th.dtype, th.device]],
    factors: dict[KFACBlock, KroneckerFactors],
    curvature: dict[KFACBlock, BlockCurvature],
) -> None:
    """
    Convert blocks' factors and curvature, in the dicts, to their parameters' new dtype and device.

    :param kinds: the blocks to convert, and their parameters' (dtype, device)
    """
    for block, (dtype, device) in kinds.items():
        found = factors.get(block)
        if found is not None:
            factors[block] = KroneckerFactors(
                found.a.to(device=device, dtype=dtype), found.g.to(device=device, dtype=dtype)
            )
        curvature[block] = curvature[block].to(dtype, device)


def entries(
    blocks: list[KFACBlock], factors: dict[KFACBlock, KroneckerFactors], curvature: dict[KFACBlock, BlockCurvature]
) -> Iterator[tuple[KFACBlock, dict[str, th.Tensor]]]:
    """Per block with state: its factors and decompositions under the keys of the saved format."""
    for block in blocks:
        found = factors.get(block)
        block_entries = {} if found is None else {"A": found.a, "G": found.g}
        block_entries.update(curvature[block].entries())
        if block_entries:
            yield block, block_entries


def from_entries(
    saved: dict[KFACBlock, dict[str, th.Tensor]], kinds: dict[KFACBlock, type[BlockCurvature]]
) -> tuple[dict[KFACBlock, KroneckerFactors], dict[KFACBlock, BlockCurvature]]:
    """
    :param saved: per block, as given by :func:`entries` (a block without entries starts afresh)
    :param kinds: each block's curvature representation
    :return: the blocks' factors and curvature
    """
    factors = {block: KroneckerFactors(e["A"], e["G"]) for block, e in saved.items() if "A" in e and "G" in e}
    return factors, {block: kind.from_entries(saved.get(block, {})) for block, kind in kinds.items()}
