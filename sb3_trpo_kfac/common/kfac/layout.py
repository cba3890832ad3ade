"""
Flat buffers of a parameter group: gradients, directions (and a step rule's state) as flat tensors of one layout,
the block matrices ``W̄`` of same-shape blocks batch by batch, then the parameters outside blocks. Each parameter has
a view into each, so a step copies the gradients in with one call and same-shape blocks are solved together.
"""

import dataclasses

import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock


@dataclasses.dataclass
class SolveBatch:
    """Same-shape blocks of one parameter group, consecutive in its flat buffers, solved together."""

    blocks: list[KFACBlock]
    gradients: th.Tensor  # (blocks, out, in + 1) view of GroupBuffers.gradient
    directions: th.Tensor  # the same view of GroupBuffers.direction
    # stacked solve factors of the last curvature update (see BlockCurvature.stack); None: block by block
    factors: tuple[th.Tensor, ...] | None = None


class GroupLayout:
    """
    Where each parameter of a group lives in its flat buffers.

    :param params: the group's parameters
    :param blocks: the group's blocks (their parameters are among ``params``)
    """

    def __init__(self, params: list[nn.Parameter], blocks: list[KFACBlock]) -> None:
        self.params = params
        by_shape: dict[tuple[int, int], list[KFACBlock]] = {}
        for block in blocks:
            by_shape.setdefault(block.matrix_shape, []).append(block)
        self.shapes = list(by_shape.items())
        in_blocks = {id(p) for block in blocks for p in block.params}
        self.raw = [p for p in params if id(p) not in in_blocks]
        # flat offset of the parameters outside blocks
        self.raw_start = sum(len(same) * rows * cols for (rows, cols), same in self.shapes)
        self.size = self.raw_start + sum(p.numel() for p in self.raw)

    def zeros(self) -> th.Tensor:
        return th.zeros(self.size, dtype=self.params[0].dtype, device=self.params[0].device)

    def views(self, flat: th.Tensor) -> tuple[list[th.Tensor], list[th.Tensor]]:
        """
        :param flat: a flat buffer of this layout
        :return: its view per parameter (in the order of ``params``) and its ``(blocks, out, in + 1)`` view per batch
        """
        views: dict[int, th.Tensor] = {}
        mats, offset = [], 0
        for (rows, cols), blocks in self.shapes:
            end = offset + len(blocks) * rows * cols
            mat = flat[offset:end].view(len(blocks), rows, cols)
            for position, block in enumerate(blocks):
                weight, bias = block.from_matrix(mat[position])
                views[id(block.weight)] = weight
                if block.bias is not None:
                    views[id(block.bias)] = bias  # type: ignore[assignment]
            mats.append(mat)
            offset = end
        for p in self.raw:
            views[id(p)] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return [views[id(p)] for p in self.params], mats


class GroupBuffers:
    """A group's layout with its gradient and direction buffers."""

    def __init__(self, layout: GroupLayout) -> None:
        self.layout = layout
        self.params = layout.params
        self.raw_start = layout.raw_start
        self.gradient, self.direction = layout.zeros(), layout.zeros()
        self.gradient_views, gradient_mats = layout.views(self.gradient)
        self.direction_views, direction_mats = layout.views(self.direction)
        self.batches = [
            SolveBatch(blocks, gradients, directions)
            for (_, blocks), gradients, directions in zip(layout.shapes, gradient_mats, direction_mats)
        ]

    def stage(self, tensors: list[th.Tensor | None]) -> None:
        """Copy per-parameter tensors (None: zeros) into the gradient buffer."""
        given = [(view, tensor) for view, tensor in zip(self.gradient_views, tensors) if tensor is not None]
        if len(given) < len(tensors):
            self.gradient.zero_()
        if given:
            # torch's private _foreach kernels: one call for all parameters, whatever the layer count
            th._foreach_copy_([view for view, _ in given], [tensor for _, tensor in given])
