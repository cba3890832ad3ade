"""Gradient rows: the low-rank solve of a gradient kept as its rows δᵀ ā, against the dense solve; when it is not used."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.common.kfac.gradient_rows import rows_scale
from sb3_trpo_kfac.common.kfac.low_rank import TwoSidedLowRankEigenCurvature
from sb3_trpo_kfac.common.kfac.solve import KroneckerSolver

from .conftest import dense_kfac, sample_loss
from .test_cheap_curvature import _dense, _low_rank


@pytest.mark.parametrize("scale", [1.0, 0.37, 0.0])
def test_the_solve_of_gradient_rows_is_the_dense_solve_of_their_product(scale):
    damping, dim_a, dim_g, n = 0.02, 11, 7, 3
    a, g = _low_rank(dim_a, 4, 0.3, 0), _low_rank(dim_g, 3, 0.05, 1)
    rep = TwoSidedLowRankEigenCurvature(a=a, g=g)
    gen = th.Generator().manual_seed(2)
    deltas, inputs = th.randn(n, dim_g, dtype=th.float64, generator=gen), th.randn(n, dim_a, dtype=th.float64, generator=gen)
    mat = scale * deltas.T @ inputs
    expected = th.linalg.solve(dense_kfac([(_dense(a), _dense(g))], damping), mat.flatten()).reshape(dim_g, dim_a)
    out = th.full_like(mat, float("nan"))
    rep.solve_rows_into(deltas, inputs, scale, damping, out)
    th.testing.assert_close(out, expected)
    # fewer rows than the products it saves pay off, more do not
    assert rep.rows_pay_off(n) and not rep.rows_pay_off(2 * (3 + 4) - 4)


def test_rows_scale_finds_the_multiple_and_refuses_anything_else():
    gen = th.Generator().manual_seed(0)
    deltas, inputs = th.randn(5, 8, dtype=th.float64, generator=gen), th.randn(5, 13, dtype=th.float64, generator=gen)
    mat = deltas.T @ inputs
    assert rows_scale(0.25 * mat, deltas, inputs) == pytest.approx(0.25, rel=1e-12)
    assert rows_scale(mat + 1e-3 * th.randn(mat.shape, dtype=th.float64, generator=gen), deltas, inputs) is None
    assert rows_scale(mat, deltas[:4], inputs[:4]) is None  # another batch's rows
    assert rows_scale(mat, deltas, inputs[:, :12]) is None  # not the matrix's shape
    assert rows_scale(mat, th.zeros_like(deltas), inputs) is None
    assert rows_scale(th.full_like(mat, float("nan")), deltas, inputs) is None


class _Twice(nn.Module):
    """A large layer (over 2²⁰ parameters: low-rank on both sides with "auto") applied to two inputs of each sample."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.head = nn.Linear(1030, 1024), nn.Linear(1024, 2)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.head(th.tanh(self.big(x)) + th.tanh(self.big(x.flip(1))))


def _steps(model: nn.Module, opt: KFAC, capture: bool, steps: int = 3, extra_gradient: float = 0.0) -> None:
    gen = th.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = th.randn(6, 1030, dtype=th.float64, generator=gen), th.randn(6, 2, dtype=th.float64, generator=gen)
        with opt.capture_gradient_rows() if capture else th.enable_grad(), opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, (out + th.randn(out.shape, generator=gen, dtype=th.float64)).detach()))
        opt.zero_grad()
        F.mse_loss(out, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # a clipped gradient is still a multiple of its rows
        if extra_gradient:
            model.big.weight.grad.add_(extra_gradient)
        opt.step()


@pytest.mark.parametrize(("weight_decay", "extra_gradient", "from_rows"), [(0.0, 0.0, 3), (1e-3, 0.0, 0), (0.0, 1e-2, 0)])
def test_steps_from_gradient_rows_equal_the_dense_steps(monkeypatch, weight_decay, extra_gradient, from_rows):
    th.manual_seed(0)
    model = _Twice().double()
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.1, kfac_clip=0.01, kfac_low_rank="auto", weight_decay=weight_decay)
    opt, twin_opt = KFAC(model, **kwargs), KFAC(twin, **kwargs)
    assert [b.module for b in opt.preconditioner.gradient_rows.blocks] == [model.big]
    solved = []
    solve_rows = KroneckerSolver._solve_rows
    monkeypatch.setattr(KroneckerSolver, "_solve_rows", staticmethod(lambda *a: solved.append(solve_rows(*a)) or solved[-1]))
    _steps(model, opt, capture=True, extra_gradient=extra_gradient)
    # the rows are kept only for blocks whose solve uses them, and solved from only when the gradient is their multiple
    assert solved.count(True) == from_rows
    _steps(twin, twin_opt, capture=False, extra_gradient=extra_gradient)
    assert solved.count(True) == from_rows
    for p, q in zip(model.parameters(), twin.parameters()):
        th.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_without_a_large_layer_capturing_rows_adds_no_hook():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, kfac_low_rank="auto")
    assert opt.preconditioner.gradient_rows.blocks == []
    with opt.capture_gradient_rows():
        assert not model[0]._forward_hooks
