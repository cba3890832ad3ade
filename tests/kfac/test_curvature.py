"""K-FAC curvature: each representation's solve against the dense damped inverse; decompositions and their failures."""

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.common.kfac.curvature import Eigen, eigen, top_eigen
from sb3_trpo_kfac.common.kfac.eigen import EigenCurvature
from sb3_trpo_kfac.common.kfac.inverse import InverseCurvature
from sb3_trpo_kfac.common.kfac.low_rank import LowRankEigenCurvature, LowRankInverseCurvature
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors

from .conftest import (
    curvature,
    dense_factored,
    dense_kfac,
    factors,
    mlp,
    regression_step,
    sample_loss,
    train_steps,
    wbar,
)


def _factors(dim_a: int, dim_g: int, rank_a: int | None = None) -> KroneckerFactors:
    gen = th.Generator().manual_seed(0)
    rows_a = th.randn(rank_a or 2 * dim_a, dim_a, dtype=th.float64, generator=gen)
    rows_g = th.randn(2 * dim_g, dim_g, dtype=th.float64, generator=gen)
    return KroneckerFactors(rows_a.T @ rows_a / rows_a.shape[0], rows_g.T @ rows_g / rows_g.shape[0])


def _computed(kind, factors: KroneckerFactors, damping: float, rank: int | None = None):
    """A representation computed from scratch, batched factors included (as a curvature update does)."""
    failures: list[str] = []
    fields = kind().compute("block", factors, damping, rank, failures)
    fields.update({side: eigen(getattr(factors, side)) for side in kind.batched})
    assert not failures
    return kind().updated(**fields)


@pytest.mark.parametrize("kind", [EigenCurvature, InverseCurvature, LowRankEigenCurvature, LowRankInverseCurvature])
def test_each_representation_solves_its_dense_damped_system(kind):
    low_rank = kind in (LowRankEigenCurvature, LowRankInverseCurvature)
    damping, dim_a, dim_g = 0.03, 9, 4
    fac = _factors(dim_a, dim_g, rank_a=5 if low_rank else None)  # rank(A) = 5 <= the kept rank: exact
    rep = _computed(kind, fac, damping, rank=6)
    assert rep.ready
    if kind in (EigenCurvature, LowRankEigenCurvature):
        dense = dense_kfac([(fac.a, fac.g)], damping)
    else:
        dense = dense_factored(fac.a, fac.g, damping)
    mat = th.randn(dim_g, dim_a, dtype=th.float64)
    expected = th.linalg.solve(dense, mat.flatten()).reshape(dim_g, dim_a)
    th.testing.assert_close(rep.solve(mat, damping), expected)
    if rep.stackable:  # the batched solve of several blocks is the same solve
        mats = th.randn(3, dim_g, dim_a, dtype=th.float64)
        stacked = kind.solve_stacked(kind.stack([rep] * 3, damping), mats)
        for got, one in zip(stacked, mats):
            th.testing.assert_close(got, rep.solve(one, damping))
    # the saved format round-trips, field by field, and converts
    again = kind.from_entries(rep.entries())
    assert again.entries().keys() == rep.entries().keys()
    assert all(th.equal(again.entries()[key], value) for key, value in rep.entries().items())
    assert all(t.dtype == th.float32 for t in rep.to(th.float32, th.device("cpu")).entries().values())


def test_a_representation_is_not_ready_until_every_factor_is_decomposed():
    fac = _factors(3, 2)
    assert not EigenCurvature().ready and not EigenCurvature(a=eigen(fac.a)).ready
    assert EigenCurvature(a=eigen(fac.a), g=eigen(fac.g)).ready
    assert EigenCurvature.from_entries({"dA": th.ones(3), "QA": th.eye(3)}).g is None


def test_eigenvalues_below_the_floor_are_zero():
    vectors = th.linalg.qr(th.randn(4, 4, dtype=th.float64)).Q
    mat = vectors @ th.diag(th.tensor([-1e-9, 1e-8, 0.5, 2.0], dtype=th.float64)) @ vectors.T
    result = eigen(mat)
    assert isinstance(result, Eigen) and result.values[:2].tolist() == [0.0, 0.0]
    th.testing.assert_close(result.values[2:], th.tensor([0.5, 2.0], dtype=th.float64))


def test_top_eigen_warm_start_keeps_the_subspace():
    fac = _factors(12, 2, rank_a=4)
    first = top_eigen(fac.a, 4, None)
    again = top_eigen(fac.a, 4, first)  # one sweep from the previous basis
    for result in (first, again):
        th.testing.assert_close(result.vectors @ th.diag(result.values) @ result.vectors.T, fac.a)
        assert float(result.rest) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_low_rank_input_factor_is_exact_when_rank_suffices(inverse):
    th.manual_seed(3)
    layer = nn.Linear(30, 4).double()
    damping = 0.02
    opt = KFAC(
        layer,
        lr=1.0,
        momentum=0.0,
        kfac_clip=1e9,
        kfac_damping=damping,
        kfac_inverse=inverse,
        kfac_low_rank=8,
        kfac_low_rank_min_dim=10,
    )
    x = th.randn(6, 30, dtype=th.float64)  # A = mean ā āᵀ has rank 6 <= kfac_low_rank
    with opt.collect():
        out = layer(x)
    opt.update_statistics(sample_loss(out, th.randn(6, 4, dtype=th.float64)))
    opt.update_curvature()
    assert curvature(opt, layer).a.vectors.shape == (31, 8)
    grad_w, grad_b = th.randn(4, 30, dtype=th.float64), th.randn(4, dtype=th.float64)
    w_out, b_out = opt.precondition([layer.weight, layer.bias], [grad_w, grad_b])
    a, g = factors(opt, layer)
    dense = dense_kfac([(a, g)], damping) if inverse == "eigen" else dense_factored(a, g, damping)
    expected = th.linalg.solve(dense, wbar(layer, grad_w, grad_b).flatten()).reshape(4, 31)
    th.testing.assert_close(wbar(layer, w_out, b_out), expected)


def test_float64_retry_when_float32_decomposition_fails(monkeypatch):
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32
    opt = KFAC(model, lr=0.1)
    original = th.linalg.eigh
    dtypes = []

    def flaky_eigh(mat, *args, **kwargs):
        dtypes.append(mat.dtype)
        if mat.dtype == th.float32:
            raise th.linalg.LinAlgError("simulated float32 failure")
        return original(mat, *args, **kwargs)

    monkeypatch.setattr(th.linalg, "eigh", flaky_eigh)
    regression_step(model, opt, th.randn(16, 3), th.randn(16, 2))
    assert th.float64 in dtypes and opt.counters["decomposition_failures"] == 0
    assert curvature(opt, model[0]).a.vectors.dtype == th.float32
    assert opt.counters["updates"] == 1


def test_decomposition_failure_keeps_previous_basis(monkeypatch):
    model = mlp()
    opt = KFAC(model, lr=0.1)
    train_steps(model, opt, 1, seed=0)
    basis = curvature(opt, model[0]).a.vectors.clone()

    def broken_eigh(*args, **kwargs):
        raise th.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(th.linalg, "eigh", broken_eigh)
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        train_steps(model, opt, 1, seed=1)
    assert opt.counters["decomposition_failures"] == 4  # A and G of two layers
    assert th.equal(curvature(opt, model[0]).a.vectors, basis)


def test_same_size_factors_decompose_together_and_a_bad_one_fails_alone():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    opt = KFAC(model, lr=0.1)
    gen = th.Generator().manual_seed(0)
    with opt.collect():
        out = model(th.randn(32, 4, dtype=th.float64, generator=gen))
    opt.update_statistics(sample_loss(out, th.randn(32, 4, dtype=th.float64, generator=gen)))
    opt.update_curvature()  # three 5x5 A and three 4x4 G factors: one batched eigh per size
    for layer in (model[0], model[2], model[4]):
        rep, fac = curvature(opt, layer), factors(opt, layer)
        for decomposition, factor in ((rep.a, fac[0]), (rep.g, fac[1])):
            dense = decomposition.vectors @ th.diag(decomposition.values) @ decomposition.vectors.T
            assert th.allclose(dense, factor, atol=1e-12)
    previous = curvature(opt, model[2]).a.vectors.clone()
    for layer in (model[0], model[4]):
        factors(opt, layer)[0].mul_(2.0)
    factors(opt, model[2])[0].fill_(float("nan"))
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.update_curvature()
    assert opt.counters["decomposition_failures"] == 1
    assert th.equal(curvature(opt, model[2]).a.vectors, previous)
    for layer in (model[0], model[4]):  # decomposed anyway, one by one
        a = curvature(opt, layer).a
        assert th.allclose(a.vectors @ th.diag(a.values) @ a.vectors.T, factors(opt, layer)[0], atol=1e-12)
