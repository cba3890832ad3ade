"""The K-FAC solve against dense float64 solves: blocks, raw parameters, batches, conv layers, CG refinement."""

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import dense_factored, dense_kfac, factors, fit_statistics, loss_and_grads, mlp, sample_loss, wbar


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_preconditioned_gradient_matches_dense_solve(inverse):
    model = mlp()
    scale = nn.Parameter(th.ones(2, dtype=th.float64))  # outside any block: raw gradient
    damping = 0.05
    opt = KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        kfac_clip=1e9,
        kfac_damping=damping,
        kfac_inverse=inverse,
        params=[*model.parameters(), scale],
    )
    fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    ((model(x) * scale) ** 3).sum().backward()
    layers = [model[0], model[2]]
    grads = [wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
    scale_grad = scale.grad.clone()
    before = [wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
    scale_before = scale.detach().clone()
    opt.step()
    assert opt.last_nu == [1.0]

    for layer, grad, old in zip(layers, grads, before):
        a, g = factors(opt, layer)
        dense = dense_kfac([(a, g)], damping) if inverse == "eigen" else dense_factored(a, g, damping)
        expected = th.linalg.solve(dense, grad.flatten()).reshape(grad.shape)
        step = old - wbar(layer, layer.weight.detach(), layer.bias.detach())  # lr = 1, momentum 0
        th.testing.assert_close(step, expected)
        # the public preconditioner gives the same solve (weight and bias jointly)
        w_out, b_out = opt.precondition([layer.weight, layer.bias], [layer.weight.grad, layer.bias.grad])
        th.testing.assert_close(wbar(layer, w_out, b_out), expected)
    th.testing.assert_close(scale_before - scale.detach(), scale_grad)
    assert opt.precondition([scale], [scale_grad])[0] is scale_grad


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_refinement_solves_the_current_factors_with_a_stale_decomposition(inverse):
    damping = 0.05

    def step_after_stale_decomposition(refine: int) -> tuple[KFAC, list, list, list]:
        model = mlp()
        opt = KFAC(
            model,
            lr=1.0,
            momentum=0.0,
            kfac_clip=1e9,
            kfac_damping=damping,
            kfac_inverse=inverse,
            kfac_update=100,
            kfac_refine=refine,
        )
        th.manual_seed(1)
        fit_statistics(model, opt, batches=1)
        opt.update_curvature()  # decomposed from the first batch only
        fit_statistics(model, opt, batches=3, n=8)  # the factors move on; no decomposition is due
        loss_and_grads(model, opt)
        layers = [model[0], model[2]]
        grads = [wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
        before = [wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
        opt.step()
        assert opt.counters["curvature_updates"] == 1
        steps = [old - wbar(layer, layer.weight.detach(), layer.bias.detach()) for layer, old in zip(layers, before)]
        return opt, grads, steps, [factors(opt, layer) for layer in layers]

    # exact damping of the current factors, whatever the preconditioner's mode
    opt, grads, steps, current = step_after_stale_decomposition(refine=30)
    for grad, step, (a, g) in zip(grads, steps, current):
        th.testing.assert_close(
            step, th.linalg.solve(dense_kfac([(a, g)], damping), grad.flatten()).reshape(grad.shape)
        )
    # without refinement the step follows the stale decomposition: the test above is not vacuous
    _, grads, stale_steps, current = step_after_stale_decomposition(refine=0)
    assert all(not th.allclose(a, b, rtol=1e-3, atol=0.0) for a, b in zip(steps, stale_steps))

    # a few iterations only: still V^T (A ⊗ G + λI) V = V^T ∇ (CG from zero), so the trust region stays exact
    opt, grads, steps, current = step_after_stale_decomposition(refine=2)
    vfv = sum(float(s.flatten() @ dense_kfac([f], damping) @ s.flatten()) for s, f in zip(steps, current))
    assert opt.last_vfv[0] == pytest.approx(vfv, rel=1e-9)
    assert opt.last_vfv[0] == pytest.approx(sum(float((s * g).sum()) for s, g in zip(steps, grads)), rel=1e-9)


def test_refinement_only_runs_when_statistics_came_after_the_decomposition(monkeypatch):
    model = mlp()
    opt = KFAC(model, kfac_update=2, kfac_refine=2)
    solver, refined = opt.preconditioner.solver, []
    original = solver.refine
    monkeypatch.setattr(solver, "refine", lambda *args: refined.append(opt.counters["steps"]) or original(*args))
    for new_statistics in (True, True, False, False):
        if new_statistics:
            fit_statistics(model, opt, batches=1)
        loss_and_grads(model, opt)
        opt.step()
    # step 1 decomposes its statistics, step 2 is not due (refined), step 3 decomposes step 2's, step 4 has no new
    # ones; one call per batch of same-shape blocks
    assert refined == [2, 2]


def test_refinement_keeps_a_zero_gradient_zero_and_a_nan_nan():
    model = mlp()
    opt = KFAC(model, lr=1.0, kfac_update=100, kfac_refine=3)
    fit_statistics(model, opt)
    opt.zero_grad()
    (model(th.randn(4, 3, dtype=th.float64))[:, 0] * 0.0).sum().backward()  # all gradients exactly zero
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.counters["skipped_steps"] == 0
    loss_and_grads(model, opt)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.counters["skipped_steps"] == 1
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), before))


def test_conv_step_matches_dense_solve():
    th.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    damping = 0.05
    opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9, kfac_damping=damping)
    for _ in range(3):
        with opt.collect():
            out = model(th.randn(16, 2, 5, 5, dtype=th.float64))
        opt.update_statistics(sample_loss(out, th.randn(16, 2, dtype=th.float64)))
    opt.zero_grad()
    (model(th.randn(8, 2, 5, 5, dtype=th.float64)) ** 3).sum().backward()
    grads = [wbar(layer, layer.weight.grad, layer.bias.grad) for layer in (conv, model[3])]
    before = [wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in (conv, model[3])]
    opt.step()
    for layer, grad, old in zip((conv, model[3]), grads, before):
        expected = th.linalg.solve(dense_kfac([factors(opt, layer)], damping), grad.flatten()).reshape(grad.shape)
        th.testing.assert_close(old - wbar(layer, layer.weight.detach(), layer.bias.detach()), expected)


def test_block_without_statistics_keeps_raw_gradient_beside_a_same_shape_block():
    th.manual_seed(0)
    model = nn.ModuleDict({"seen": nn.Linear(3, 2), "unseen": nn.Linear(3, 2)}).double()
    damping = 0.05
    opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9, kfac_damping=damping, kfac_refine=1)
    x = th.randn(32, 3, dtype=th.float64)
    with opt.collect():
        out = model["seen"](x)  # statistics of one of the two same-shape layers only
    opt.update_statistics(sample_loss(out, th.randn(32, 2, dtype=th.float64)))
    opt.zero_grad()
    ((model["seen"](x) ** 3).sum() + (model["unseen"](x) ** 3).sum()).backward()
    layers = [model["seen"], model["unseen"]]
    grads = [wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
    before = [wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
    opt.step()
    steps = [old - wbar(layer, layer.weight.detach(), layer.bias.detach()) for layer, old in zip(layers, before)]
    expected = th.linalg.solve(dense_kfac([factors(opt, model["seen"])], damping), grads[0].flatten()).reshape(
        grads[0].shape
    )
    th.testing.assert_close(steps[0], expected)
    th.testing.assert_close(steps[1], grads[1])


def test_precondition_returns_copies():
    model = mlp()
    opt = KFAC(model)
    fit_statistics(model, opt)
    params = list(model[2].parameters())
    first = opt.precondition(params, [th.ones_like(p) for p in params])
    kept = [v.clone() for v in first]
    opt.precondition(params, [th.randn_like(p) for p in params])
    opt.zero_grad()
    loss_and_grads(model, opt)
    opt.step()
    assert all(th.equal(v, k) for v, k in zip(first, kept))
