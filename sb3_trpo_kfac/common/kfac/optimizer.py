"""
:class:`KFAC`: the K-FAC preconditioner and a first-order step rule as one ``torch.optim.Optimizer``, so that saving
the optimizer's state (as SB3 does with ``policy.optimizer``) carries the factors, the curvature, the counters and the
step rule's state alike.
"""

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.preconditioner import KFACPreconditioner
from sb3_trpo_kfac.common.kfac.renamed import renamed_keywords
from sb3_trpo_kfac.common.kfac.schedule import KFACCounters
from sb3_trpo_kfac.common.kfac.state import STATE_KEYS
from sb3_trpo_kfac.common.kfac.step_rules import MomentumRule, OptimizerRule, check_group_momentum, check_step_rule
from sb3_trpo_kfac.common.validation import ArgumentError

# keywords of KFAC renamed so that each knob has one name across the package (old name -> new name)
RENAMED = {
    "damping": "kfac_damping",
    "stats_decay": "kfac_stats_decay",
    "cold_iter": "kfac_cold_iter",
    "cold_max_grad_norm": "kfac_cold_max_grad_norm",
    "inverse": "kfac_inverse",
    "low_rank": "kfac_low_rank",
    "low_rank_min_dim": "kfac_low_rank_min_dim",
    "async_decomposition": "kfac_async",
    "refine_iterations": "kfac_refine",
}


class KFAC(th.optim.Optimizer):
    """
    K-FAC natural-gradient optimizer with ACKTR's trust region: a :class:`KFACPreconditioner` (every ``kfac_*`` knob,
    see there) followed by a first-order step rule.

    The default step rule is the paper's momentum SGD (the form of OpenAI baselines' ``KfacOptimizer``):
    ``buf ← momentum * buf + ν V``, ``p ← p − lr (1 − momentum) buf``, with ``V`` the preconditioned gradient and ν its
    trust-region scale. With ``optimizer_class`` (e.g. ``torch.optim.Adam``) that optimizer steps instead, on
    ``.grad ← ν V``. A cold-start step (``kfac_cold_iter``) hands the clipped gradient to the step rule (ν = 1): with
    the default rule it moves ``lr (1 − momentum) clip(∇)`` from rest. OpenAI baselines' ``KfacOptimizer`` runs its
    cold steps with momentum at ``cold_lr`` (by default the learning rate) without the ``(1 − momentum)`` factor, so at
    ``momentum = 0.9`` they are about 10x ours; its continuous-control ACKTR passes ``cold_lr = lr (1 − 0.9)``, which
    matches ours.

    Statistics: call the model inside :meth:`collect`, then :meth:`update_statistics` with a sum-reduced *sampled*
    negative log-likelihood (the Fisher loss) before :meth:`step`. Each parameter group is its own trust region, with
    its own ``lr``, ``kfac_clip`` (and ``momentum``); ``counters``, ``last_nu`` and ``last_vfv`` are the
    preconditioner's.

    :param model: the module whose ``nn.Linear`` / ``nn.Conv2d`` layers get K-FAC blocks
    :param lr: learning rate η (also the scale in the trust region; change it via ``param_groups`` as usual)
    :param momentum: momentum ``m`` of the default step rule (0.9 if not given); not with ``optimizer_class``
    :param kfac_clip: trust-region radius κ on ``lr² Vᵀ F V``
    :param kfac_damping: Tikhonov damping λ
    :param kfac_stats_decay: running-average factor of the Kronecker factors, per step
    :param kfac_stats_interval: steps between the caller's statistics updates (each decays by ``kfac_stats_decay``
        to this power)
    :param kfac_update: steps between curvature refreshes
    :param weight_decay: L2 coefficient added to the gradient before preconditioning (and to the blocks' damping)
    :param kfac_cold_iter: number of initial cold-start steps (clipped gradient, no preconditioning)
    :param kfac_cold_max_grad_norm: global gradient-norm clip of the cold-start steps
    :param kfac_inverse: ``"eigen"`` or ``"inverse"``
    :param kfac_low_rank: number of eigenpairs kept of input factors above ``kfac_low_rank_min_dim`` (None: all;
        ``"auto"``: 64 of each factor of the blocks with more than 2²⁰ parameters, see :class:`KFACPreconditioner`)
    :param kfac_low_rank_min_dim: smallest input-factor dimension that uses ``kfac_low_rank``
    :param kfac_async: compute the curvature in a background thread, one update late
    :param kfac_refine: CG iterations on the current factors when they are newer than the curvature
    :param kfac_stats_samples: statistics from at most this many random samples of each batch (None: all)
    :param kfac_split_decompositions: in a data-parallel run, each block's decompositions by one rank, broadcast
        (None: when they are expensive enough)
    :param modules: layers to cover (default: every ``nn.Linear`` / ``nn.Conv2d`` in ``model``)
    :param params: parameters (default: all of ``model``'s that require grad) or parameter groups
    :param optimizer_class: the step rule, a ``torch.optim.Optimizer`` class (None: the paper's momentum SGD)
    :param optimizer_kwargs: its keywords, except the learning rate
    :param renamed: keywords under their former names (``damping``, ``stats_decay``, ``cold_iter``,
        ``cold_max_grad_norm``, ``inverse``, ``low_rank``, ``low_rank_min_dim``, ``async_decomposition``,
        ``refine_iterations``), accepted with a DeprecationWarning
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.25,
        momentum: float | None = None,
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
        params: Iterable[Any] | None = None,
        optimizer_class: type[th.optim.Optimizer] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        **renamed: Any,
    ) -> None:
        knobs: dict[str, Any] = dict(
            kfac_clip=kfac_clip, kfac_damping=kfac_damping, kfac_stats_decay=kfac_stats_decay,
            kfac_stats_interval=kfac_stats_interval, kfac_update=kfac_update, kfac_cold_iter=kfac_cold_iter,
            kfac_cold_max_grad_norm=kfac_cold_max_grad_norm, kfac_inverse=kfac_inverse, kfac_low_rank=kfac_low_rank,
            kfac_low_rank_min_dim=kfac_low_rank_min_dim, kfac_async=kfac_async, kfac_refine=kfac_refine,
            kfac_stats_samples=kfac_stats_samples,
            kfac_split_decompositions=kfac_split_decompositions,
        )  # fmt: skip
        defaults = {name: parameter.default for name, parameter in inspect.signature(KFAC.__init__).parameters.items()}
        knobs.update(renamed_keywords("KFAC", renamed, RENAMED, {k: (v, defaults[k]) for k, v in knobs.items()}))
        momentum = check_step_rule(momentum, optimizer_class, optimizer_kwargs)
        # the preconditioner checks the K-FAC knobs and makes the parameter groups, which torch's Optimizer adopts
        self.preconditioner = KFACPreconditioner(
            model, params, lr=lr, weight_decay=weight_decay, modules=modules, **knobs
        )
        group_defaults: dict[str, Any] = dict(self.preconditioner.group_defaults)
        if optimizer_class is None:
            check_group_momentum(self.preconditioner.param_groups)
            group_defaults["momentum"] = momentum
        super().__init__(self.preconditioner.param_groups, group_defaults)
        self.preconditioner.param_groups = self.param_groups  # one list: lr updates and added groups reach it
        self._step_rule: MomentumRule | OptimizerRule
        if optimizer_class is None:
            self._step_rule = MomentumRule(self)
        else:
            self._step_rule = OptimizerRule(optimizer_class, optimizer_kwargs or {}, self)

    # ------------------------------------------------------------------ the preconditioner's interface
    @property
    def blocks(self) -> list[KFACBlock]:
        return self.preconditioner.blocks

    @property
    def counters(self) -> KFACCounters:
        return self.preconditioner.counters

    @property
    def last_nu(self) -> list[float]:
        """Trust-region scale ν of the last step, per parameter group."""
        return self.preconditioner.last_nu

    @property
    def last_vfv(self) -> list[float]:
        """``lr² Vᵀ F V`` of the last step's preconditioned direction (before ν and momentum), per parameter group."""
        return self.preconditioner.last_vfv

    def collect(self) -> contextlib.AbstractContextManager[None]:
        """Context in which forward passes of covered layers are saved for :meth:`update_statistics`."""
        return self.preconditioner.collect()

    def capture_gradient_rows(self) -> contextlib.AbstractContextManager[None]:
        """See :meth:`KFACPreconditioner.capture_gradient_rows`."""
        return self.preconditioner.capture_gradient_rows()

    def update_statistics(self, fisher_loss: th.Tensor) -> bool:
        """See :meth:`KFACPreconditioner.update_statistics`."""
        return self.preconditioner.update_statistics(fisher_loss)

    def update_curvature(self) -> None:
        """Recompute the curvature of all factors now (see :meth:`KFACPreconditioner.update_curvature`)."""
        self.preconditioner.update_curvature()

    def precondition(self, params: list[nn.Parameter], vectors: list[th.Tensor]) -> list[th.Tensor]:
        """See :meth:`KFACPreconditioner.precondition`."""
        return self.preconditioner.precondition(params, vectors)

    def remove_hooks(self) -> None:
        """Stop saving forwards in :meth:`collect` for good."""
        self.preconditioner.remove_hooks()

    # ------------------------------------------------------------------ step
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        step_rule = getattr(self, "_step_rule", None)  # absent while torch's __init__ adds the first groups
        if isinstance(step_rule, OptimizerRule):
            step_rule.add_group(self.param_groups[-1])

    @th.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, refresh_curvature: bool = True
    ) -> float | None:
        """
        One K-FAC (or cold-start) step from the gradients in ``.grad``. A step whose preconditioned gradient or
        trust-region scale is not finite changes nothing (``counters["skipped_steps"]``).

        :param closure: optional closure re-evaluating the loss (and its gradients)
        :param refresh_curvature: False for a further step on the statistics of the previous one (e.g. ACKTR's
            extra critic steps), see :meth:`KFACPreconditioner.precondition_gradients`
        :return: the closure's loss, if any
        """
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        result = self.preconditioner.precondition_gradients(refresh_curvature)
        if result is not None:
            self._step_rule.apply(result)
        return loss

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """
        torch's format: per parameter, the step rule's state and (for a block's weight) the block's factors and
        decompositions; param groups; ``kfac_counters``; with ``optimizer_class``, its state under ``step_rule``.
        """
        # the saved state is then the one the next step would use; split decompositions are exchanged by all ranks
        # at their next step instead (rank 0 may save alone, and the exchange is collective)
        if not self.preconditioner.splits_decompositions:
            self.preconditioner.join_decomposition()
        state_dict = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for block, entries in self.preconditioner.state_entries():
            i = index[id(block.weight)]
            state_dict["state"][i] = {**state_dict["state"].get(i, {}), **entries}  # not into the live state dicts
        state_dict["kfac_counters"] = self.counters.as_dict()
        if isinstance(self._step_rule, OptimizerRule):
            state_dict["step_rule"] = self._step_rule.optimizer.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """
        :param state_dict: as returned by :meth:`state_dict`, with the same step rule
        """
        self.preconditioner.background.discard()  # computed from the factors being replaced
        has_step_rule = isinstance(self._step_rule, OptimizerRule)
        if ("step_rule" in state_dict) != has_step_rule:
            saved, ours = (
                ("an optimizer_class", "the default") if not has_step_rule else ("the default", "an optimizer_class")
            )
            raise ArgumentError(f"`state_dict` was saved with {saved} step rule, this KFAC has {ours} one")
        # a copy: torch's loader keeps the given tensors, which the optimizer they came from may update in place
        state_dict = copy.deepcopy(state_dict)
        counters = state_dict.pop("kfac_counters", None)
        step_rule_state = state_dict.pop("step_rule", None)
        super().load_state_dict(state_dict)  # converts every state tensor to its parameter's dtype and device
        for group in self.param_groups:
            group.setdefault("kfac_clip", self.preconditioner.kfac_clip)  # saved before groups had their own radius
        self.preconditioner.param_groups = self.param_groups
        entries = {}
        for block in self.blocks:
            state = self.state.get(block.weight, {})
            entries[block] = {key: state.pop(key) for key in STATE_KEYS if key in state}
            if not state:
                self.state.pop(block.weight, None)
        self.preconditioner.load_state_entries(entries, counters)
        if step_rule_state is not None:
            self._step_rule.optimizer.load_state_dict(step_rule_state)  # type: ignore[union-attr]

    def update_preconditioner(self) -> None:
        """Deprecated name of :meth:`update_curvature`."""
        warnings.warn(
            "KFAC.update_preconditioner is deprecated, use update_curvature", DeprecationWarning, stacklevel=2
        )
        self.update_curvature()
