"""
The K-FAC preconditioner: turns gradients into trust-region-scaled natural gradients (blocks + statistics + curvature
+ solve, on the cadence of a :class:`CurvatureSchedule`). A first-order step rule then applies them (:mod:`.optimizer`).
"""

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch as th
from torch import nn

from sb3_trpo_kfac.common import distributed
from sb3_trpo_kfac.common.kfac import state
from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature
from sb3_trpo_kfac.common.kfac.decomposition import BackgroundDecomposition, CurvatureJob
from sb3_trpo_kfac.common.kfac.distributed import (
    assign_owners,
    decomposition_cost,
    exchange_curvature,
    split_by_default,
)
from sb3_trpo_kfac.common.kfac.gradient_rows import GradientRows
from sb3_trpo_kfac.common.kfac.groups import block_groups, current_kinds, group_kind, parameter_groups
from sb3_trpo_kfac.common.kfac.layout import GroupBuffers, GroupLayout
from sb3_trpo_kfac.common.kfac.low_rank import LOW_RANK_TYPES, ROW_SOLVING_TYPES
from sb3_trpo_kfac.common.kfac.options import check_kfac_arguments
from sb3_trpo_kfac.common.kfac.schedule import CurvatureSchedule, KFACCounters
from sb3_trpo_kfac.common.kfac.solve import KroneckerSolver
from sb3_trpo_kfac.common.kfac.statistics import FactorStatistics
from sb3_trpo_kfac.common.kfac.trust_region import Preconditioned, cold_directions, trust_region
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError, check_float


class KFACPreconditioner:
    """
    K-FAC preconditioner with ACKTR's trust region, for any ``nn.Module``.

    Statistics: call the model inside :meth:`collect`, then :meth:`update_statistics` with a sum-reduced *sampled*
    negative log-likelihood (the Fisher loss). :meth:`precondition_gradients` then turns the gradients in ``.grad``
    (plus ``weight_decay * p``) into ``V = (A ⊗ G + λI)⁻¹ ∇`` per block (``V = ∇`` outside blocks) and its scale
    ``ν`` per parameter group (:mod:`.trust_region`); :meth:`step` writes ``ν V`` into ``.grad`` for any first-order
    optimizer. The curvature is refreshed every ``kfac_update`` steps once new statistics exist; before any statistics
    exist the raw gradient is used (inside the same trust region).

    Diagnostics of the last step, one entry per parameter group: ``last_nu`` (ν) and ``last_vfv`` (``lr² Vᵀ∇``, equal
    to ``lr² Vᵀ F V`` for the solve and its refinement), so ``last_nu² · last_vfv`` is the quadratic KL of ``ν V``.

    :param model: the module whose ``nn.Linear`` / ``nn.Conv2d`` layers get K-FAC blocks
    :param params: parameters (default: all of ``model``'s that require grad), or parameter groups (dicts with
        ``"params"`` and optionally ``"lr"``, ``"kfac_clip"``), one trust region each (:mod:`.groups`)
    :param lr: learning rate η: the trust region bounds ``η² Vᵀ F V`` (``param_groups[i]["lr"]`` is read at each step)
    :param kfac_clip: trust-region radius κ
    :param kfac_damping: Tikhonov damping λ added to the Kronecker-factored Fisher
    :param kfac_stats_decay: running-average factor ρ of the factors per step (the first batch initialises them)
    :param kfac_stats_interval: the caller updates the statistics every this many steps: each update then decays the
        factors by ``ρ ** kfac_stats_interval``, so their memory in steps is the same whatever the interval
    :param kfac_update: refresh the curvature at the first step with new statistics at least this many steps after the
        last refresh (every ``kfac_update`` steps when statistics come every step; right after them when less often)
    :param weight_decay: L2 coefficient added to the gradient (and to the damping of the blocks)
    :param kfac_cold_iter: number of initial updates that use the gradient clipped to ``kfac_cold_max_grad_norm``
        (global norm) without preconditioning or trust region (ν = 1); statistics are still gathered during them
    :param kfac_cold_max_grad_norm: gradient-norm clip of the cold-start steps
    :param kfac_inverse: ``"eigen"`` (exact damping, :mod:`.eigen`) or ``"inverse"`` (factored damping, :mod:`.inverse`)
    :param kfac_low_rank: if set, input factors of dimension above ``kfac_low_rank_min_dim`` keep only their top
        ``kfac_low_rank`` eigenpairs (:mod:`.low_rank`); ``"auto"``: the blocks of more than 2²⁰ parameters keep 64
        eigenpairs of each factor above 64 (both factors with ``"eigen"``; see :func:`.state.curvature_types`)
    :param kfac_low_rank_min_dim: smallest input-factor dimension that uses ``kfac_low_rank``
    :param kfac_async: compute the curvature in a background thread (:mod:`.decomposition`): a step due for a refresh
        starts it on a copy of the factors and keeps the current curvature; the next step swaps the new one in (the
        first refresh is synchronous). Deterministic; it pays off with a free second core.
    :param kfac_refine: CG iterations on the current factors in steps whose statistics are newer than the curvature
        (:mod:`.solve`): with ``kfac_update > 1`` or ``kfac_async`` the steps then follow the statistics
    :param kfac_stats_samples: if set, each statistics update estimates the factors from at most this many samples
        of the batch, drawn at random without replacement (the same ones for every layer): an unbiased estimate of the
        batch's factors at a fraction of the cost (:class:`.statistics.FactorStatistics`); None: every sample
    :param kfac_split_decompositions: in a data-parallel run (:mod:`.distributed`), each block's decompositions are
        computed by one rank and broadcast (blocks assigned by cost) instead of by every rank; None (default): split
        when the decompositions are expensive enough to pay for the exchange (a large layer); ignored in one process
    :param modules: layers to cover (default: every ``nn.Linear`` / ``nn.Conv2d`` in ``model``)
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        lr: float = 0.25,
        kfac_clip: float = 0.001,
        kfac_damping: float = 0.01,
        kfac_stats_decay: float = 0.99,
        kfac_stats_interval: int = 1,
        kfac_update: int = 1,
        weight_decay: float = 0.0,
        kfac_cold_iter: int = 0,
        kfac_cold_max_grad_norm: float = 0.5,
        kfac_inverse: str = "eigen",
        kfac_low_rank: int | str | None = None,
        kfac_low_rank_min_dim: int = 1024,
        kfac_async: bool = False,
        kfac_refine: int = 0,
        kfac_stats_samples: int | None = None,
        kfac_split_decompositions: bool | None = None,
        modules: Iterable[nn.Module] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        defaults = dict(lr=check_float("lr", lr, 0.0), weight_decay=check_float("weight_decay", weight_decay, 0.0))
        knobs = check_kfac_arguments(
            kfac_clip=kfac_clip, kfac_damping=kfac_damping, kfac_stats_decay=kfac_stats_decay,
            kfac_stats_interval=kfac_stats_interval, kfac_update=kfac_update, kfac_cold_iter=kfac_cold_iter,
            kfac_cold_max_grad_norm=kfac_cold_max_grad_norm, kfac_inverse=kfac_inverse, kfac_low_rank=kfac_low_rank,
            kfac_low_rank_min_dim=kfac_low_rank_min_dim, kfac_async=kfac_async, kfac_refine=kfac_refine,
            kfac_stats_samples=kfac_stats_samples,
            kfac_split_decompositions=kfac_split_decompositions,
        )  # fmt: skip
        self.kfac_clip: float = knobs["kfac_clip"]
        self.kfac_damping: float = knobs["kfac_damping"]
        self.kfac_cold_max_grad_norm: float = knobs["kfac_cold_max_grad_norm"]
        self.kfac_low_rank: int | str | None = knobs["kfac_low_rank"]
        self._rank = state.kept_eigenpairs(self.kfac_low_rank)  # of the low-rank factors
        self.kfac_async: bool = knobs["kfac_async"]
        self.kfac_refine: int = knobs["kfac_refine"]
        self.kfac_split_decompositions: bool | None = knobs["kfac_split_decompositions"]

        self.group_defaults = {**defaults, "kfac_clip": self.kfac_clip}  # what a parameter group does not set itself
        self.param_groups = parameter_groups(model.parameters() if params is None else params, self.group_defaults)
        # the blocks, and the trust region (parameter group) each block's ⟨V, ∇⟩ counts in
        self.blocks, self.block_groups = block_groups(model, modules, self.param_groups)

        self.counters = KFACCounters()
        self.schedule = CurvatureSchedule(knobs["kfac_update"], knobs["kfac_cold_iter"], self.counters)
        decay = knobs["kfac_stats_decay"] ** knobs["kfac_stats_interval"]  # per statistics update
        self.statistics = FactorStatistics(self.blocks, decay, self.counters, knobs["kfac_stats_samples"])
        self.curvature_types = state.curvature_types(
            self.blocks, knobs["kfac_inverse"], self.kfac_low_rank, knobs["kfac_low_rank_min_dim"]
        )
        self.curvature: dict[KFACBlock, BlockCurvature] = {b: kind() for b, kind in self.curvature_types.items()}
        self.background = BackgroundDecomposition()
        # (world size, each block's owner) of split decompositions, made at first use
        self._block_owners: tuple[int, dict[KFACBlock, int] | None] | None = None
        self.solver = KroneckerSolver(self.kfac_refine)
        # the blocks whose solve can start from the gradient's rows (a large layer's low-rank factors)
        self.gradient_rows = GradientRows([b for b, kind in self.curvature_types.items() if kind in ROW_SOLVING_TYPES])
        # flat buffers per parameter group, built at first use (and after loading); their batches' stacked solve
        # factors are rebuilt after every curvature update
        self._buffers: list[GroupBuffers] | None = None
        self._factors_stale = True
        # per parameter group, the (dtype, device) its state was built for (see follow_parameters)
        self._group_kinds = [group_kind(group["params"]) for group in self.param_groups]
        self.last_nu = [float("nan")] * len(self.param_groups)
        self.last_vfv = [float("nan")] * len(self.param_groups)

    def _block_damping(self) -> float:
        return self.kfac_damping + self.param_groups[0]["weight_decay"]

    # ------------------------------------------------------------------ statistics
    def collect(self) -> contextlib.AbstractContextManager[None]:
        """Context in which forward passes of covered layers are saved for :meth:`update_statistics`."""
        return self.statistics.collect()

    def capture_gradient_rows(self) -> contextlib.AbstractContextManager[None]:
        """
        Context around a forward whose loss's gradient the next step preconditions: the large low-rank blocks' rows
        ``(δ, ā)`` are kept, and the step solves from them when cheaper (:mod:`.gradient_rows`; the same result up
        to rounding). A no-op without such blocks.
        """
        return self.gradient_rows.capture() if self.gradient_rows.blocks else contextlib.nullcontext()

    def remove_hooks(self) -> None:
        """Stop saving forwards in :meth:`collect` for good (only the statistics gathered so far are used)."""
        self.statistics.remove_hooks()

    def update_statistics(self, fisher_loss: th.Tensor) -> bool:
        """
        Update the running Kronecker factors from the forwards saved in the last :meth:`collect`
        (see :class:`FactorStatistics`); if nothing saved has a sample, nothing changes.

        :param fisher_loss: scalar, *sum* over the N samples of the sampled negative log-likelihood
        :return: whether the statistics were updated
        """
        calls = self.statistics.take_saved()
        if calls is None and not distributed.is_data_parallel():
            return False
        self.follow_parameters()
        return self.statistics.update(fisher_loss, calls or [])  # a rank without samples joins the reduction

    # ------------------------------------------------------------------ curvature
    @th.no_grad()
    def update_curvature(self) -> None:
        """Recompute the curvature of all factors now (a background computation in flight is discarded)."""
        self.background.discard()
        self.follow_parameters()
        job = self._curvature_job(snapshot=False)
        job.compute(self._block_damping(), self._rank)
        self._apply(job, self.counters.stats_updates)

    def _curvature_job(self, snapshot: bool) -> CurvatureJob:
        factors, owners = self.statistics.factors, self._owners()
        owned = [b for b in self.blocks if b in factors and (owners is None or owners[b] == distributed.rank())]
        return CurvatureJob([(b, factors[b], self.curvature[b]) for b in owned], snapshot)

    def _owners(self) -> dict[KFACBlock, int] | None:
        """Each block's owner when the decompositions are split across data-parallel ranks, else None."""
        if self.kfac_split_decompositions is False or not distributed.is_data_parallel():
            return None
        world_size = distributed.world_size()
        if self._block_owners is None or self._block_owners[0] != world_size:
            low_rank = {kind: self._rank if issubclass(kind, LOW_RANK_TYPES) else None
                        for kind in self.curvature_types.values()}  # fmt: skip
            costs = [decomposition_cost(b, low_rank[self.curvature_types[b]]) for b in self.blocks]
            split = split_by_default(costs) if self.kfac_split_decompositions is None else True
            self._block_owners = (world_size, dict(zip(self.blocks, assign_owners(costs, world_size))) if split else None)
        return self._block_owners[1]

    @property
    def splits_decompositions(self) -> bool:
        """Whether the decompositions are split across data-parallel ranks (applying them is then collective)."""
        return self._owners() is not None

    def _apply(self, job: CurvatureJob, stats_updates: int) -> None:
        curvature, failures = job.apply()
        owners = self._owners()
        if owners is not None:  # the other blocks from their owners (here, in the thread of every collective)
            curvature, failures = exchange_curvature(self.blocks, owners, curvature, self.curvature, failures)
        self.curvature.update(curvature)
        for message in failures:
            warnings.warn(message)
        self.schedule.finish_curvature(stats_updates, len(failures))
        self._factors_stale = True

    def join_decomposition(self) -> None:
        """Wait for the background computation (``kfac_async``), if any, and swap its result in."""
        joined = self.background.join()
        if joined is not None:
            self._apply(*joined)

    # ------------------------------------------------------------------ solves and the trust region
    def _group_buffers(self) -> list[GroupBuffers]:
        """The flat buffers of each parameter group (built on first use, and after loading or adding groups)."""
        if self._buffers is None or len(self._buffers) != len(self.param_groups):
            self._buffers = [
                GroupBuffers(GroupLayout(group["params"], [b for b in self.blocks if self.block_groups[b] == index]))
                for index, group in enumerate(self.param_groups)
            ]
            self._factors_stale = True
        return self._buffers

    def _solve(
        self, groups: list[GroupBuffers], rows: dict[KFACBlock, tuple[th.Tensor, th.Tensor]] | None = None
    ) -> set[KFACBlock]:
        """Directions from the staged gradients (``rows``: see :meth:`KroneckerSolver.solve`); the blocks solved."""
        if self._factors_stale:
            self.solver.restack(groups, self.curvature, self._block_damping())
            self._factors_stale = False
        # a curvature of the current factors solves exactly: refine only when statistics came after it
        refine = self.schedule.statistics_newer_than_curvature
        return self.solver.solve(groups, self.curvature, self.statistics.factors, self._block_damping(), refine, rows)

    def precondition(self, params: Sequence[nn.Parameter], vectors: Sequence[th.Tensor]) -> list[th.Tensor]:
        """
        The solve of a step applied to vectors given per parameter (e.g. as a CG preconditioner), without trust region.

        For a covered layer, weight and bias vectors are solved jointly (a missing one counts as zero and is not
        returned); other vectors, and layers without curvature, are returned unchanged. The curvature is computed now
        if statistics exist but were never decomposed; call :meth:`update_curvature` after :meth:`update_statistics`.

        :param params: parameters the vectors belong to
        :param vectors: one tensor per parameter, of the parameter's shape
        :return: the preconditioned vectors, in the same order
        """
        if len(params) != len(vectors):
            raise ArgumentError(f"`params` and `vectors` differ in length ({len(params)} vs {len(vectors)})")
        self.join_decomposition()
        self.follow_parameters()
        if not self.schedule.has_curvature and self.counters.stats_updates > 0:
            self.update_curvature()
        groups = self._group_buffers()
        given = {id(p): v for p, v in zip(params, vectors)}
        with th.no_grad():
            for group in groups:
                group.stage([given.get(id(p)) for p in group.params])
            solved = self._solve(groups)
        directions = {id(p): view for group in groups for p, view in zip(group.params, group.direction_views)}
        covered = {id(p) for block in solved for p in block.params}
        # copies: the next solve reuses the buffers
        return [directions[id(p)].clone() if id(p) in covered else v for p, v in zip(params, vectors)]

    @th.no_grad()
    def precondition_gradients(self, refresh_curvature: bool = True) -> Preconditioned | None:
        """
        One step's natural gradients from ``.grad``, into the direction buffers (``.grad`` is left as it is).

        :param refresh_curvature: False for a further step on the statistics of the previous one: it keeps the
            current curvature (a background computation stays in flight) and counts neither toward ``kfac_update``
            nor toward ``kfac_cold_iter`` (``counters["extra_steps"]``)
        :return: the directions and their trust-region scales, or None if no parameter has a gradient or the result
            is not finite (``counters["skipped_steps"]``)
        """
        self.schedule.count_step(refresh_curvature)
        self.follow_parameters()
        groups = self._group_buffers()
        grads = [[p.grad for p in group.params] for group in groups]
        if all(grad is None for group_grads in grads for grad in group_grads):
            return None
        if self.kfac_async and refresh_curvature:
            self.join_decomposition()  # the computation started at the previous step, one update old
        if refresh_curvature and self.schedule.curvature_due():
            first = not self.schedule.has_curvature
            self.schedule.start_curvature()
            if self.kfac_async and not first:
                # computed in the background while the caller does other work (e.g. the next rollout); this step
                # keeps the current curvature, the next one swaps the new one in
                job, stats_updates = self._curvature_job(snapshot=True), self.counters.stats_updates
                self.background.submit(job, self._block_damping(), self._rank, stats_updates)
            else:
                self.update_curvature()

        weight_decay = self.param_groups[0]["weight_decay"]
        present = [[i for i, grad in enumerate(group_grads) if grad is not None] for group_grads in grads]
        for group, group_grads, indices in zip(groups, grads, present):
            group.stage(group_grads)
            if weight_decay > 0 and indices:
                params: list[th.Tensor] = [group.params[i] for i in indices]
                # torch's private _foreach kernel: one call for all parameters, whatever the layer count
                th._foreach_add_([group.gradient_views[i] for i in indices], params, alpha=weight_decay)
        rows: dict[KFACBlock, tuple[th.Tensor, th.Tensor]] | None = self.gradient_rows.take()
        if weight_decay > 0 or distributed.is_data_parallel():  # ∇ is then not a multiple of this rank's rows
            rows = None
        cold = self.schedule.cold
        if cold:
            cold_directions(groups, self.kfac_cold_max_grad_norm)
        else:
            self._solve(groups, rows)
        self.last_vfv, self.last_nu = trust_region(groups, self.param_groups, cold)
        if not all(math.isfinite(x) for x in self.last_vfv + self.last_nu):
            self.counters.skipped_steps += 1
            return None
        if refresh_curvature:
            self.counters.updates += 1
        return Preconditioned(groups, present, list(self.last_nu))

    def step(self, refresh_curvature: bool = True) -> bool:
        """
        Precondition the gradients: ``p.grad ← ν V`` (see :meth:`precondition_gradients`), before a first-order step.

        :return: whether ``.grad`` was rewritten (False: no gradient, or a non-finite result left ``.grad`` as it was)
        """
        result = self.precondition_gradients(refresh_curvature)
        if result is not None:
            result.write_gradients()
        return result is not None

    # ------------------------------------------------------------------ state
    def follow_parameters(self) -> None:
        """
        Convert the factors and curvature of the groups whose parameters changed dtype or device (e.g.
        ``model.double()`` after some steps); the flat buffers are rebuilt at the next use.
        """
        kinds = current_kinds(self.param_groups)
        known = self._group_kinds + kinds[len(self._group_kinds) :]  # groups added later start with their own
        if kinds == known:
            self._group_kinds = known
            return
        kinds = [group_kind(group["params"]) for group in self.param_groups]
        self.join_decomposition()  # its decompositions are converted with the rest
        changed = {block: kinds[i] for block, i in self.block_groups.items() if kinds[i] != known[i]}
        state.convert(changed, self.statistics.factors, self.curvature)
        self._group_kinds = kinds
        self._buffers = None

    def state_entries(self) -> Iterator[tuple[KFACBlock, dict[str, th.Tensor]]]:
        """Per block with state: its factors and decompositions under the keys of the saved format."""
        return state.entries(self.blocks, self.statistics.factors, self.curvature)

    def load_state_entries(
        self, entries: dict[KFACBlock, dict[str, th.Tensor]], counters: dict[str, int] | None
    ) -> None:
        """
        Replace all statistics and curvature (a background computation in flight is discarded).

        :param entries: per block, as given by :meth:`state_entries` (already in the parameters' dtype and device)
        :param counters: saved :class:`KFACCounters`, if any
        """
        self.background.discard()
        self.statistics.factors, self.curvature = state.from_entries(entries, self.curvature_types)
        if counters is not None:
            self.counters.load(counters)
        self._buffers = None
        self._factors_stale = True
        self._group_kinds = [group_kind(group["params"]) for group in self.param_groups]
