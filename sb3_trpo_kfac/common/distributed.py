"""
Data-parallel primitives over ``torch.distributed``: the few collective operations TRPO and ACKTR need so that every
rank takes the same update from all ranks' data.

A model is data-parallel when it is built inside an initialised default process group of more than one process
(``torchrun`` and ``th.distributed.init_process_group``); outside one every function here is the identity, so the
single-process code path pays nothing. Every rank holds a batch of the same size (same ``n_envs`` and ``n_steps``),
so a mean over ranks of per-rank means is the mean over the union of the batches.
"""

from collections.abc import Callable, Iterable, Sequence

import torch as th
from torch import distributed as dist


def world_size() -> int:
    """Number of processes in the default group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_data_parallel() -> bool:
    return world_size() > 1


def _scatter_back_(flat: th.Tensor, tensors: Sequence[th.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors``, in place."""
    offset = 0
    with th.no_grad():
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n


def all_reduce_sum_(tensors: Sequence[th.Tensor]) -> None:
    """Replace each tensor by its sum over ranks, in place (one collective for all of them)."""
    if not is_data_parallel() or len(tensors) == 0:
        return
    flat = th.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    _scatter_back_(flat, tensors)


def all_reduce_mean_(tensors: Sequence[th.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place (one collective for all of them)."""
    if not is_data_parallel() or len(tensors) == 0:
        return
    flat = th.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    _scatter_back_(flat, tensors)


def mean_over_ranks(tensor: th.Tensor) -> th.Tensor:
    """The mean over ranks of ``tensor`` (a new tensor; ``tensor`` itself is not modified)."""
    if not is_data_parallel():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def mean_over_ranks_of(matvec: Callable[[th.Tensor], th.Tensor]) -> Callable[[th.Tensor], th.Tensor]:
    """
    ``v ↦ mean over ranks of matvec(v)``, for a product with a matrix that is a mean over samples (a Fisher): called
    with the same ``v`` on every rank, it is the product with the matrix of all ranks' samples. ``matvec`` itself
    outside a data-parallel run.
    """
    if not is_data_parallel():
        return matvec

    def mean_product(vector: th.Tensor) -> th.Tensor:
        return mean_over_ranks(matvec(vector))

    return mean_product


def all_reduce_gradients_(parameters: Iterable[th.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks; a parameter without a gradient on this rank counts as a zero gradient."""
    if not is_data_parallel():
        return
    params = list(parameters)
    for p in params:
        if p.grad is None:
            p.grad = th.zeros_like(p)
    all_reduce_mean_([p.grad for p in params])  # type: ignore[misc]


def broadcast_(tensors: Sequence[th.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s copy, in place."""
    if not is_data_parallel() or len(tensors) == 0:
        return
    flat = th.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    _scatter_back_(flat, tensors)


def broadcast_module_(module: th.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    broadcast_([*module.parameters(), *module.buffers()], src=src)


def check_identical(tensors: Sequence[th.Tensor], what: str = "parameters") -> None:
    """
    Raise a RuntimeError unless ``tensors`` hold the same values on every rank. Compared through a float64
    fingerprint per tensor (its sum and a fixed weighted sum), max and min over ranks, so one collective of a few
    numbers, not the parameters themselves.
    """
    if not is_data_parallel() or len(tensors) == 0:
        return
    rows = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).to(th.float64)
        weights = th.arange(1, flat.numel() + 1, dtype=th.float64, device=flat.device).reciprocal_()
        rows.append(th.stack([flat.sum(), (flat * weights).sum()]))
    fingerprint = th.stack(rows)
    high, low = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not th.equal(high, low):
        raise RuntimeError(f"data-parallel ranks hold different {what} (rank {rank()} of {world_size()})")
