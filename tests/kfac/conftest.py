"""
Shared oracles of the K-FAC tests: tiny float64 models, per-sample losses, the factors by their definition, dense
``(A ⊗ G + λI)`` matrices and their solves, and accessors of an optimizer's typed state.
"""

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC, BlockCurvature, KFACPreconditioner


def mlp() -> nn.Sequential:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def sample_loss(out: th.Tensor, target: th.Tensor) -> th.Tensor:
    """A sum over samples of a per-sample loss that depends nonlinearly on the output."""
    return (th.tanh(out) * target).sum() + 0.3 * (out**2).sum()


def homogeneous(a: th.Tensor) -> th.Tensor:
    return F.pad(a, (0, 1), value=1.0)


def location_oracle(inputs: list[th.Tensor], deltas: list[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
    """
    The factors by their definition, sample by sample and location by location: ``inputs[n]`` and ``deltas[n]`` hold
    the rows (layer inputs without the 1, gradients of the loss w.r.t. the layer output) of sample ``n`` at its ``T``
    locations; ``A = Σ_n Σ_t (ā/T)(ā/T)ᵀ / N``, ``G = T² Σ_n Σ_t δ δᵀ / (N T)``.
    """
    n, locations = len(inputs), inputs[0].shape[0]
    a_ref = sum(th.outer(a, a) for rows in inputs for a in homogeneous(rows) / locations) / n
    g_ref = locations**2 * sum(th.outer(d, d) for rows in deltas for d in rows) / (n * locations)
    return a_ref, g_ref


def dense_kfac(blocks_factors: list[tuple[th.Tensor, th.Tensor]], damping: float, extra: int = 0) -> th.Tensor:
    """Block-diagonal dense (A ⊗ G + λI) in row-major vec of W̄ = [W, b]; identity for ``extra`` raw coordinates."""
    mats = [th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=a.dtype) for a, g in blocks_factors]
    if extra:
        mats.append(th.eye(extra, dtype=th.float64))
    return th.block_diag(*mats)


def dense_factored(a: th.Tensor, g: th.Tensor, damping: float) -> th.Tensor:
    """The factored damping's dense ``(G + √λ/π I) ⊗ (A + π√λ I)``, π² the ratio of the mean eigenvalues."""
    pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
    eye_a, eye_g = th.eye(a.shape[0], dtype=a.dtype), th.eye(g.shape[0], dtype=g.dtype)
    return th.kron(g + damping**0.5 / pi * eye_g, a + pi * damping**0.5 * eye_a)


def wbar(layer: nn.Module, weight_part: th.Tensor, bias_part: th.Tensor) -> th.Tensor:
    return th.cat([weight_part.reshape(weight_part.shape[0], -1), bias_part.reshape(-1, 1)], dim=1)


def dense_step(opt: KFAC, layer: nn.Module, grads: list[th.Tensor], lr: float, damping: float) -> th.Tensor:
    """``lr (A ⊗ G + λI)⁻¹ ∇`` of a block (momentum 0, no clipping), in row-major vec of ``W̄ = [W, b]``."""
    a, g = factors(opt, layer)
    return lr * th.linalg.solve(dense_kfac([(a, g)], damping), wbar(layer, *grads).flatten())


def applied_step(before: list[th.Tensor], params: list[nn.Parameter]) -> th.Tensor:
    weight, bias = (old - p.detach() for old, p in zip(before, params))
    return th.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1)], dim=1).flatten()


# ---------------------------------------------------------------------- an optimizer's typed state
def _preconditioner(opt: KFAC | KFACPreconditioner) -> KFACPreconditioner:
    return opt.preconditioner if isinstance(opt, KFAC) else opt


def block_of(opt: KFAC | KFACPreconditioner, layer: nn.Module):
    return next(block for block in _preconditioner(opt).blocks if block.weight is layer.weight)


def factors(opt: KFAC | KFACPreconditioner, layer: nn.Module) -> tuple[th.Tensor, th.Tensor] | None:
    """The running ``(A, G)`` of a layer's block, or None before its first statistics."""
    found = _preconditioner(opt).statistics.factors.get(block_of(opt, layer))
    return None if found is None else (found.a, found.g)


def curvature(opt: KFAC | KFACPreconditioner, layer: nn.Module) -> BlockCurvature:
    return _preconditioner(opt).curvature[block_of(opt, layer)]


def decompositions(opt: KFAC) -> list[th.Tensor]:
    """Copies of every decomposition of every block."""
    return [t.clone() for block in opt.blocks for t in opt.preconditioner.curvature[block].entries().values()]


def saved_state(opt: KFAC) -> dict[tuple[int, str], th.Tensor]:
    """Everything the optimizer saves per parameter (step rule, factors, decompositions), copied."""
    return {
        (i, key): value.clone() for i, entries in opt.state_dict()["state"].items() for key, value in entries.items()
    }


# ---------------------------------------------------------------------- data and steps
def fit_statistics(model: nn.Module, opt: KFAC, batches: int = 3, n: int = 32) -> None:
    for _ in range(batches):
        x = th.randn(n, 3, dtype=th.float64)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, th.randn(n, 2, dtype=th.float64)))


def loss_and_grads(model: nn.Module, opt: KFAC) -> None:
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    (model(x) ** 3).sum().backward()


def regression_step(model: nn.Module, opt: KFAC, x: th.Tensor, y: th.Tensor) -> None:
    """One K-FAC step on the MSE loss, statistics from the sampled unit-Gaussian Fisher loss of the output."""
    with opt.collect():
        out = model(x)
    opt.update_statistics(((out - (out + th.randn_like(out)).detach()) ** 2).sum())
    opt.zero_grad()
    F.mse_loss(out, y).backward()
    opt.step()


def train_steps(model: nn.Module, opt: KFAC, steps: int, seed: int, dtype: th.dtype = th.float64) -> None:
    gen = th.Generator().manual_seed(seed)
    for _ in range(steps):
        x = th.randn(16, 3, dtype=dtype, generator=gen)
        y = th.randn(16, 2, dtype=dtype, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, y))
        opt.zero_grad()
        F.mse_loss(out, y).backward()
        opt.step()
