"""
The K-FAC preconditioner: turns gradients into trust-region-scaled natural gradients (blocks + statistics + curvature
+ solve, on the cadence of a :class:`CurvatureSchedule`). A first-order step rule then applies them (:mod:`.optimizer`).
"""

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock, make_blocks
from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature
from sb3_trpo_kfac.common.kfac.decomposition import BackgroundDecomposition, CurvatureJob
from sb3_trpo_kfac.common.kfac.eigen import EigenCurvature
from sb3_trpo_kfac.common.kfac.groups import current_kinds, group_kind, parameter_groups
from sb3_trpo_kfac.common.kfac.inverse import InverseCurvature
from sb3_trpo_kfac.common.kfac.layout import GroupBuffers, GroupLayout
from sb3_trpo_kfac.common.kfac.low_rank import LowRankEigenCurvature, LowRankInverseCurvature
from sb3_trpo_kfac.common.kfac.options import check_kfac_arguments
from sb3_trpo_kfac.common.kfac.schedule import CurvatureSchedule, KFACCounters
from sb3_trpo_kfac.common.kfac.solve import KroneckerSolver
from sb3_trpo_kfac.common.kfac.statistics import FactorStatistics, KroneckerFactors
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError, check_float

# the curvature representation of a block, by kfac_inverse and whether its input factor is low-rank
CURVATURE_TYPES: dict[tuple[str, bool], type[BlockCurvature]] = {
    ("eigen", False): EigenCurvature,
    ("eigen", True): LowRankEigenCurvature,
    ("inverse", False): InverseCurvature,
    ("inverse", True): LowRankInverseCurvature,
}
# keys of a block's entries in the optimizer's saved state: its factors and its decompositions
STATE_KEYS = ("A", "G", *dict.fromkeys(key for kind in CURVATURE_TYPES.values() for _, keys in kind.KEYS.values() for key in keys))


@dataclasses.dataclass
class Preconditioned:
    """One step's preconditioned gradients: per parameter group, ``V`` in its direction buffer and its scale ν."""

    groups: list[GroupBuffers]
    present: list[list[int]]  # per group: the positions of the parameters that have a gradient
    nus: list[float]

    def write_gradients(self) -> None:
        """``p.grad ← ν V`` for every parameter that has a gradient (the others keep None)."""
        for group, indices, nu in zip(self.groups, self.present, self.nus):
            grads = [group.params[i].grad for i in indices]
            if grads:
                # torch's private _foreach kernels: one call for all parameters, whatever the layer count
                th._foreach_copy_(grads, [group.direction_views[i] for i in indices])
                th._foreach_mul_(grads, nu)


class KFACPreconditioner:
    """
    K-FAC preconditioner with ACKTR's trust region, for any ``nn.Module``.

    Statistics: call the model inside :meth:`collect`, then :meth:`update_statistics` with a sum-reduced *sampled*
    negative log-likelihood (the Fisher loss). :meth:`precondition_gradients` then turns the gradients in ``.grad``
    (plus ``weight_decay * p``) into ``V = (A ⊗ G + λI)⁻¹ ∇`` per block (``V = ∇`` outside blocks) and
    ``ν = min(1, sqrt(kfac_clip / (lr² Σ⟨V, ∇⟩)))`` per parameter group (one trust region each); :meth:`step` writes
    ``ν V`` into ``.grad`` for any first-order optimizer. The curvature is refreshed every ``kfac_update`` steps once
    new statistics exist; before any statistics exist the raw gradient is used (inside the same trust region).

    Diagnostics of the last step, one entry per parameter group: ``last_nu`` (ν) and ``last_vfv`` (``lr² Vᵀ∇``, equal
    to ``lr² Vᵀ F V`` for the solve and its refinement), so ``last_nu² · last_vfv`` is the quadratic KL of ``ν V``.

    :param model: the module whose ``nn.Linear`` / ``nn.Conv2d`` layers get K-FAC blocks
    :param params: parameters (default: all of ``model``'s that require grad), or parameter groups (dicts with
        ``"params"`` and optionally ``"lr"``, ``"kfac_clip"``), one trust region each; a layer's weight and bias must
        share a group, ``weight_decay`` is common to all groups
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
    :param kfac_inverse: ``"eigen"`` (exact damping through eigendecompositions) or ``"inverse"`` (factored damping,
        see :class:`InverseCurvature`)
    :param kfac_low_rank: if set, input factors of dimension above ``kfac_low_rank_min_dim`` keep only their top
        ``kfac_low_rank`` eigenpairs (subspace iteration warm-started from the previous basis), see :mod:`.low_rank`
    :param kfac_low_rank_min_dim: smallest input-factor dimension that uses ``kfac_low_rank``
    :param kfac_async: compute the curvature in a background thread: a step that is due for a refresh starts it on a
        copy of the current factors and keeps the current curvature; the next step waits for it and swaps it in (the
        very first refresh is synchronous). Deterministic; it pays off with a free second core.
    :param kfac_refine: CG iterations on the current factors in steps whose statistics are newer than the curvature
        (see :class:`KroneckerSolver`): with ``kfac_update > 1`` or ``kfac_async`` the steps then follow the statistics
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
        kfac_low_rank: int | None = None,
        kfac_low_rank_min_dim: int = 1024,
        kfac_async: bool = False,
        kfac_refine: int = 0,
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
        )  # fmt: skip
        self.kfac_clip = defaults["kfac_clip"] = knobs["kfac_clip"]
        self.kfac_damping, self.kfac_cold_max_grad_norm = knobs["kfac_damping"], knobs["kfac_cold_max_grad_norm"]
        self.kfac_inverse, self.kfac_async, self.kfac_refine = knobs["kfac_inverse"], knobs["kfac_async"], knobs["kfac_refine"]
        self.kfac_low_rank, self.kfac_low_rank_min_dim = knobs["kfac_low_rank"], knobs["kfac_low_rank_min_dim"]
        self.solver = KroneckerSolver(self.kfac_refine)

        self.param_groups = parameter_groups(model.parameters() if params is None else params)
        for group in self.param_groups:
            for name, default in defaults.items():
                group.setdefault(name, default)
        group_of = {id(p): index for index, group in enumerate(self.param_groups) for p in group["params"]}
        self.blocks = make_blocks(model, modules, set(group_of))
        for block in self.blocks:
            if block.bias is not None and group_of.get(id(block.bias), group_of[id(block.weight)]) != group_of[id(block.weight)]:
                raise ArgumentError(f"`params`: the weight and bias of {block.name} are in different parameter groups")
        # the trust region (parameter group) each block's ⟨V, ∇⟩ counts in
        self.block_groups = {block: group_of[id(block.weight)] for block in self.blocks}

        self.counters = KFACCounters()
        self.schedule = CurvatureSchedule(knobs["kfac_update"], knobs["kfac_cold_iter"], self.counters)
        stats_decay = knobs["kfac_stats_decay"] ** knobs["kfac_stats_interval"]  # per statistics update
        self.statistics = FactorStatistics(self.blocks, stats_decay, self.counters)
        self.curvature: dict[KFACBlock, BlockCurvature] = {block: self._curvature_type(block)() for block in self.blocks}
        self.background = BackgroundDecomposition()
        # flat buffers per parameter group, built at first use (and after loading); their batches' stacked solve
        # factors are rebuilt after every curvature update
        self._buffers: list[GroupBuffers] | None = None
        self._factors_stale = True
        # per parameter group, the (dtype, device) its state was built for (see follow_parameters)
        self._group_kinds = [group_kind(group["params"]) for group in self.param_groups]
        self.last_nu = [float("nan")] * len(self.param_groups)
        self.last_vfv = [float("nan")] * len(self.param_groups)

    def _curvature_type(self, block: KFACBlock) -> type[BlockCurvature]:
        dim = block.matrix_shape[1]  # of the input factor A
        low_rank = self.kfac_low_rank is not None and dim > self.kfac_low_rank_min_dim and dim > self.kfac_low_rank
        return CURVATURE_TYPES[(self.kfac_inverse, low_rank)]

    def _block_damping(self) -> float:
        return self.kfac_damping + self.param_groups[0]["weight_decay"]

    # ------------------------------------------------------------------ statistics
    def collect(self) -> Any:
        """Context in which forward passes of covered layers are saved for :meth:`update_statistics`."""
        return self.statistics.collect()

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
        if calls is None:
            return False
        self.follow_parameters()
        return self.statistics.update(fisher_loss, calls)

    # ------------------------------------------------------------------ curvature
    @th.no_grad()
    def update_curvature(self) -> None:
        """Recompute the curvature of all factors now (a background computation in flight is discarded)."""
        self.background.discard()
        self.follow_parameters()
        job = self._curvature_job(snapshot=False)
        job.compute(self._block_damping(), self.kfac_low_rank)
        self._apply(job, self.counters.stats_updates)

    def _curvature_job(self, snapshot: bool) -> CurvatureJob:
        factors = self.statistics.factors
        return CurvatureJob([(b, factors[b], self.curvature[b]) for b in self.blocks if b in factors], snapshot)

    def _apply(self, job: CurvatureJob, stats_updates: int) -> None:
        curvature, failures = job.apply()
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

    def _solve(self, groups: list[GroupBuffers]) -> set[KFACBlock]:
        """Directions from the staged gradients; the blocks that were solved."""
        if self._factors_stale:
            self.solver.restack(groups, self.curvature, self._block_damping())
            self._factors_stale = False
        # a curvature of the current factors solves exactly: refine only when statistics came after it
        refine = self.schedule.statistics_newer_than_curvature
        return self.solver.solve(groups, self.curvature, self.statistics.factors, self._block_damping(), refine)

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
            raise ValueError(f"`params` and `vectors` differ in length ({len(params)} vs {len(vectors)})")
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
                self.background.submit(
                    self._curvature_job(snapshot=True), self._block_damping(), self.kfac_low_rank, self.counters.stats_updates
                )
            else:
                self.update_curvature()

        weight_decay = self.param_groups[0]["weight_decay"]
        present = [[i for i, grad in enumerate(group_grads) if grad is not None] for group_grads in grads]
        for group, group_grads, indices in zip(groups, grads, present):
            group.stage(group_grads)
            if weight_decay > 0 and indices:
                views, params = [group.gradient_views[i] for i in indices], [group.params[i] for i in indices]
                th._foreach_add_(views, params, alpha=weight_decay)
        cold = self.schedule.cold
        if cold:
            norm = th.linalg.vector_norm(th.stack([group.gradient.norm() for group in groups]))
            clip = min(1.0, self.kfac_cold_max_grad_norm / (float(norm) + 1e-6))
            for group in groups:
                th.mul(group.gradient, clip, out=group.direction)
        else:
            self._solve(groups)
        self._trust_region(groups, cold)
        if not all(math.isfinite(x) for x in self.last_vfv + self.last_nu):
            self.counters.skipped_steps += 1
            return None
        if refresh_curvature:
            self.counters.updates += 1
        return Preconditioned(groups, present, list(self.last_nu))

    def _trust_region(self, groups: list[GroupBuffers], cold: bool) -> None:
        """
        ν per group from the quadratic model of the KL of the step, ``lr² Vᵀ F V = lr² Vᵀ ∇`` (``V = F⁻¹ ∇`` in blocks;
        ``F = I`` for the raw gradients outside blocks and for all of a cold step, which has no trust region: ν = 1).
        """
        terms = th.stack([th.dot(g.direction, g.direction if cold else g.gradient) for g in groups]).tolist()
        self.last_vfv, self.last_nu = [], []
        for param_group, term in zip(self.param_groups, terms):
            vfv = param_group["lr"] ** 2 * term
            self.last_vfv.append(vfv)
            self.last_nu.append(1.0 if cold or not vfv > 0 else min(1.0, math.sqrt(param_group["kfac_clip"] / vfv)))

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
        Convert the factors and curvature of the groups whose parameters changed dtype or device (e.g. ``model.double()``
        after some steps); the flat buffers are rebuilt at the next use.
        """
        kinds = current_kinds(self.param_groups)
        known = self._group_kinds + kinds[len(self._group_kinds) :]  # groups added later start with their own
        if kinds == known:
            self._group_kinds = known
            return
        kinds = [group_kind(group["params"]) for group in self.param_groups]
        self.join_decomposition()  # its decompositions are converted with the rest
        factors = self.statistics.factors
        for block in self.blocks:
            dtype, device = kind = kinds[self.block_groups[block]]
            if kind == known[self.block_groups[block]]:
                continue
            if block in factors:
                factors[block] = KroneckerFactors(*(t.to(device=device, dtype=dtype) for t in (factors[block].a, factors[block].g)))
            self.curvature[block] = self.curvature[block].to(dtype, device)
        self._group_kinds = kinds
        self._buffers = None

    def state_entries(self) -> Iterator[tuple[KFACBlock, dict[str, th.Tensor]]]:
        """Per block with state: its factors and decompositions under the keys of the saved format (:data:`STATE_KEYS`)."""
        for block in self.blocks:
            factors = self.statistics.factors.get(block)
            entries = {} if factors is None else {"A": factors.a, "G": factors.g}
            entries.update(self.curvature[block].entries())
            if entries:
                yield block, entries

    def load_state_entries(self, entries: dict[KFACBlock, dict[str, th.Tensor]], counters: dict[str, int] | None) -> None:
        """
        Replace all statistics and curvature (a background computation in flight is discarded).

        :param entries: per block, as given by :meth:`state_entries` (already in the parameters' dtype and device)
        :param counters: saved :class:`KFACCounters`, if any
        """
        self.background.discard()
        self.statistics.factors = {b: KroneckerFactors(e["A"], e["G"]) for b, e in entries.items() if "A" in e and "G" in e}
        self.curvature = {block: self._curvature_type(block).from_entries(entries.get(block, {})) for block in self.blocks}
        if counters is not None:
            self.counters.load(counters)
        self._buffers = None
        self._factors_stale = True
        self._group_kinds = [group_kind(group["params"]) for group in self.param_groups]
