"""
K-FAC across data-parallel ranks (``torch.distributed``): the factor statistics of all ranks' samples, and the
decompositions either computed by every rank (replicated) or split, each block's by one rank and broadcast (the
assignment of kfac-pytorch / KAISA).

Statistics: each rank's per-block moments (location-scaled sums of ``ā āᵀ`` and ``δ δᵀ``) and sample counts are
summed over ranks in one collective before they are divided and folded into the running averages, so the factors are
those of the union of the batches whatever each rank's batch size, and a block without samples on some rank still
agrees. A non-finite moment on any rank makes the sum non-finite on every rank, so all refuse it together.

Split decompositions: every rank decomposes the blocks it owns (in the worker thread with ``kfac_async``), then each
owner broadcasts them from the calling thread when the result is applied, so all ranks use the owner's values and the
collectives run in the same order on every rank.
"""

import math
from typing import TYPE_CHECKING, Any

import torch as th
from torch import distributed as dist

from sb3_trpo_kfac.common import distributed
from sb3_trpo_kfac.common.kfac.blocks import KFACBlock

if TYPE_CHECKING:  # the curvature modules import the statistics, which import this module
    from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature

# per block: [Σ ā āᵀ, Σ δ δᵀ (both location-scaled), rows, samples] as FactorStatistics.update accumulates them
Moments = dict[KFACBlock, list[Any]]


def all_reduce_moments(blocks: list[KFACBlock], sums: Moments) -> Moments:
    """
    The moments and sample counts of every block summed over ranks (one collective); blocks without samples on any
    rank are left out.

    :param blocks: all blocks, in the same order on every rank
    :param sums: this rank's moments of the blocks that had samples here
    :return: per block with samples somewhere: ``[Σ ā āᵀ, Σ δ δᵀ, None, samples]`` over all ranks
    """
    parts: list[th.Tensor] = []
    counts: list[float] = []
    for block in blocks:
        acc = sums.get(block)
        if acc is None:
            out_dim, in_dim = block.matrix_shape
            weight = block.weight
            parts += [weight.new_zeros(in_dim, in_dim), weight.new_zeros(out_dim, out_dim)]
            counts.append(0.0)
        else:
            parts += [acc[0], acc[1]]
            counts.append(float(acc[3]))
    flat = th.cat([t.reshape(-1) for t in parts] + [th.tensor(counts, dtype=parts[0].dtype, device=parts[0].device)])
    distributed.all_reduce_sum_([flat])
    reduced: Moments = {}
    offset = 0
    for block, a_part, g_part, samples in zip(blocks, parts[::2], parts[1::2], flat[-len(blocks) :].tolist()):
        a_sum = flat[offset : offset + a_part.numel()].view_as(a_part)
        offset += a_part.numel()
        g_sum = flat[offset : offset + g_part.numel()].view_as(g_part)
        offset += g_part.numel()
        if samples > 0:
            reduced[block] = [a_sum.to(a_part.dtype), g_sum.to(g_part.dtype), None, int(samples)]
    return reduced


def decomposition_cost(block: KFACBlock, low_rank: int | None) -> float:
    """
    Rough flop count of a block's decompositions, to balance the split: ``d³`` per factor decomposed in full,
    ``d² r`` for an input factor kept as its top ``r`` eigenpairs (subspace iteration).

    :param block: the block
    :param low_rank: ``r`` if its input factor is low-rank, else None
    """
    out_dim, in_dim = block.matrix_shape
    cost_a = float(in_dim) ** 3 if low_rank is None else float(in_dim) ** 2 * low_rank
    return cost_a + float(out_dim) ** 3


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """
    Each block's owner: the most expensive block first, each to the rank with the least work so far (ties to the
    lowest rank, so every rank computes the same assignment).

    :param costs: per block, in the blocks' order
    :param world_size: number of ranks
    :return: per block, its owner's rank
    """
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = owner
        load[owner] += costs[index]
    return owners


def exchange_curvature(
    blocks: list[KFACBlock],
    owners: dict[KFACBlock, int],
    computed: "dict[KFACBlock, BlockCurvature]",
    current: "dict[KFACBlock, BlockCurvature]",
    failures: list[str],
) -> "tuple[dict[KFACBlock, BlockCurvature], list[str]]":
    """
    Every block's new curvature from its owner: each rank broadcasts the decompositions it computed (a list of keys
    and shapes, then one flat tensor per dtype), so all ranks hold the owners' values exactly. Call it from the
    thread that runs the other collectives.

    :param blocks: all blocks, in the same order on every rank
    :param owners: each block's owner
    :param computed: this rank's new curvature of the blocks it owns (those of :meth:`CurvatureJob.apply`)
    :param current: every block's curvature before the update (a decomposition that failed keeps its field)
    :param failures: this rank's failure messages
    :return: every block's new curvature, and the failure messages of all ranks
    """
    me = distributed.rank()
    updated = dict(computed)
    all_failures: list[str] = []
    device = blocks[0].weight.device
    for source in range(distributed.world_size()):
        # (block index, saved-format key, tensor) of what the source computed
        sent = [(i, key, value) for i, block in enumerate(blocks) if block in computed and owners[block] == source
                for key, value in computed[block].entries().items()] if source == me else []  # fmt: skip
        header: list[Any] = [([(i, key, tuple(value.shape), value.dtype) for i, key, value in sent], failures)]
        dist.broadcast_object_list(header, src=source)
        layout, source_failures = header[0]
        all_failures += source_failures
        by_dtype: dict[th.dtype, list[int]] = {}
        for position, (*_, dtype) in enumerate(layout):
            by_dtype.setdefault(dtype, []).append(position)
        received: dict[int, dict[str, th.Tensor]] = {}
        for dtype, positions in by_dtype.items():
            sizes = [math.prod(layout[p][2]) for p in positions]
            if source == me:
                flat = th.cat([sent[p][2].reshape(-1) for p in positions])
            else:
                flat = th.empty(sum(sizes), dtype=dtype, device=device)
            dist.broadcast(flat, src=source)
            if source != me:
                for p, piece in zip(positions, flat.split(sizes)):
                    i, key, shape, _ = layout[p]
                    received.setdefault(i, {})[key] = piece.view(shape)
        for i, new in received.items():
            before = current[blocks[i]]
            fields = {key: value.to(blocks[i].weight.device) for key, value in new.items()}
            updated[blocks[i]] = type(before).from_entries({**before.entries(), **fields})
    return updated, all_failures
