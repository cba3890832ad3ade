"""
Curvature updates: the decompositions of every block's current factors, computed in the calling thread or in a
background worker while the caller does other work (in ACKTR, the next rollout).

Small networks have many same-size factors and the per-call overhead of ``eigh`` is then most of the cost, so the
factors that are eigendecomposed in full are stacked by size for one batched ``eigh`` each. A job is prepared and
applied in the calling thread; only :meth:`CurvatureJob.compute` may run in the worker, and it reads nothing but the
job, so results are deterministic: they are swapped in at a fixed point of the caller.
"""

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch as th

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.curvature import EIGENVALUE_FLOOR, BlockCurvature, Eigen, describe_factor, eigen
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors


@dataclasses.dataclass
class BlockJob:
    """One block's part of a curvature update."""

    block: KFACBlock
    factors: KroneckerFactors  # the factors it reads (copies of those compute() reads, in the background)
    before: BlockCurvature  # decompositions are only ever replaced, never modified in place: shared by reference
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # the new decompositions


class CurvatureJob:
    """
    One curvature update of the given blocks.

    :param items: per block with factors: the block, its factors and its current curvature
    :param snapshot: copy the factors the blocks' own decompositions read (for a background computation, since
        :meth:`FactorStatistics.update` changes the factors in place); the batched stacks are copies anyway
    """

    def __init__(self, items: list[tuple[KFACBlock, KroneckerFactors, BlockCurvature]], snapshot: bool) -> None:
        self.blocks: list[BlockJob] = []
        # per size, per factor (by its memory): the factor and its users; blocks fed the same input can share their running
        # input factor (FactorStatistics), which is then decomposed once
        stacks: dict[tuple[int, th.dtype], dict[int, tuple[th.Tensor, list[tuple[BlockJob, str]]]]] = {}
        for block, factors, curvature in items:
            job = BlockJob(block, factors, curvature)
            for side in curvature.batched:
                mat = getattr(factors, side)
                stacks.setdefault((mat.shape[0], mat.dtype), {}).setdefault(mat.data_ptr(), (mat, []))[1].append((job, side))
            if snapshot and curvature.reads:
                job.factors = KroneckerFactors(
                    *(
                        getattr(factors, side).clone() if side in curvature.reads else getattr(factors, side)
                        for side in ("a", "g")
                    )
                )
            self.blocks.append(job)
        # per size: the users of each distinct factor, their stack, and the batched eigh of the stack (None if it raised)
        self.eigen_groups = [[users for _, users in group.values()] for group in stacks.values()]
        self.eigen_stacks = [th.stack([mat for mat, _ in group.values()]) for group in stacks.values()]
        self.eigen_results: list[tuple[th.Tensor, th.Tensor] | None] = []
        self.failures: list[str] = []

    @th.no_grad()
    def compute(self, damping: float, rank: int | None) -> None:
        """
        The decompositions, into the job (it may run in the worker thread). With full-rank eigendecompositions this
        is one ``eigh`` call per factor size, so the worker rarely needs the GIL; the checks run in :meth:`apply`.

        :param damping: λ (the factored damping's inverses depend on it)
        :param rank: number of eigenpairs of a low-rank factor
        """
        for job in self.blocks:
            job.fields = job.before.compute(job.block.name, job.factors, damping, rank, self.failures)
        for stack in self.eigen_stacks:
            try:
                self.eigen_results.append(th.linalg.eigh(stack))
            except RuntimeError:
                self.eigen_results.append(None)

    @th.no_grad()
    def apply(self) -> tuple[dict[KFACBlock, BlockCurvature], list[str]]:
        """
        Check the computed decompositions (calling thread). A batched ``eigh`` that failed or is not finite is redone
        factor by factor (float64 retry, the previous basis as fallback).

        :return: the blocks' new curvatures and the messages of the decompositions that failed
        """
        computed = [t for result in self.eigen_results if result is not None for t in result]
        # a norm is finite only if every entry is: one fused reduction checks all batched results (torch's private
        # _foreach kernel: one call instead of one per tensor)
        all_finite = not computed or bool(th.isfinite(th.stack(th._foreach_norm(computed))).all())
        for group, stack, result in zip(self.eigen_groups, self.eigen_stacks, self.eigen_results, strict=True):
            if result is not None and (
                all_finite or bool(th.isfinite(result[0]).all() and th.isfinite(result[1]).all())
            ):
                values = result[0].masked_fill(result[0] < EIGENVALUE_FLOOR, 0.0)
                pairs: list[Eigen | None] = [Eigen(v, q) for v, q in zip(values.unbind(0), result[1].unbind(0))]
            else:
                pairs = [
                    eigen_or_previous(users[0][0].block.name, mat, getattr(users[0][0].before, users[0][1]), self.failures)
                    for users, mat in zip(group, stack.unbind(0))
                ]
            for users, pair in zip(group, pairs):
                for job, side in users:
                    if pair is not None:
                        job.fields[side] = pair
        return {job.block: job.before.updated(**job.fields) for job in self.blocks}, self.failures


def eigen_or_previous(name: str, mat: th.Tensor, previous: Eigen | None, failures: list[str]) -> Eigen | None:
    """
    One factor's eigendecomposition (:func:`eigen`), or, if it failed, the previous one and a message naming the
    factor's size and condition.

    :param name: the block's name
    :param mat: the factor
    :param previous: its last decomposition, if any
    :param failures: where the message goes
    """
    result = eigen(mat)
    if result is None:
        failures.append(
            f"KFAC: eigendecomposition of a factor of {name} failed ({describe_factor(mat)}); keeping the previous basis"
        )
        return previous
    return result


def _limit_worker_threads() -> None:
    """
    Give the decomposition worker the process's torch thread count. OpenMP's thread count is per thread: a fresh
    thread's LAPACK calls otherwise use a team of ``os.cpu_count()`` threads whatever ``torch.set_num_threads`` said,
    which oversubscribes the cores the caller is using. Setting the current value again leaves the process-wide
    setting unchanged and only sets this thread's.
    """
    th.set_num_threads(th.get_num_threads())


class BackgroundDecomposition:
    """At most one :class:`CurvatureJob` computing in a single worker thread (started on first use)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        # (future, job, statistics updates its factors reflect) of the job in flight
        self._pending: tuple[Future, CurvatureJob, int] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(self, job: CurvatureJob, damping: float, rank: int | None, stats_updates: int) -> None:
        """Start computing ``job`` (a job in flight is discarded)."""
        self.discard()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kfac-decomposition", initializer=_limit_worker_threads
            )
        self._pending = (self._executor.submit(job.compute, damping, rank), job, stats_updates)

    def join(self) -> tuple[CurvatureJob, int] | None:
        """Wait for the job in flight, if any: the job and the statistics updates it reflects."""
        if self._pending is None:
            return None
        future, job, stats_updates = self._pending
        self._pending = None
        future.result()
        return job, stats_updates

    def discard(self) -> None:
        """Forget the job in flight, if any (it only reads its own snapshot, so it may finish alone)."""
        if self._pending is not None:
            self._pending[0].cancel()
            self._pending = None
