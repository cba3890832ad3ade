"""
Parameter groups of K-FAC: each is one trust region (its own ``lr`` and ``kfac_clip``) and one flat layout. A layer's
weight and bias share a group; ``weight_decay`` is common to all groups (it enters the blocks' damping).
"""

from collections.abc import Iterable
from typing import Any

import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock, make_blocks
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError, check_float


def parameter_groups(params: Iterable[Any], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The groups of ``params`` (parameters, or dicts with a ``"params"`` entry), keeping the parameters that require
    grad, each once; groups left empty are dropped.

    :param params: parameters or parameter groups
    :param defaults: the settings of a group that does not give its own
    :return: new group dicts
    """
    items = list(params)
    as_groups = [isinstance(item, dict) for item in items]
    if any(as_groups) and not (all(as_groups) and all("params" in item for item in items)):
        raise ArgumentTypeError(
            "`params` must be parameters or parameter groups (dicts with a 'params' entry), not a mix"
        )
    groups = [dict(item) for item in items] if any(as_groups) else [{"params": items}]
    seen: set[int] = set()
    for group in groups:
        if "weight_decay" in group:
            raise ArgumentError("`params`: weight_decay is common to all groups (it enters the blocks' damping)")
        if "lr" in group:
            check_float("params[...]['lr']", group["lr"], 0.0)
        if "kfac_clip" in group:
            check_float("params[...]['kfac_clip']", group["kfac_clip"], 0.0, low_inclusive=False)
        tensors = [group["params"]] if isinstance(group["params"], th.Tensor) else list(group["params"])
        unique = list({id(p): p for p in tensors if p.requires_grad}.values())
        if unique:
            group_kind(unique)
        if any(id(p) in seen for p in unique):
            raise ArgumentError("`params`: a parameter appears in more than one group")
        seen.update(id(p) for p in unique)
        group["params"] = unique
        for name, default in defaults.items():
            group.setdefault(name, default)
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ArgumentError("`params`: no parameter requires grad")
    return groups


def group_kind(params: Iterable[th.Tensor]) -> tuple[th.dtype, th.device]:
    """The one (dtype, device) of a parameter group's parameters (a TypeError if they differ)."""
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:  # a group's gradients and directions live in one flat tensor of each
        kinds_text = ", ".join(sorted(f"{dtype} on {device}" for dtype, device in kinds))
        raise ArgumentTypeError(
            f"`params`: the parameters of a group must share one dtype and device, got {kinds_text}"
        )
    return next(iter(kinds))


def current_kinds(param_groups: list[dict[str, Any]]) -> list[tuple[th.dtype, th.device]]:
    """The (dtype, device) of each group's first parameter; a TypeError if a group's parameters mix dtypes."""
    kinds = []
    for group in param_groups:
        params = group["params"]
        # every dtype: a mixed group would be cast silently into the flat buffers (a device mismatch raises there)
        if len({p.dtype for p in params}) > 1:
            group_kind(params)  # raises, naming the dtypes
        kinds.append((params[0].dtype, params[0].device))
    return kinds


def block_groups(
    model: nn.Module, modules: Iterable[nn.Module] | None, param_groups: list[dict[str, Any]]
) -> tuple[list[KFACBlock], dict[KFACBlock, int]]:
    """
    :param model: the model
    :param modules: the layers to cover (None: all that K-FAC can)
    :param param_groups: the parameter groups
    :return: the blocks of the optimized parameters, and the group of each
    """
    group_of = {id(p): index for index, group in enumerate(param_groups) for p in group["params"]}
    blocks = make_blocks(model, modules, set(group_of))
    for block in blocks:
        if (
            block.bias is not None
            and group_of.get(id(block.bias), group_of[id(block.weight)]) != group_of[id(block.weight)]
        ):
            raise ArgumentError(f"`params`: the weight and bias of {block.name} are in different parameter groups")
    return blocks, {block: group_of[id(block.weight)] for block in blocks}
