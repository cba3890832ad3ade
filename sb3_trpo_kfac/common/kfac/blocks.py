"""
K-FAC layer blocks: the parameters one Kronecker-factored block covers, and the rows ``ā`` and ``δ`` a call of its
layer contributes to the factors.

A block's parameters form the matrix ``W̄ = [W.view(out, -1), b]`` (``out x (in + 1)``, ``out x in`` without a
bias). The rows a layer sees for one sample are its *locations* (a Conv2d's output positions, the positions of a
Linear applied to ``(N, T, in)`` inputs); the statistics (:mod:`.statistics`) treat all kinds alike from these rows.
"""

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import cast

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac.products import WIDE_OUTPUT, symmetric_gram, wide_mm
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError


class KFACBlock(ABC):
    """
    One Kronecker-factored block: the weight (and bias) of a layer, treated jointly as the matrix ``W̄``. Modules that
    share the weight and the bias (tied weights) are one block: each forward of any of them adds locations.

    :param name: qualified module name(s) (for messages)
    :param module: the layer
    :param tied: further layers of the same kind that use the same weight and bias
    """

    def __init__(self, name: str, module: nn.Module, tied: Sequence[nn.Module] = ()) -> None:
        self.name = name
        self.module = module
        self.modules = [module, *tied]
        self.weight = cast(nn.Parameter, module.weight)
        bias = cast(nn.Parameter | None, module.bias)
        self.bias = bias if bias is not None and bias.requires_grad else None

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        """Why a layer of this kind cannot be a block (it then keeps its raw gradient), or None."""
        return None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape ``out x (in + 1)`` of ``W̄`` (``out x in`` without a bias)."""
        rows = self.weight.shape[0]
        return rows, self.weight.numel() // rows + int(self.bias is not None)

    def from_matrix(self, mat: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Views of a block matrix's weight part (in the weight's shape) and bias column."""
        weight_part = mat if self.bias is None else mat[:, :-1]
        # a view always (a reshape could copy); for a Linear the shape is already the weight's
        return weight_part.view(self.weight.shape), None if self.bias is None else mat[:, -1]

    def batched(self, x: th.Tensor) -> bool:
        """Whether a call's input has a leading sample dimension."""
        return x.dim() > 1

    def input_moment(self, rows: th.Tensor, spares: list[th.Tensor] | None = None) -> th.Tensor:
        """
        ``Σ ā āᵀ`` over the rows, ``ā = [a, 1]`` if the block has a bias. A spare of the result's size (from
        ``spares``, taken out of the list) is written into rather than allocating: a fresh large result costs page
        faults comparable to the product itself.
        """
        if self.bias is not None:
            rows = F.pad(rows, (0, 1), value=1.0)
        size = rows.shape[1]
        out = _take_spare(spares, (size, size), rows) if spares else None
        if size * size < WIDE_OUTPUT:
            return rows.T @ rows if out is None else th.mm(rows.T, rows, out=out)
        return wide_mm(rows.T.contiguous(), rows, rows.new_empty(size, size) if out is None else out)

    @abstractmethod
    def call_moments(
        self,
        module: nn.Module,
        x: th.Tensor,
        delta: th.Tensor,
        shared: dict[tuple[object, ...], th.Tensor],
        spares: list[th.Tensor] | None = None,
    ) -> tuple[th.Tensor, th.Tensor, int, int]:
        """
        One call's contribution to the factors.

        :param module: the layer that was called (tied layers may differ in stride, padding, ...)
        :param x: its input
        :param delta: the Fisher loss's gradient with respect to its output
        :param shared: input moments already computed for this statistics update (blocks fed the same input)
        :param spares: tensors the input moment may be written into (see :meth:`input_moment`)
        :return: ``Σ ā āᵀ`` and ``Σ δ δᵀ`` over the call's rows, the number of rows and the number of samples
        """


class LinearBlock(KFACBlock):
    """An ``nn.Linear``: its rows are the last dimension of its input (the leading ones are samples x locations)."""

    def call_moments(
        self,
        module: nn.Module,
        x: th.Tensor,
        delta: th.Tensor,
        shared: dict[tuple[object, ...], th.Tensor],
        spares: list[th.Tensor] | None = None,
    ) -> tuple[th.Tensor, th.Tensor, int, int]:
        # the same input tensor (e.g. features fed to both the policy and the value network) gives the same moment;
        # the version counter tells an in-place change apart (no public API exposes it)
        key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), self.bias is not None)
        a_sum = shared.get(key)
        if a_sum is None:
            a_sum = shared[key] = self.input_moment(x.reshape(-1, x.shape[-1]), spares)
        deltas = delta.reshape(-1, delta.shape[-1])
        return a_sum, deltas.T @ deltas, deltas.shape[0], x.shape[0] if x.dim() > 1 else 1


class Conv2dBlock(KFACBlock):
    """An ``nn.Conv2d`` (KFC, Grosse & Martens 2016): one row per sample and output position, ``ā`` its patch."""

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if conv.groups != 1:
            return f"is a grouped convolution (groups={conv.groups})"
        if conv.padding == "same":
            return "uses padding='same'"
        return None

    def batched(self, x: th.Tensor) -> bool:
        return x.dim() == 4

    @staticmethod
    def patches(conv: nn.Conv2d, x: th.Tensor) -> th.Tensor:
        """The inputs ``x`` (N, C, H, W) as rows ``a`` (one per sample and output position), without the 1."""
        return Conv2dBlock.patch_matrix(conv, x).T

    @staticmethod
    def patch_matrix(conv: nn.Conv2d, x: th.Tensor) -> th.Tensor:
        """
        The rows of :meth:`patches` as the columns of one ``(C·kh·kw, N·positions)`` matrix: one copy of strided
        windows of ``x`` (the values of ``F.unfold``, whose own copy is slower and needs a transposed one here).
        """
        # a string is "valid" here ("same" is not covered)
        pad_h, pad_w = (0, 0) if isinstance(conv.padding, str) else conv.padding
        if pad_h or pad_w:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=mode)
        (kernel_h, kernel_w), (dilation_h, dilation_w) = conv.kernel_size, conv.dilation
        stride_h, stride_w = conv.stride
        # (N, C, out_h, out_w, span_h, span_w), then every dilation-th entry of each window's span
        windows = x.unfold(2, (kernel_h - 1) * dilation_h + 1, stride_h).unfold(3, (kernel_w - 1) * dilation_w + 1, stride_w)
        windows = windows[..., ::dilation_h, ::dilation_w]
        # rows ordered as weight.view(out, -1): (channel, kernel row, kernel column); columns (sample, position)
        return windows.permute(1, 4, 5, 0, 2, 3).reshape(-1, x.shape[0] * windows.shape[2] * windows.shape[3])

    def patch_moment(self, patches: th.Tensor) -> th.Tensor:
        """
        :meth:`input_moment` of the patches, from :meth:`patch_matrix`: one triangle of the symmetric product, and no
        column of ones (its part is the row sums).
        """
        dim, rows = patches.shape
        size = dim + int(self.bias is not None)
        out = patches.new_empty(size, size)
        symmetric_gram(patches, out[:dim, :dim])
        if self.bias is not None:
            sums = patches.sum(1)
            out[:dim, dim] = sums
            out[dim, :dim] = sums
            out[dim, dim] = rows
        return out

    def call_moments(
        self,
        module: nn.Module,
        x: th.Tensor,
        delta: th.Tensor,
        shared: dict[tuple[object, ...], th.Tensor],
        spares: list[th.Tensor] | None = None,
    ) -> tuple[th.Tensor, th.Tensor, int, int]:
        if x.dim() == 3:  # unbatched: one sample
            x, delta = x.unsqueeze(0), delta.unsqueeze(0)
        a_sum = self.patch_moment(self.patch_matrix(module, x))  # type: ignore[arg-type]
        deltas = delta.transpose(1, -1).reshape(-1, delta.shape[1])  # (N*T, out), any spatial order
        return a_sum, deltas.T @ deltas, deltas.shape[0], x.shape[0]


def _take_spare(spares: list[th.Tensor], shape: tuple[int, int], like: th.Tensor) -> th.Tensor | None:
    """A tensor of ``spares`` with this shape and ``like``'s dtype and device, removed from the list; or None."""
    for i, spare in enumerate(spares):
        if spare.shape == shape and spare.dtype == like.dtype and spare.device == like.device:
            return spares.pop(i)
    return None


# the layer kinds K-FAC covers, and their blocks
BLOCK_TYPES: dict[type[nn.Module], type[KFACBlock]] = {nn.Linear: LinearBlock, nn.Conv2d: Conv2dBlock}


def block_type(module: nn.Module) -> type[KFACBlock] | None:
    """The block class of a layer (subclasses included), or None if K-FAC does not cover its kind."""
    return next((block for kind, block in BLOCK_TYPES.items() if isinstance(module, kind)), None)


def make_blocks(model: nn.Module, modules: Iterable[nn.Module] | None, param_ids: set[int]) -> list[KFACBlock]:
    """
    The blocks of ``model``: one per covered weight (tied modules share it), refusing a model in which a block's
    parameter has a use the block does not see.

    :param model: the model (for names and for finding every use of a parameter)
    :param modules: the layers to cover (default: every layer of a covered kind)
    :param param_ids: ids of the optimized parameters; a layer whose weight is not among them is not covered
    """
    names = {id(module): name for name, module in model.named_modules()}
    if modules is None:
        candidates = [m for m in model.modules() if block_type(m) is not None]
    else:
        candidates = list(modules)
        for module in candidates:
            if block_type(module) is None:
                raise ArgumentTypeError(
                    f"`modules`: K-FAC blocks exist for nn.Linear and nn.Conv2d, got {type(module).__name__}"
                )
    # covered modules by weight: modules that share a weight (tied weights) make one block
    by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
    seen: set[int] = set()
    for module in candidates:
        if id(module) in seen or id(module.weight) not in param_ids or not module.weight.requires_grad:
            continue
        seen.add(id(module))
        name = names.get(id(module), type(module).__name__)
        reason = block_type(module).unsupported(module)  # type: ignore[union-attr]
        if reason is not None:
            warnings.warn(f"KFAC: {name} {reason}; it keeps its raw gradient")
            continue
        if module.bias is not None and module.bias.requires_grad and id(module.bias) not in param_ids:
            warnings.warn(f"KFAC: the bias of {name} is not optimized; the layer keeps its raw gradient")
            continue
        by_weight.setdefault(id(module.weight), []).append((name, module))

    def trained_bias(layer: nn.Module) -> object:
        return layer.bias if layer.bias is not None and layer.bias.requires_grad else None

    blocks = []
    for uses in by_weight.values():
        (name, first), *others = uses
        for other_name, other in others:
            # the calls of tied modules are extra locations of one block only if W̄ = [W, b] is the same matrix
            if type(other) is not type(first) or trained_bias(other) is not trained_bias(first):
                raise ArgumentError(
                    f"`model`: {name} and {other_name} share their weight but not their bias (or are of different "
                    "kinds); K-FAC needs one block per parameter, fed by all its uses (tie the biases too, or leave "
                    "the weight out of `params`)"
                )
        label = name if not others else ", ".join([name, *(other_name for other_name, _ in others)])
        blocks.append(block_type(first)(label, first, [other for _, other in others]))  # type: ignore[misc]
    _refuse_uses_outside_blocks(model, blocks)
    return blocks


def _refuse_uses_outside_blocks(model: nn.Module, blocks: list[KFACBlock]) -> None:
    """
    A block parameter used anywhere else (e.g. an nn.Embedding tied to an output layer, a skipped layer, a bias shared
    by layers with different weights) would get a gradient its block's statistics do not cover: refuse it.
    """
    owner: dict[int, KFACBlock] = {}
    for new_block in blocks:
        for param in new_block.params:
            known = owner.setdefault(id(param), new_block)
            if known is not new_block:
                raise ArgumentError(
                    f"`model`: {known.name} and {new_block.name} share their bias but not their weight; K-FAC needs "
                    "one block per parameter (tie the weights too, or leave the bias out of `params`)"
                )
    for module_name, user in model.named_modules():
        for attr, tensor in user.named_parameters(recurse=False, remove_duplicate=False):
            block = owner.get(id(tensor))
            if block is None:
                continue
            role = "weight" if tensor is block.weight else "bias"
            if attr != role or not any(user is m for m in block.modules):
                use = f"{module_name}.{attr}" if module_name else attr
                raise ArgumentError(
                    f"`model`: the {role} of {block.name} is also used as {use}, which K-FAC does not cover; a "
                    "parameter's block must see all its uses (cover that module too, or leave the parameter out "
                    "of `params`)"
                )
