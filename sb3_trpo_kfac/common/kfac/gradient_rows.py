"""
Gradient rows: a Linear block's gradient over a batch is ``∇ = δᵀ ā`` (one row of ``δ`` and ``ā`` per sample and
location), of rank at most the number of rows ``n``. Kept as these rows, a low-rank solve of ``∇`` costs
``O(out · in · (rank + n))`` instead of ``O(out · in · 4 rank)`` (:meth:`.low_rank.TwoSidedLowRankEigenCurvature
.solve_rows_into`): the saving for a large layer at small batches (NatureCNN's 3136 -> 512 at 8 envs x 5 steps).

Only on request: inside :meth:`GradientRows.capture`, forward hooks save the layer's input and a hook on its output
keeps the gradient of the last backward through it. A solve uses the rows only after :func:`rows_scale` has checked,
on random probes, that the gradient it is given is a multiple of ``δᵀ ā`` (a clipped gradient is); anything else (a
gradient averaged over data-parallel ranks, weight decay, another backward) fails the check and takes the dense
solve.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock, LinearBlock

# relative mismatch on the probes above which a gradient is not taken to be a multiple of its rows
ROWS_TOLERANCE = 1e-4


class GradientRows:
    """
    The rows ``(δ, ā)`` of the last backward's gradient of some Linear blocks.

    :param blocks: the blocks whose rows are kept (other kinds are ignored)
    """

    def __init__(self, blocks: list[KFACBlock]) -> None:
        self.blocks = [block for block in blocks if isinstance(block, LinearBlock)]
        # per block, one [input, output gradient] per call of its layers
        self._calls: dict[KFACBlock, list[list[th.Tensor | None]]] = {}

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Context in which the forwards of the blocks' layers are saved, with the gradients that later reach them."""
        self._calls = {}
        hooks = [module.register_forward_hook(self._make_hook(block)) for block in self.blocks for module in block.modules]
        try:
            yield
        finally:
            for handle in hooks:
                handle.remove()

    def _make_hook(self, block: KFACBlock) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> None:
            if not (th.is_grad_enabled() and output.requires_grad):
                return
            call: list[th.Tensor | None] = [inputs[0].detach(), None]
            self._calls.setdefault(block, []).append(call)

            def keep(grad: th.Tensor) -> None:
                call[1] = grad  # the last backward through the output wins (e.g. the loss's after the Fisher loss's)

            output.register_hook(keep)

        return hook

    def take(self) -> dict[KFACBlock, tuple[th.Tensor, th.Tensor]]:
        """
        Per block all of whose saved calls got a gradient: its rows ``δ`` (n x out) and ``a`` (n x in, without the
        1 of a bias: :func:`with_ones` adds it where the rows are used); the saved calls are then forgotten.
        """
        calls, self._calls = self._calls, {}
        rows = {}
        for block, block_calls in calls.items():
            if not block_calls or any(delta is None for _, delta in block_calls):
                continue
            deltas = [delta.reshape(-1, delta.shape[-1]) for _, delta in block_calls]  # type: ignore[union-attr]
            inputs = [x.reshape(-1, x.shape[-1]) for x, _ in block_calls]  # type: ignore[union-attr]
            rows[block] = (th.cat(deltas) if len(deltas) > 1 else deltas[0], th.cat(inputs) if len(inputs) > 1 else inputs[0])
        return rows


def with_ones(block: KFACBlock, inputs: th.Tensor) -> th.Tensor:
    """The input rows ``ā``: with the 1 of the bias column if the block has one."""
    return F.pad(inputs, (0, 1), value=1.0) if block.bias is not None else inputs


def rows_scale(mat: th.Tensor, deltas: th.Tensor, inputs: th.Tensor) -> float | None:
    """
    The scale ``c`` with ``mat = c · δᵀ ā``, or None if ``mat`` is not such a multiple: ``c`` from one random probe
    ``v`` (``mat v`` against ``δᵀ (ā v)``), the match checked on a second (relative error at most
    :data:`ROWS_TOLERANCE`). Two products of ``mat`` with a vector, instead of the solve's products with matrices.
    """
    if deltas.dtype != mat.dtype or inputs.dtype != mat.dtype or inputs.shape[1] != mat.shape[1]:
        return None
    probes = th.randn(2, mat.shape[1], generator=th.Generator().manual_seed(0), dtype=th.float64)
    probes = probes.to(mat.device, mat.dtype)
    # two matrix-vector products: one product with a two-column matrix was much slower (MKL)
    direct = th.stack([mat @ probe for probe in probes], 1)
    factored = deltas.T @ (inputs @ probes.T)
    norm = float(factored[:, 0] @ factored[:, 0])
    if not norm > 0.0:
        return None
    scale = float(direct[:, 0] @ factored[:, 0]) / norm
    error = float(th.linalg.vector_norm(direct - scale * factored))
    return scale if error <= ROWS_TOLERANCE * float(th.linalg.vector_norm(direct)) else None
