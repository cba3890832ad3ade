"""
K-FAC on 2 gloo ranks (``common/kfac/distributed.py``): steps on batches B1 and B2 equal the single-process steps on
B1 ∪ B2 (statistics, decompositions replicated or split, async), a block without samples on one rank, a rank without
any sample, non-finite statistics on one rank; and the split's assignment.
"""

import warnings

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common import distributed
from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.common.kfac.distributed import assign_owners, decomposition_cost, split_by_default

from .helpers import run_ranks

N = 8  # samples per rank
STEPS = 3  # the third applies the background decomposition the second started (kfac_async)
CASES = {
    "eigen": dict(),
    "eigen-split": dict(kfac_split_decompositions=True),
    "eigen-split-async": dict(kfac_split_decompositions=True, kfac_async=True),
    "inverse-lowrank-split": dict(kfac_split_decompositions=True, kfac_inverse="inverse", kfac_low_rank=3),
    "eigen-lowrank-async": dict(kfac_async=True, kfac_low_rank=3),
}


def sample_loss(out: th.Tensor, target: th.Tensor) -> th.Tensor:
    """A sum over samples of a per-sample loss that depends nonlinearly on the output."""
    return (th.tanh(out) * target).sum() + 0.3 * (out**2).sum()


class Routed(nn.Module):
    """A conv layer, a linear layer, and a head that only the first N // 2 samples of the union batch reach."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.linear = nn.Linear(12, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: th.Tensor, routed: th.Tensor) -> th.Tensor:
        h = th.tanh(self.linear(th.tanh(self.conv(x)).flatten(1)))
        return th.cat([h[:, :2], self.head(h[routed])])


def make(options: dict) -> tuple[Routed, KFAC]:
    th.manual_seed(0)
    model = Routed().double()
    # low-rank input factors from dimension 9 on: the linear layer's (12 + 1)
    return model, KFAC(model, lr=0.3, kfac_clip=0.01, kfac_low_rank_min_dim=8, **options)


def batch(step: int) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """The union batch of a step: inputs, targets, and which samples reach the head (some of rank 0's only)."""
    gen = th.Generator().manual_seed(step)
    x = th.randn(2 * N, 2, 3, 3, dtype=th.float64, generator=gen)
    y = th.randn(2 * N + N // 2, 2, dtype=th.float64, generator=gen)
    routed = th.arange(2 * N) < N // 2
    return x, y, routed


def train(options: dict, part: slice) -> dict:
    """STEPS steps on the samples ``part`` of each union batch: parameters, ν and the factors at the end."""
    model, opt = make(options)
    nus = []
    for step in range(STEPS):
        x, y, routed = batch(step)
        x, routed = x[part], routed[part]
        y = th.cat([y[: 2 * N][part], y[2 * N :][: int(routed.sum())]])
        with opt.collect():
            out = model(x, routed)
        opt.update_statistics(sample_loss(out, y))
        opt.zero_grad()
        # the mean loss of the union: each rank's sum over the union's size, gradients averaged over the 2 ranks
        (sample_loss(out, y) / (2 * N) * distributed.world_size()).backward()
        distributed.all_reduce_gradients_(model.parameters())
        opt.step()
        nus.append(opt.last_nu[0])
        if step == 1 and distributed.rank() == 0:
            # rank 0 saves alone, with a background decomposition pending (kfac_async): no collective may run
            opt.state_dict()
    distributed.check_identical(list(model.parameters()))
    factors = opt.preconditioner.statistics.factors
    return dict(
        params=[p.detach().clone() for p in model.parameters()],
        nus=nus,
        factors=[t.clone() for b in opt.blocks for t in (factors[b].a, factors[b].g)],
        counters=opt.counters.as_dict(),
        split=opt.preconditioner.splits_decompositions,
    )


def on_rank(rank: int) -> dict:
    results = {name: train(options, slice(rank * N, (rank + 1) * N)) for name, options in CASES.items()}
    results["empty"] = statistics_with_empty_rank(rank)
    results["non_finite"] = non_finite_on_one_rank(rank)
    return results


def statistics_with_empty_rank(rank: int) -> list[th.Tensor]:
    """Rank 1 holds no sample: the factors are rank 0's batch's (it takes part in the reduction all the same)."""
    model, opt = make({})
    x, y, routed = batch(0)
    if rank == 1:
        x, y, routed = x[:0], y[:0], routed[:0]
    with opt.collect():
        out = model(x, routed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no samples" on rank 1
        opt.update_statistics(sample_loss(out, y[: out.shape[0]]))
    return [t.clone() for f in opt.preconditioner.statistics.factors.values() for t in (f.a, f.g)]


def non_finite_on_one_rank(rank: int) -> dict:
    """A NaN in rank 1's Fisher loss: both ranks refuse the statistics."""
    model, opt = make({})
    x, y, routed = batch(0)
    if rank == 1:
        y = y.clone()
        y[0, 0] = float("nan")
    with opt.collect():
        out = model(x[:N], routed[:N])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-finite statistics were ignored"
        updated = opt.update_statistics(sample_loss(out, y[: out.shape[0]]))
    return dict(updated=updated, skipped=opt.counters["skipped_stats"])


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(on_rank)


def close(a: th.Tensor, b: th.Tensor, scale: th.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-10 * float(scale.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_union(ranks, name):
    single = train(CASES[name], slice(0, 2 * N))
    first, second = ranks[0][name], ranks[1][name]
    # this tiny model's decompositions are too cheap to be split unless asked
    assert first["split"] == second["split"] == (CASES[name].get("kfac_split_decompositions") is True)
    assert first["nus"] == second["nus"]
    assert all(th.equal(a, b) for a, b in zip(first["params"], second["params"]))
    assert first["counters"] == second["counters"] == single["counters"]
    assert first["nus"] == pytest.approx(single["nus"], rel=1e-10)
    assert 0 < min(single["nus"]) < 1, "the trust region should be active, so that ν is compared"
    _, initial = make({})
    start = [p.detach().clone() for p in initial.param_groups[0]["params"]]
    for p_ranks, p_single, p0 in zip(first["params"], single["params"], start):
        assert close(p_ranks, p_single, p_single - p0), "the update differs from the union's"
    for f_ranks, f_single in zip(first["factors"], single["factors"]):
        assert close(f_ranks, f_single, f_single)


def test_a_rank_without_samples_agrees(ranks):
    model, opt = make({})
    x, y, routed = batch(0)
    with opt.collect():
        out = model(x, routed)
    opt.update_statistics(sample_loss(out, y[: out.shape[0]]))
    single = [t for f in opt.preconditioner.statistics.factors.values() for t in (f.a, f.g)]
    assert len(ranks[0]["empty"]) == len(single) == 6
    for on_ranks in (ranks[0]["empty"], ranks[1]["empty"]):
        assert all(close(a, b, b) for a, b in zip(on_ranks, single))


def test_non_finite_statistics_on_one_rank_are_refused_on_all(ranks):
    assert ranks[0]["non_finite"] == ranks[1]["non_finite"] == dict(updated=False, skipped=1)


def test_split_by_default_for_large_layers_only():
    small = Routed()
    large = nn.Linear(3136, 512)  # NatureCNN's hidden layer
    opt_small, opt_large = KFAC(small), KFAC(large)
    assert not split_by_default([decomposition_cost(b, None) for b in opt_small.blocks])
    assert split_by_default([decomposition_cost(b, None) for b in opt_large.blocks])
    assert split_by_default([decomposition_cost(b, 128) for b in opt_large.blocks])  # a rank-128 input factor
    assert not opt_small.preconditioner.splits_decompositions  # one process


def test_owners_balance_cost_deterministically():
    assert assign_owners([1.0, 30.0, 2.0, 2.0, 1.0], 2) == [1, 0, 1, 1, 1]
    assert assign_owners([5.0, 5.0, 5.0], 2) == [0, 1, 0]
    assert assign_owners([3.0], 4) == [0]
