"""
The cheaper K-FAC options against their definitions: the two-sided low-rank solve against the dense damped system
of its kept eigenpairs and isotropic rests, ``kfac_low_rank="auto"``'s choice of blocks, and subsampled statistics
against the statistics of the chosen samples.
"""

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.common.kfac.curvature import LowRankEigen, top_eigen
from sb3_trpo_kfac.common.kfac.eigen import EigenCurvature
from sb3_trpo_kfac.common.kfac.inverse import InverseCurvature
from sb3_trpo_kfac.common.kfac.low_rank import (
    AUTO_RANK,
    LowRankEigenCurvature,
    LowRankInverseCurvature,
    TwoSidedLowRankEigenCurvature,
)
from sb3_trpo_kfac.common.kfac.statistics import subsample_indices
from sb3_trpo_kfac.common.validation import ArgumentError, ArgumentTypeError

from .conftest import dense_kfac, factors, sample_loss


def _low_rank(dim: int, rank: int, rest: float, seed: int) -> LowRankEigen:
    gen = th.Generator().manual_seed(seed)
    vectors = th.linalg.qr(th.randn(dim, rank, dtype=th.float64, generator=gen)).Q
    return LowRankEigen(th.rand(rank, dtype=th.float64, generator=gen) + 1.0, vectors, th.tensor(rest, dtype=th.float64))


def _dense(factor: LowRankEigen) -> th.Tensor:
    """The factor the representation stands for: kept eigenpairs, the mean eigenvalue ``rest`` on the complement."""
    kept = factor.vectors @ factor.vectors.T
    return factor.vectors @ th.diag(factor.values) @ factor.vectors.T + factor.rest * (th.eye(kept.shape[0]) - kept)


@pytest.mark.parametrize("rests", [(0.3, 0.05), (0.0, 0.0)])
def test_two_sided_low_rank_solve_is_the_dense_solve_of_its_factors(rests):
    damping, dim_a, dim_g = 0.02, 11, 7
    a, g = _low_rank(dim_a, 4, rests[0], 0), _low_rank(dim_g, 3, rests[1], 1)
    rep = TwoSidedLowRankEigenCurvature(a=a, g=g)
    mat = th.randn(dim_g, dim_a, dtype=th.float64)
    expected = th.linalg.solve(dense_kfac([(_dense(a), _dense(g))], damping), mat.flatten()).reshape(dim_g, dim_a)
    th.testing.assert_close(rep.solve(mat, damping), expected)
    out = th.full_like(mat, float("nan"))
    rep.solve_into(mat, damping, out)
    th.testing.assert_close(out, expected)
    # the saved format round-trips
    again = TwoSidedLowRankEigenCurvature.from_entries(rep.entries())
    assert set(rep.entries()) == {"dA", "QA", "sA", "dG", "QG", "sG"}
    th.testing.assert_close(again.solve(mat, damping), expected)


def test_two_sided_low_rank_is_exact_when_the_factors_have_that_rank():
    gen = th.Generator().manual_seed(2)
    rows_a, rows_g = th.randn(4, 12, dtype=th.float64, generator=gen), th.randn(3, 9, dtype=th.float64, generator=gen)
    fac_a, fac_g = rows_a.T @ rows_a / 4, rows_g.T @ rows_g / 3
    rep = TwoSidedLowRankEigenCurvature(a=top_eigen(fac_a, 5, None), g=top_eigen(fac_g, 5, None))
    mat = th.randn(9, 12, dtype=th.float64)
    expected = th.linalg.solve(dense_kfac([(fac_a, fac_g)], 0.01), mat.flatten()).reshape(9, 12)
    th.testing.assert_close(rep.solve(mat, 0.01), expected)


@pytest.mark.parametrize(("inverse", "kind"), [("eigen", TwoSidedLowRankEigenCurvature), ("inverse", LowRankInverseCurvature)])
def test_auto_low_rank_only_for_blocks_above_the_size(inverse, kind):
    big, small = nn.Linear(1024, 1024), nn.Linear(1024, 16)  # 1,049,600 > 2^20 parameters; 16,400
    opt = KFAC(nn.Sequential(big, small), kfac_low_rank="auto", kfac_inverse=inverse)
    types = {block.module: t for block, t in opt.preconditioner.curvature_types.items()}
    assert types[big] is kind
    assert types[small] is (EigenCurvature if inverse == "eigen" else InverseCurvature)


def test_auto_low_rank_steps_on_a_large_layer():
    th.manual_seed(0)
    layer = nn.Linear(1024, 1024)
    opt = KFAC(layer, lr=0.1, kfac_low_rank="auto")
    x = th.randn(8, 1024)
    with opt.collect():
        out = layer(x)
    opt.update_statistics(sample_loss(out, th.randn(8, 1024)))
    (out**2).mean().backward()
    before = layer.weight.detach().clone()
    opt.step()
    rep = opt.preconditioner.curvature[opt.blocks[0]]
    assert isinstance(rep, TwoSidedLowRankEigenCurvature)
    assert rep.a.vectors.shape == (1025, AUTO_RANK) and rep.g.vectors.shape == (1024, AUTO_RANK)
    assert th.isfinite(layer.weight).all() and not th.equal(layer.weight, before)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(kfac_low_rank="full"), ArgumentError),
        (dict(kfac_low_rank=0), ArgumentError),
        (dict(kfac_stats_samples=0), ArgumentError),
        (dict(kfac_stats_samples=2.5), ArgumentTypeError),
    ],
)
def test_bad_cheap_options_are_refused_by_name(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        KFAC(nn.Linear(3, 2), **kwargs)


def _conv_net() -> nn.Sequential:
    th.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()


def test_subsampled_statistics_are_those_of_the_chosen_samples():
    x, target = th.randn(9, 2, 6, 6, dtype=th.float64), th.randn(9, 4, dtype=th.float64)
    sub, full = _conv_net(), _conv_net()
    opt_sub, opt_full = KFAC(sub, kfac_stats_samples=4), KFAC(full)
    chosen = subsample_indices(9, 4, seed=0)  # the first statistics update draws with seed 0
    assert len(set(chosen.tolist())) == 4
    with opt_sub.collect():
        out = sub(x)
    opt_sub.update_statistics(sample_loss(out, target))
    with opt_full.collect():  # the oracle: every sample of the chosen ones (the per-sample δ does not depend on others)
        out = full(x[chosen])
    opt_full.update_statistics(sample_loss(out, target[chosen]))
    for layer_sub, layer_full in ((sub[0], full[0]), (sub[3], full[3])):
        for got, expected in zip(factors(opt_sub, layer_sub), factors(opt_full, layer_full)):
            th.testing.assert_close(got, expected)
    # a batch no larger than kfac_stats_samples is used whole
    with opt_sub.collect():
        out = sub(x[:4])
    decay = opt_sub.preconditioner.statistics.stats_decay
    a_before = factors(opt_sub, sub[3])[0].clone()
    opt_sub.update_statistics(sample_loss(out, target[:4]))
    rows = th.cat([th.relu(sub[0](x[:4])).flatten(1), th.ones(4, 1, dtype=th.float64)], 1).detach()
    th.testing.assert_close(factors(opt_sub, sub[3])[0], decay * a_before + (1 - decay) * rows.T @ rows / 4)


def test_subsampled_statistics_are_unbiased():
    """Averaged over every draw of 2 of 4 samples, the subsampled factors are the full batch's."""
    x, target = th.randn(4, 2, 6, 6, dtype=th.float64), th.randn(4, 4, dtype=th.float64)
    full = _conv_net()
    opt_full = KFAC(full)
    with opt_full.collect():
        out = full(x)
    opt_full.update_statistics(sample_loss(out, target))
    pairs = [th.tensor([i, j]) for i in range(4) for j in range(i + 1, 4)]
    means = []
    for pair in pairs:
        net = _conv_net()
        opt = KFAC(net)
        with opt.collect():
            out = net(x[pair])
        opt.update_statistics(sample_loss(out, target[pair]))
        means.append([t.clone() for layer in (net[0], net[3]) for t in factors(opt, layer)])
    average = [sum(ts) / len(pairs) for ts in zip(*means)]
    for got, expected in zip(average, [t for layer in (full[0], full[3]) for t in factors(opt_full, layer)]):
        th.testing.assert_close(got, expected)


def test_low_rank_a_only_type_unchanged_for_an_integer_rank():
    opt = KFAC(nn.Linear(40, 3), kfac_low_rank=4, kfac_low_rank_min_dim=10)
    assert list(opt.preconditioner.curvature_types.values()) == [LowRankEigenCurvature]
