"""
First-order step rules: how the preconditioner's directions move the parameters. The paper's momentum SGD works on the
flat direction buffers; any ``torch.optim.Optimizer`` steps on ``.grad ← ν V``.
"""

from typing import Any

import torch as th

from sb3_trpo_kfac.common.kfac.layout import GroupBuffers
from sb3_trpo_kfac.common.kfac.options import check_momentum
from sb3_trpo_kfac.common.kfac.trust_region import Preconditioned
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError, check_float

# keys of KFAC's parameter groups that are not a torch step rule's (it gets the others, e.g. Adam's "betas")
GROUP_KEYS = ("params", "lr", "weight_decay", "kfac_clip", "momentum")


class MomentumRule:
    """
    The paper's step (OpenAI baselines' ``KfacOptimizer``): ``buf ← m buf + ν V``, ``p ← p − lr (1 − m) buf`` per
    parameter group. A group's buffers (``state[p]["momentum_buffer"]``) are views of one flat tensor in the layout of
    the preconditioner's buffers, so the update is two calls whatever the layer count; ν enters the fused add.
    """

    def __init__(self, optimizer: th.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # per group: the preconditioner buffers its momentum was laid out for, its flat momentum and its views
        self._momentum: list[tuple[GroupBuffers, th.Tensor, list[th.Tensor]]] = []

    def _buffers(self, index: int, group: GroupBuffers) -> tuple[th.Tensor, list[th.Tensor]]:
        """A group's flat momentum (rebuilt with its layout; momentum buffers it already has, e.g. loaded, move in)."""
        if index < len(self._momentum) and self._momentum[index][0] is group:
            return self._momentum[index][1:]  # type: ignore[return-value]
        flat = group.layout.zeros()
        views, _ = group.layout.views(flat)
        for p, view in zip(group.params, views):
            state = self.optimizer.state[p]
            if "momentum_buffer" in state:
                view.copy_(state["momentum_buffer"])
            state["momentum_buffer"] = view
        self._momentum[index:] = [(group, flat, views)]
        return flat, views

    def apply(self, result: Preconditioned) -> None:
        for index, (param_group, group, indices, nu) in enumerate(
            zip(self.optimizer.param_groups, result.groups, result.present, result.nus)
        ):
            flat, views = self._buffers(index, group)
            params: list[th.Tensor]
            if len(indices) == len(group.params):  # the flat buffers at once
                params, momentum_views, momentum, directions = list(group.params), views, [flat], [group.direction]
            else:  # parameters without a gradient keep their momentum buffer and value
                if not indices:
                    continue
                params = [group.params[i] for i in indices]
                momentum = momentum_views = [views[i] for i in indices]
                directions = [group.direction_views[i] for i in indices]
            # torch's private _foreach kernels: one call per operation for all parameters, whatever the layer count
            th._foreach_mul_(momentum, param_group["momentum"])
            th._foreach_add_(momentum, directions, alpha=nu)
            th._foreach_add_(params, momentum_views, alpha=-param_group["lr"] * (1.0 - param_group["momentum"]))


class OptimizerRule:
    """
    A torch optimizer stepping on the preconditioned gradient: ``.grad ← ν V``, then its ``step()``. Its parameter
    groups mirror KFAC's (same parameters; ``lr`` follows KFAC's, which SB3's schedules set).

    :param optimizer_class: the optimizer (e.g. ``torch.optim.Adam``)
    :param optimizer_kwargs: its keywords, except the learning rate
    :param owner: the KFAC optimizer, whose parameter groups it mirrors (read at each step: loading replaces them)
    """

    def __init__(
        self,
        optimizer_class: type[th.optim.Optimizer],
        optimizer_kwargs: dict[str, Any],
        owner: th.optim.Optimizer,
    ) -> None:
        self.owner = owner
        self.optimizer = optimizer_class([self._mirror(group) for group in owner.param_groups], **optimizer_kwargs)

    @staticmethod
    def _mirror(group: dict[str, Any]) -> dict[str, Any]:
        return {"params": group["params"], "lr": group["lr"], **{k: v for k, v in group.items() if k not in GROUP_KEYS}}

    def add_group(self, group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(self._mirror(group))

    def apply(self, result: Preconditioned) -> None:
        for mirror, group in zip(self.optimizer.param_groups, self.owner.param_groups):
            mirror["lr"] = group["lr"]
        for p, state in self.optimizer.state.items():  # follow parameters that changed dtype or device
            for key, value in state.items():
                if key != "step" and isinstance(value, th.Tensor) and value.is_floating_point():
                    if value.dtype != p.dtype or value.device != p.device:
                        state[key] = value.to(device=p.device, dtype=p.dtype)
        result.write_gradients()
        self.optimizer.step()


def check_step_rule(
    momentum: float | None, optimizer_class: type[th.optim.Optimizer] | None, optimizer_kwargs: dict[str, Any] | None
) -> float | None:
    """
    :param momentum: the default rule's momentum (None: 0.9); not with ``optimizer_class``
    :param optimizer_class: a ``torch.optim.Optimizer`` class, or None for the default rule
    :param optimizer_kwargs: its keywords (only with ``optimizer_class``)
    :return: the default rule's momentum, or None with ``optimizer_class``
    """
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise ArgumentTypeError(f"`optimizer_kwargs` must be a dict, got {type(optimizer_kwargs).__name__}")
    if optimizer_class is None:
        if optimizer_kwargs:
            raise ArgumentError("`optimizer_kwargs` needs `optimizer_class` (the default step rule takes `momentum`)")
        return check_momentum(0.9 if momentum is None else momentum)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, th.optim.Optimizer)):
        raise ArgumentTypeError(f"`optimizer_class` must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if momentum is not None:
        raise ArgumentError(
            "`momentum` is the default step rule's; give `optimizer_class` its own in `optimizer_kwargs`"
        )
    return None


def check_group_momentum(param_groups: list[dict[str, Any]]) -> None:
    """Parameter groups of the default rule may set their own momentum, < 1 as the optimizer's."""
    for group in param_groups:
        if "momentum" in group:
            check_float("params[...]['momentum']", group["momentum"], 0.0, 1.0, high_inclusive=False)
