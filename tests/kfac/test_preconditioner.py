"""The K-FAC preconditioner: trust regions against dense oracles, the cadence, cold start, robustness, arguments."""

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac import KFAC, KFACPreconditioner

from .conftest import (
    curvature,
    dense_kfac,
    factors,
    fit_statistics,
    loss_and_grads,
    mlp,
    saved_state,
    train_steps,
    wbar,
)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_quadratic_kl_within_clip(momentum):
    model = mlp()
    log_std = nn.Parameter(th.zeros(2, dtype=th.float64))
    kfac_clip, damping, lr = 1e-3, 0.01, 0.5
    opt = KFAC(
        model,
        lr=lr,
        momentum=momentum,
        kfac_clip=kfac_clip,
        kfac_damping=damping,
        params=[*model.parameters(), log_std],
    )
    fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    ((model(x) * log_std.exp()) ** 3).sum().backward()
    before = {p: p.detach().clone() for p in opt.param_groups[0]["params"]}
    opt.step()
    assert 0 < opt.last_nu[0] < 1, "the clip should be active with this radius"
    deltas, all_factors = [], []
    for layer in (model[0], model[2]):
        deltas.append(wbar(layer, layer.weight - before[layer.weight], layer.bias - before[layer.bias]).flatten())
        all_factors.append(factors(opt, layer))
    deltas.append(log_std - before[log_std])
    delta = th.cat(deltas).detach()
    fisher = dense_kfac(all_factors, damping, extra=2)  # log_std keeps its raw gradient: identity block
    quadratic = float(delta @ fisher @ delta)
    # the step is lr (1 - m) ν V with lr² ν² Vᵀ F V = kfac_clip on the boundary
    assert quadratic <= kfac_clip * (1 + 1e-6)
    assert quadratic == pytest.approx(kfac_clip * (1 - momentum) ** 2, rel=1e-6)


def test_each_parameter_group_is_its_own_trust_region():
    model = mlp()
    first, second = model[0], model[2]
    lr, damping, clips = 0.5, 0.01, (1e-3, 1e9)
    opt = KFAC(
        model,
        lr=lr,
        momentum=0.0,
        kfac_damping=damping,
        kfac_clip=clips[0],
        params=[{"params": first.parameters()}, {"params": second.parameters(), "kfac_clip": clips[1]}],
    )
    assert [group["kfac_clip"] for group in opt.param_groups] == list(clips)
    fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    (model(x) ** 3).sum().backward()
    grads = {layer: wbar(layer, layer.weight.grad, layer.bias.grad) for layer in (first, second)}
    before = {layer: wbar(layer, layer.weight, layer.bias).detach().clone() for layer in (first, second)}
    opt.step()
    assert 0 < opt.last_nu[0] < 1 and opt.last_nu[1] == 1.0, "only the first group's radius should bind"
    for index, layer in enumerate((first, second)):
        natural = th.linalg.solve(dense_kfac([factors(opt, layer)], damping), grads[layer].flatten())
        delta = (wbar(layer, layer.weight, layer.bias).detach() - before[layer]).flatten()
        # each group steps along its own natural gradient, scaled by its own ν
        th.testing.assert_close(delta, -lr * opt.last_nu[index] * natural)
        assert opt.last_vfv[index] == pytest.approx(lr**2 * float(grads[layer].flatten() @ natural), rel=1e-6)
    assert opt.last_nu[0] ** 2 * opt.last_vfv[0] == pytest.approx(clips[0], rel=1e-6)  # on its boundary


def test_standalone_preconditioner_rewrites_grad_for_any_optimizer():
    model = mlp()
    lr, damping, kfac_clip = 0.5, 0.02, 1e-3
    preconditioner = KFACPreconditioner(model, lr=lr, kfac_clip=kfac_clip, kfac_damping=damping)
    sgd = th.optim.SGD(model.parameters(), lr=lr)
    assert not preconditioner.step()  # no gradient yet: nothing to do
    fit_statistics(model, preconditioner)
    loss_and_grads(model, sgd)
    layers = [model[0], model[2]]
    grads = [wbar(layer, layer.weight.grad, layer.bias.grad).flatten() for layer in layers]
    before = [wbar(layer, layer.weight, layer.bias).detach().clone() for layer in layers]
    assert preconditioner.step()
    naturals = [
        th.linalg.solve(dense_kfac([factors(preconditioner, layer)], damping), g) for layer, g in zip(layers, grads)
    ]
    nu = min(1.0, (kfac_clip / (lr**2 * sum(float(v @ g) for v, g in zip(naturals, grads)))) ** 0.5)
    assert preconditioner.last_nu[0] == pytest.approx(nu, rel=1e-9) and nu < 1.0
    for layer, natural in zip(layers, naturals):  # .grad now holds ν V, weight and bias alike
        th.testing.assert_close(wbar(layer, layer.weight.grad, layer.bias.grad).flatten(), nu * natural)
    sgd.step()
    for layer, old, natural in zip(layers, before, naturals):
        th.testing.assert_close((wbar(layer, layer.weight, layer.bias).detach() - old).flatten(), -lr * nu * natural)


def test_decompositions_follow_statistics_that_come_less_often_than_steps():
    model = mlp()
    opt = KFAC(model, kfac_update=3)
    for step in range(10):
        if step % 3 == 0:
            fit_statistics(model, opt, batches=1)
        loss_and_grads(model, opt)
        opt.step()
        # each statistics update is decomposed by the step that follows it, not up to kfac_update - 1 steps later
        assert opt.counters["stats_at_curvature"] == opt.counters["stats_updates"]
    assert opt.counters["curvature_updates"] == 4


def test_step_without_curvature_refresh_keeps_basis_and_schedule():
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_update=1, kfac_cold_iter=2)
    train_steps(model, opt, 1, seed=0)
    basis = curvature(opt, model[0]).a.vectors.clone()
    fit_statistics(model, opt)  # new statistics: a normal step would decompose them
    opt.zero_grad()
    (model(th.randn(8, 3, dtype=th.float64)) ** 2).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step(refresh_curvature=False)
    assert not th.equal(model[0].weight, before)
    assert th.equal(curvature(opt, model[0]).a.vectors, basis)
    counters = opt.counters
    assert (counters["steps"], counters["updates"], counters["extra_steps"], counters["curvature_updates"]) == (
        1,
        1,
        1,
        1,
    )
    opt.step()  # still the second cold-start step, and now the basis is refreshed
    assert counters["curvature_updates"] == 2 and counters["updates"] == 2 and opt.last_nu == [1.0]


def test_cold_start_is_clipped_momentum_sgd():
    model = mlp()
    opt = KFAC(model, lr=0.5, momentum=0.0, kfac_cold_iter=1, kfac_cold_max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 1, seed=0)
    step_norm = th.cat([(p.detach() - old).flatten() for p, old in zip(model.parameters(), before)]).norm()
    assert float(step_norm.detach()) == pytest.approx(0.5 * 1e-3, rel=1e-3)


def test_learning_rate_is_read_from_param_groups():
    steps = []
    for lr in (0.1, 0.2):
        model = mlp()
        opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9)
        opt.param_groups[0]["lr"] = lr
        before = model[0].weight.detach().clone()
        train_steps(model, opt, 1, seed=0)
        steps.append(model[0].weight.detach() - before)
    th.testing.assert_close(steps[1], 2 * steps[0])


def test_weight_decay_enters_the_gradient():
    scale = nn.Parameter(th.full((3,), 2.0, dtype=th.float64))
    holder = nn.Module()
    holder.scale = scale  # no K-FAC block: raw (decayed) gradient
    opt = KFAC(holder, lr=0.5, momentum=0.0, kfac_clip=1e9, weight_decay=0.1)
    scale.grad = th.zeros_like(scale)
    opt.step()
    th.testing.assert_close(scale.detach(), th.full((3,), 2.0 - 0.5 * 0.1 * 2.0, dtype=th.float64))


def test_non_finite_gradient_never_reaches_parameters():
    model = mlp()
    opt = KFAC(model, lr=0.1)
    train_steps(model, opt, 2, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for bad in (float("inf"), float("nan")):
        opt.zero_grad()
        (model(th.randn(4, 3, dtype=th.float64)).sum() * th.tensor(bad, dtype=th.float64)).backward()
        opt.step()
        for p, old, buf in zip(model.parameters(), before, buffers):
            assert th.equal(p, old)
            assert th.equal(opt.state[p]["momentum_buffer"], buf)
    assert opt.counters["skipped_steps"] == 2

    # non-finite statistics are refused too (the factors stay finite)
    with opt.collect():
        out = model(th.randn(4, 3, dtype=th.float64))
    with pytest.warns(UserWarning, match="non-finite"):
        assert not opt.update_statistics((out * float("inf")).sum())
    assert all(th.isfinite(value).all() for value in saved_state(opt).values())


@pytest.mark.parametrize(
    "params, error, name",
    [
        (lambda m: [{"params": [m[0].weight]}, {"params": [m[0].bias, *m[2].parameters()]}], ValueError, "different"),
        (lambda m: [{"params": m.parameters(), "weight_decay": 0.1}], ValueError, "weight_decay"),
        (lambda m: [{"params": m.parameters()}, {"params": m[0].parameters()}], ValueError, "more than one group"),
        (lambda m: [{"params": m.parameters(), "kfac_clip": 0.0}], ValueError, "kfac_clip"),
        (lambda m: [{"params": m.parameters(), "momentum": 1.0}], ValueError, "momentum"),
        (lambda m: [{"params": m.parameters(), "lr": "0.1"}], TypeError, "lr"),
        (lambda m: [{"params": m[0].parameters()}, m[2].weight], TypeError, "params"),
        (lambda m: [*m.parameters(), nn.Parameter(th.zeros(2))], TypeError, "dtype"),  # float32 beside float64
    ],
)
def test_bad_parameter_groups(params, error, name):
    model = mlp()
    with pytest.raises(error, match=name):
        KFAC(model, params=params(model))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(kfac_stats_decay=1.5), ValueError, "kfac_stats_decay"),
        (dict(kfac_damping=0.0), ValueError, "kfac_damping"),
        (dict(kfac_clip=-1.0), ValueError, "kfac_clip"),
        (dict(kfac_update=0), ValueError, "kfac_update"),
        (dict(kfac_update=1.5), TypeError, "kfac_update"),
        (dict(kfac_cold_iter=-1), ValueError, "kfac_cold_iter"),
        (dict(weight_decay="0.1"), TypeError, "weight_decay"),
        (dict(kfac_inverse="cholesky"), ValueError, "kfac_inverse"),
        (dict(kfac_refine=-1), ValueError, "kfac_refine"),
        (dict(kfac_refine=1.5), TypeError, "kfac_refine"),
        (dict(modules=[nn.ReLU()]), TypeError, "modules"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        KFAC(mlp(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        KFAC([nn.Parameter(th.zeros(1))])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [dict(kfac_damping=-1.0), dict(kfac_low_rank_min_dim=0), dict(kfac_cold_max_grad_norm=0.0), dict(kfac_low_rank=0)],
)
def test_optimizer_and_preconditioner_share_their_checks(kwargs):
    # KFAC's kfac_* knobs are its preconditioner's: one name, one check, one message
    messages = []
    for cls in (KFAC, KFACPreconditioner):
        with pytest.raises(ValueError, match=next(iter(kwargs))) as error:
            cls(mlp(), **kwargs)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
