"""K-FAC optimizer: factors, solves and the trust region against dense float64 oracles; bookkeeping; robustness."""

import copy
import io
import threading

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC


def _mlp() -> nn.Module:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _sample_loss(out: th.Tensor, target: th.Tensor) -> th.Tensor:
    """A per-sample loss with a nonlinear dependence on the output (sum over samples)."""
    return (th.tanh(out) * target).sum() + 0.3 * (out**2).sum()


def _dense_kfac(blocks_factors: list[tuple[th.Tensor, th.Tensor]], damping: float, extra: int = 0) -> th.Tensor:
    """Block-diagonal dense (A ⊗ G + λI) in row-major vec of W̄ = [W, b]; identity for ``extra`` raw coordinates."""
    mats = [th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=a.dtype) for a, g in blocks_factors]
    if extra:
        mats.append(th.eye(extra, dtype=th.float64))
    return th.block_diag(*mats)


def _wbar(layer: nn.Module, weight_part: th.Tensor, bias_part: th.Tensor) -> th.Tensor:
    return th.cat([weight_part.reshape(weight_part.shape[0], -1), bias_part.reshape(-1, 1)], dim=1)


def test_linear_factors_match_per_sample_definition():
    model = _mlp()
    opt = KFAC(model)
    x, target = th.randn(7, 3, dtype=th.float64), th.randn(7, 2, dtype=th.float64)
    with opt.collect():
        out = model(x)
    opt.update_statistics(_sample_loss(out, target))

    # oracle: per-sample layer inputs and output gradients by explicit loops
    first, last = model[0], model[2]
    inputs = {first: [], last: []}
    deltas = {first: [], last: []}
    for i in range(7):
        pre1 = first(x[i : i + 1])
        h = th.tanh(pre1)
        pre2 = last(h)
        loss_i = _sample_loss(pre2, target[i : i + 1])
        d1, d2 = th.autograd.grad(loss_i, [pre1, pre2])
        inputs[first].append(th.cat([x[i], th.ones(1, dtype=th.float64)]))
        inputs[last].append(th.cat([h[0].detach(), th.ones(1, dtype=th.float64)]))
        deltas[first].append(d1[0])
        deltas[last].append(d2[0])
    for layer in (first, last):
        a_ref = sum(th.outer(a, a) for a in inputs[layer]) / 7
        g_ref = sum(th.outer(d, d) for d in deltas[layer]) / 7
        th.testing.assert_close(opt.state[layer.weight]["A"], a_ref)
        th.testing.assert_close(opt.state[layer.weight]["G"], g_ref)

    # second batch: running average with stats_decay
    a_old, g_old = opt.state[first.weight]["A"].clone(), opt.state[first.weight]["G"].clone()
    x2 = th.randn(4, 3, dtype=th.float64)
    with opt.collect():
        out = model(x2)
    opt.update_statistics(_sample_loss(out, target[:4]))
    a_new = th.cat([x2, th.ones(4, 1, dtype=th.float64)], 1)
    a_new = a_new.T @ a_new / 4
    th.testing.assert_close(opt.state[first.weight]["A"], 0.99 * a_old + 0.01 * a_new)
    assert not th.equal(opt.state[first.weight]["G"], g_old)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, stride=1, padding=0, dilation=1),
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    ],
)
def test_conv_factors_match_per_sample_definition(conv_kwargs):
    th.manual_seed(1)
    conv = nn.Conv2d(2, 3, **conv_kwargs).double()
    head = nn.Linear(1, 1).double()  # not used: only the conv block is checked
    model = nn.ModuleDict(dict(conv=conv, head=head))
    opt = KFAC(model)
    n = 3
    x = th.randn(n, 2, 7, 6, dtype=th.float64)
    target = th.randn_like(conv(x))
    with opt.collect():
        out = model["conv"](x)
    opt.update_statistics(_sample_loss(out, target))

    # oracle: explicit patches from the zero-padded input, per sample and output position
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    out_ref = conv(x)
    delta = th.autograd.grad(_sample_loss(out_ref, target), out_ref)[0]
    ho, wo = out_ref.shape[2:]
    positions = ho * wo
    a_ref = th.zeros(2 * kh * kw + 1, 2 * kh * kw + 1, dtype=th.float64)
    g_ref = th.zeros(3, 3, dtype=th.float64)
    w_mat = conv.weight.reshape(3, -1)
    for i in range(n):
        for oy in range(ho):
            for ox in range(wo):
                patch = th.stack(
                    [padded[i, c, oy * sh + ky * dh, ox * sw + kx * dw] for c in range(2) for ky in range(kh) for kx in range(kw)]
                )
                # the oracle's patch layout is the one of weight.view(out, -1)
                th.testing.assert_close(w_mat @ patch + conv.bias, out_ref[i, :, oy, ox])
                a_bar = th.cat([patch, th.ones(1, dtype=th.float64)]) / positions
                a_ref += th.outer(a_bar, a_bar) / n
                d = delta[i, :, oy, ox]
                g_ref += positions**2 * th.outer(d, d) / (n * positions)
    th.testing.assert_close(opt.state[conv.weight]["A"], a_ref.detach())
    th.testing.assert_close(opt.state[conv.weight]["G"], g_ref)
    assert "A" not in opt.state[head.weight]  # a layer outside the forward gets no statistics


def _fit_statistics(model: nn.Module, opt: KFAC, batches: int = 3, n: int = 32) -> None:
    for _ in range(batches):
        x = th.randn(n, 3, dtype=th.float64)
        with opt.collect():
            out = model(x)
        opt.update_statistics(_sample_loss(out, th.randn(n, 2, dtype=th.float64)))


def _loss_and_grads(model: nn.Module, opt: KFAC) -> None:
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    (model(x) ** 3).sum().backward()


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_preconditioned_gradient_matches_dense_solve(inverse):
    model = _mlp()
    scale = nn.Parameter(th.ones(2, dtype=th.float64))  # outside any block: raw gradient
    damping = 0.05
    opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9, damping=damping, inverse=inverse, params=[*model.parameters(), scale])
    _fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    ((model(x) * scale) ** 3).sum().backward()
    layers = [model[0], model[2]]
    grads = [_wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
    scale_grad = scale.grad.clone()
    before = [_wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
    scale_before = scale.detach().clone()
    opt.step()
    assert opt.last_nu == [1.0]

    for layer, grad, old in zip(layers, grads, before):
        a, g = opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]
        if inverse == "eigen":
            dense = th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=th.float64)
        else:
            pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
            eye_a, eye_g = th.eye(a.shape[0], dtype=th.float64), th.eye(g.shape[0], dtype=th.float64)
            dense = th.kron(g + damping**0.5 / pi * eye_g, a + pi * damping**0.5 * eye_a)
        expected = th.linalg.solve(dense, grad.flatten()).reshape(grad.shape)
        step = old - _wbar(layer, layer.weight.detach(), layer.bias.detach())  # lr = 1, momentum 0
        th.testing.assert_close(step, expected)
        # the public preconditioner gives the same solve (weight and bias jointly)
        w_out, b_out = opt.precondition([layer.weight, layer.bias], [layer.weight.grad, layer.bias.grad])
        th.testing.assert_close(_wbar(layer, w_out, b_out), expected)
    th.testing.assert_close(scale_before - scale.detach(), scale_grad)
    assert opt.precondition([scale], [scale_grad])[0] is scale_grad


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_refinement_solves_the_current_factors_with_a_stale_decomposition(inverse):
    damping = 0.05

    def step_after_stale_decomposition(refine_iterations: int) -> tuple[KFAC, list, list, list]:
        model = _mlp()
        opt = KFAC(
            model, lr=1.0, momentum=0.0, kfac_clip=1e9, damping=damping, inverse=inverse, kfac_update=100,
            refine_iterations=refine_iterations,
        )
        th.manual_seed(1)
        _fit_statistics(model, opt, batches=1)
        opt.update_preconditioner()  # decomposed from the first batch only
        _fit_statistics(model, opt, batches=3, n=8)  # the factors move on; no decomposition is due
        _loss_and_grads(model, opt)
        layers = [model[0], model[2]]
        grads = [_wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
        before = [_wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
        opt.step()
        assert opt.counters["curvature_updates"] == 1
        steps = [old - _wbar(layer, layer.weight.detach(), layer.bias.detach()) for layer, old in zip(layers, before)]
        factors = [(opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]) for layer in layers]
        return opt, grads, steps, factors

    # exact damping of the current factors, whatever the preconditioner's mode
    opt, grads, steps, factors = step_after_stale_decomposition(refine_iterations=30)
    for grad, step, (a, g) in zip(grads, steps, factors):
        dense = th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=th.float64)
        th.testing.assert_close(step, th.linalg.solve(dense, grad.flatten()).reshape(grad.shape))
    # without refinement the step follows the stale decomposition: the test above is not vacuous
    _, grads, stale_steps, factors = step_after_stale_decomposition(refine_iterations=0)
    assert all(not th.allclose(a, b, rtol=1e-3, atol=0.0) for a, b in zip(steps, stale_steps))

    # a few iterations only: still V^T (A ⊗ G + λI) V = V^T ∇ (CG from zero), so the trust region stays exact
    opt, grads, steps, factors = step_after_stale_decomposition(refine_iterations=2)
    vfv = sum(float(s.flatten() @ _dense_kfac([f], damping) @ s.flatten()) for s, f in zip(steps, factors))
    assert opt.last_vfv[0] == pytest.approx(vfv, rel=1e-9)
    assert opt.last_vfv[0] == pytest.approx(sum(float((s * g).sum()) for s, g in zip(steps, grads)), rel=1e-9)


def test_refinement_only_runs_when_statistics_came_after_the_decomposition(monkeypatch):
    model = _mlp()
    opt = KFAC(model, kfac_update=2, refine_iterations=2)
    refined = []
    original = opt._refine
    monkeypatch.setattr(opt, "_refine", lambda *args: refined.append(opt.counters["steps"]) or original(*args))
    for new_statistics in (True, True, False, False):
        if new_statistics:
            _fit_statistics(model, opt, batches=1)
        _loss_and_grads(model, opt)
        opt.step()
    # step 1 decomposes its statistics, step 2 is not due (refined), step 3 decomposes step 2's, step 4 has no new
    # ones; one call per batch of same-shape blocks
    assert refined == [2, 2]


def test_refinement_keeps_a_zero_gradient_zero_and_a_nan_nan():
    model = _mlp()
    opt = KFAC(model, lr=1.0, kfac_update=100, refine_iterations=3)
    _fit_statistics(model, opt)
    opt.zero_grad()
    (model(th.randn(4, 3, dtype=th.float64))[:, 0] * 0.0).sum().backward()  # all gradients exactly zero
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.counters["skipped_steps"] == 0
    _loss_and_grads(model, opt)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.counters["skipped_steps"] == 1
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_quadratic_kl_within_clip(momentum):
    model = _mlp()
    log_std = nn.Parameter(th.zeros(2, dtype=th.float64))
    kfac_clip, damping, lr = 1e-3, 0.01, 0.5
    opt = KFAC(model, lr=lr, momentum=momentum, kfac_clip=kfac_clip, damping=damping, params=[*model.parameters(), log_std])
    _fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    ((model(x) * log_std.exp()) ** 3).sum().backward()
    before = {p: p.detach().clone() for p in opt.param_groups[0]["params"]}
    opt.step()
    assert 0 < opt.last_nu[0] < 1, "the clip should be active with this radius"
    deltas, factors = [], []
    for layer in (model[0], model[2]):
        deltas.append(_wbar(layer, layer.weight - before[layer.weight], layer.bias - before[layer.bias]).flatten())
        factors.append((opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]))
    deltas.append(log_std - before[log_std])
    delta = th.cat(deltas).detach()
    fisher = _dense_kfac(factors, damping, extra=2)  # log_std keeps its raw gradient: identity block
    quadratic = float(delta @ fisher @ delta)
    # the step is lr (1 - m) ν V with lr² ν² Vᵀ F V = kfac_clip on the boundary
    assert quadratic <= kfac_clip * (1 + 1e-6)
    assert quadratic == pytest.approx(kfac_clip * (1 - momentum) ** 2, rel=1e-6)


def test_decompositions_follow_statistics_that_come_less_often_than_steps():
    model = _mlp()
    opt = KFAC(model, kfac_update=3)
    for step in range(10):
        if step % 3 == 0:
            _fit_statistics(model, opt, batches=1)
        _loss_and_grads(model, opt)
        opt.step()
        # each statistics update is decomposed by the step that follows it, not up to kfac_update - 1 steps later
        assert opt.counters["stats_at_curvature"] == opt.counters["stats_updates"]
    assert opt.counters["curvature_updates"] == 4


def test_each_parameter_group_is_its_own_trust_region():
    model = _mlp()
    first, second = model[0], model[2]
    lr, damping, clips = 0.5, 0.01, (1e-3, 1e9)
    opt = KFAC(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        kfac_clip=clips[0],
        params=[{"params": first.parameters()}, {"params": second.parameters(), "kfac_clip": clips[1]}],
    )
    assert [group["kfac_clip"] for group in opt.param_groups] == list(clips)
    _fit_statistics(model, opt)
    opt.zero_grad()
    x = th.randn(16, 3, dtype=th.float64)
    (model(x) ** 3).sum().backward()
    grads = {layer: _wbar(layer, layer.weight.grad, layer.bias.grad) for layer in (first, second)}
    before = {layer: _wbar(layer, layer.weight, layer.bias).detach().clone() for layer in (first, second)}
    opt.step()
    assert 0 < opt.last_nu[0] < 1 and opt.last_nu[1] == 1.0, "only the first group's radius should bind"
    for index, layer in enumerate((first, second)):
        state = opt.state[layer.weight]
        fisher = _dense_kfac([(state["A"], state["G"])], damping)
        natural = th.linalg.solve(fisher, grads[layer].flatten())
        delta = (_wbar(layer, layer.weight, layer.bias).detach() - before[layer]).flatten()
        # each group steps along its own natural gradient, scaled by its own ν
        th.testing.assert_close(delta, -lr * opt.last_nu[index] * natural)
        assert opt.last_vfv[index] == pytest.approx(lr**2 * float(grads[layer].flatten() @ natural), rel=1e-6)
    assert opt.last_nu[0] ** 2 * opt.last_vfv[0] == pytest.approx(clips[0], rel=1e-6)  # on its boundary


def test_step_without_curvature_refresh_keeps_basis_and_schedule():
    model = _mlp()
    opt = KFAC(model, lr=0.1, kfac_update=1, cold_iter=2)
    _train_steps(model, opt, 1, seed=0)
    basis = opt.state[model[0].weight]["QA"].clone()
    _fit_statistics(model, opt)  # new statistics: a normal step would decompose them
    opt.zero_grad()
    (model(th.randn(8, 3, dtype=th.float64)) ** 2).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step(refresh_curvature=False)
    assert not th.equal(model[0].weight, before)
    assert th.equal(opt.state[model[0].weight]["QA"], basis)
    counters = opt.counters
    assert (counters["steps"], counters["updates"], counters["extra_steps"], counters["curvature_updates"]) == (1, 1, 1, 1)
    opt.step()  # still the second cold-start step, and now the basis is refreshed
    assert counters["curvature_updates"] == 2 and counters["updates"] == 2 and opt.last_nu == [1.0]


def test_conv_step_matches_dense_solve():
    th.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    damping = 0.05
    opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9, damping=damping)
    for _ in range(3):
        with opt.collect():
            out = model(th.randn(16, 2, 5, 5, dtype=th.float64))
        opt.update_statistics(_sample_loss(out, th.randn(16, 2, dtype=th.float64)))
    opt.zero_grad()
    (model(th.randn(8, 2, 5, 5, dtype=th.float64)) ** 3).sum().backward()
    grads = [_wbar(layer, layer.weight.grad, layer.bias.grad) for layer in (conv, model[3])]
    before = [_wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in (conv, model[3])]
    opt.step()
    for layer, grad, old in zip((conv, model[3]), grads, before):
        a, g = opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]
        expected = th.linalg.solve(_dense_kfac([(a, g)], damping), grad.flatten()).reshape(grad.shape)
        th.testing.assert_close(old - _wbar(layer, layer.weight.detach(), layer.bias.detach()), expected)


def test_block_without_statistics_keeps_raw_gradient_beside_a_same_shape_block():
    th.manual_seed(0)
    model = nn.ModuleDict({"seen": nn.Linear(3, 2), "unseen": nn.Linear(3, 2)}).double()
    damping = 0.05
    opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9, damping=damping, refine_iterations=1)
    x = th.randn(32, 3, dtype=th.float64)
    with opt.collect():
        out = model["seen"](x)  # statistics of one of the two same-shape layers only
    opt.update_statistics(_sample_loss(out, th.randn(32, 2, dtype=th.float64)))
    opt.zero_grad()
    ((model["seen"](x) ** 3).sum() + (model["unseen"](x) ** 3).sum()).backward()
    layers = [model["seen"], model["unseen"]]
    grads = [_wbar(layer, layer.weight.grad, layer.bias.grad) for layer in layers]
    before = [_wbar(layer, layer.weight.detach(), layer.bias.detach()).clone() for layer in layers]
    opt.step()
    steps = [old - _wbar(layer, layer.weight.detach(), layer.bias.detach()) for layer, old in zip(layers, before)]
    a, g = opt.state[model["seen"].weight]["A"], opt.state[model["seen"].weight]["G"]
    expected = th.linalg.solve(_dense_kfac([(a, g)], damping), grads[0].flatten()).reshape(grads[0].shape)
    th.testing.assert_close(steps[0], expected)
    th.testing.assert_close(steps[1], grads[1])


def test_parameters_without_gradient_keep_value_and_momentum():
    model = _mlp()
    opt = KFAC(model, lr=0.1, momentum=0.5, kfac_clip=0.01)
    _train_steps(model, opt, 3, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1, momentum=0.5, kfac_clip=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    first_before = [p.detach().clone() for p in model[0].parameters()]
    first_buffers = [opt.state[p]["momentum_buffer"].clone() for p in model[0].parameters()]
    x = th.randn(16, 3, dtype=th.float64)
    for net, optimizer in ((model, opt), (twin, twin_opt)):
        optimizer.zero_grad()
        (net[2](th.tanh(net[0](x)).detach()) ** 2).sum().backward()  # no gradient reaches the first layer
    for p in twin[0].parameters():
        p.grad = th.zeros_like(p)  # the twin gets zeros instead
    opt.step()
    twin_opt.step()
    # the last layer steps the same (a zero gradient adds nothing to the trust region) ...
    assert opt.last_vfv == pytest.approx(twin_opt.last_vfv, rel=1e-12)
    for p, q in zip(model[2].parameters(), twin[2].parameters()):
        th.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    # ... but only a zero gradient moves the first layer (by its decaying momentum)
    for p, old, buffer in zip(model[0].parameters(), first_before, first_buffers):
        assert th.equal(p, old) and th.equal(opt.state[p]["momentum_buffer"], buffer)
    assert not th.equal(twin[0].weight, first_before[0])


def test_precondition_returns_copies():
    model = _mlp()
    opt = KFAC(model)
    _fit_statistics(model, opt)
    params = list(model[2].parameters())
    first = opt.precondition(params, [th.ones_like(p) for p in params])
    kept = [v.clone() for v in first]
    opt.precondition(params, [th.randn_like(p) for p in params])
    opt.zero_grad()
    _loss_and_grads(model, opt)
    opt.step()
    assert all(th.equal(v, k) for v, k in zip(first, kept))


def test_added_parameter_group_is_its_own_trust_region():
    model = _mlp()
    opt = KFAC(model, lr=0.1, kfac_clip=0.01)
    _train_steps(model, opt, 2, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1, kfac_clip=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    extra = nn.Parameter(th.zeros(3, dtype=th.float64))
    opt.add_param_group({"params": [extra]})
    _train_steps(twin, twin_opt, 1, seed=1)
    gen = th.Generator().manual_seed(1)
    x, y = th.randn(16, 3, dtype=th.float64, generator=gen), th.randn(16, 2, dtype=th.float64, generator=gen)
    with opt.collect():
        out = model(x)
    opt.update_statistics(_sample_loss(out, y))
    opt.zero_grad()
    (F.mse_loss(out, y) + (extra * th.tensor([1.0, 2.0, 3.0], dtype=th.float64)).sum()).backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):  # the model's momentum moved into the new buffers
        th.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    nu = min(1.0, (0.01 / (0.1**2 * 14.0)) ** 0.5)  # raw gradient (1, 2, 3): Vᵀ∇ = 14
    th.testing.assert_close(extra.detach(), -0.1 * (1 - 0.9) * nu * th.tensor([1.0, 2.0, 3.0], dtype=th.float64))


def test_loaded_state_is_a_copy():
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    _train_steps(model, opt, 2, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1)
    twin_opt.load_state_dict(opt.state_dict())  # in memory: torch's loader would keep these very tensors
    loaded = {key: value.clone() for key, value in twin_opt.state[twin[0].weight].items()}
    _train_steps(model, opt, 1, seed=1)  # updates the source's factors and momentum in place
    for key, value in loaded.items():
        assert th.equal(twin_opt.state[twin[0].weight][key], value), key


def test_parameter_groups_survive_state_dict():
    model = _mlp()
    groups = [{"params": model[0].parameters(), "kfac_clip": 0.01}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = KFAC(model, lr=0.1, params=groups)
    _train_steps(model, opt, 2, seed=0)
    other = _mlp()
    restored = KFAC(other, params=[{"params": other[0].parameters()}, {"params": other[2].parameters()}])
    restored.load_state_dict(opt.state_dict())
    for group, expected in zip(restored.param_groups, opt.param_groups):
        assert group["kfac_clip"] == expected["kfac_clip"] and group["lr"] == expected["lr"]
    # state saved before groups had their own radius: every group gets the optimizer's kfac_clip
    legacy = opt.state_dict()
    for group in legacy["param_groups"]:
        del group["kfac_clip"]
    restored.load_state_dict(legacy)
    assert [group["kfac_clip"] for group in restored.param_groups] == [restored.kfac_clip] * 2


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
    model = _mlp()
    with pytest.raises(error, match=name):
        KFAC(model, params=params(model))


def test_statistics_only_inside_collect_and_with_grad():
    model = _mlp()
    opt = KFAC(model)
    x = th.randn(5, 3, dtype=th.float64)
    model(x)  # outside collect()
    with opt.collect():
        with th.no_grad():
            model(x)  # rollout-style forward: never counted
    with pytest.warns(UserWarning, match="no forward"):
        assert opt.update_statistics(th.zeros((), dtype=th.float64, requires_grad=True)) is False
    assert all("A" not in opt.state[p] for p in model.parameters())
    assert opt.counters["stats_updates"] == 0

    with opt.collect():
        out = model(x)
    model(x)  # after collect(): not saved, statistics come from the 5 samples above only
    opt.update_statistics(_sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    a_ref = th.cat([x, th.ones(5, 1, dtype=th.float64)], 1)
    th.testing.assert_close(opt.state[model[0].weight]["A"], a_ref.T @ a_ref / 5)



def test_hooks_only_inside_collect():
    model = _mlp()
    opt = KFAC(model)
    linears = [model[0], model[2]]
    assert all(not m._forward_hooks for m in linears)  # rollout forwards take the hook-free call path
    x = th.randn(5, 3, dtype=th.float64)
    with opt.collect():
        assert all(len(m._forward_hooks) == 1 for m in linears)
        with opt.collect():  # nested: the same hooks, the inner context saves afresh
            assert all(len(m._forward_hooks) == 1 for m in linears)
            out = model(x)
        assert all(len(m._forward_hooks) == 1 for m in linears)
    assert all(not m._forward_hooks for m in linears)
    assert opt.update_statistics(_sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    with pytest.raises(RuntimeError, match="boom"), opt.collect():
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in linears)

    opt.remove_hooks()
    with opt.collect():
        assert all(not m._forward_hooks for m in linears)
        out = model(x)
    with pytest.warns(UserWarning, match="no forward"):
        assert opt.update_statistics(_sample_loss(out, th.randn(5, 2, dtype=th.float64))) is False
    assert opt.counters["stats_updates"] == 1


def test_statistics_leave_grad_untouched():
    model = _mlp()
    opt = KFAC(model)
    model[0].weight.grad = th.full_like(model[0].weight, 3.0)
    x = th.randn(5, 3, dtype=th.float64)
    with opt.collect():
        out = model(x)
    opt.update_statistics(_sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    assert th.equal(model[0].weight.grad, th.full_like(model[0].weight, 3.0))
    assert model[2].weight.grad is None and model[0].bias.grad is None
    out.sum().backward()  # the graph was retained for the training loss
    assert model[2].weight.grad is not None


def _regression_step(model: nn.Module, opt: KFAC, x: th.Tensor, y: th.Tensor) -> None:
    """One K-FAC step on the MSE loss, statistics from the sampled unit-Gaussian Fisher loss of the output."""
    with opt.collect():
        out = model(x)
    opt.update_statistics(((out - (out + th.randn_like(out)).detach()) ** 2).sum())
    opt.zero_grad()
    F.mse_loss(out, y).backward()
    opt.step()


def _train_steps(model: nn.Module, opt: KFAC, steps: int, seed: int) -> None:
    gen = th.Generator().manual_seed(seed)
    for _ in range(steps):
        x = th.randn(16, 3, dtype=th.float64, generator=gen)
        y = th.randn(16, 2, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(_sample_loss(out, y))
        opt.zero_grad()
        F.mse_loss(out, y).backward()
        opt.step()


def test_state_dict_round_trip():
    model = _mlp()
    opt = KFAC(model, lr=0.1, kfac_update=3)
    _train_steps(model, opt, 4, seed=0)
    buffer = io.BytesIO()
    th.save(opt.state_dict(), buffer)
    buffer.seek(0)

    clone = copy.deepcopy(model)
    opt2 = KFAC(clone, lr=0.1, kfac_update=3)
    opt2.load_state_dict(th.load(buffer, weights_only=False))
    assert opt2.counters == opt.counters
    for p, q in zip(model.parameters(), clone.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key in opt.state[p]:
            assert th.equal(opt.state[p][key], opt2.state[q][key]), key
    assert {"A", "G", "QA", "QG", "dA", "dG", "momentum_buffer"} <= set(opt2.state[clone[0].weight])
    # identical continuation (eigenbasis refresh period included)
    _train_steps(model, opt, 4, seed=1)
    _train_steps(clone, opt2, 4, seed=1)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert th.equal(p, q)


def test_supervised_classification_loss_drops():
    th.manual_seed(0)
    n, classes = 256, 3
    centers = th.randn(classes, 2) * 2.0
    labels = th.randint(classes, (n,))
    x = centers[labels] + 0.7 * th.randn(n, 2)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, classes))
    opt = KFAC(model, lr=0.1, kfac_clip=0.01, kfac_update=2)
    initial = F.cross_entropy(model(x), labels).item()
    for _ in range(40):
        with opt.collect():
            logits = model(x)
        sampled = th.distributions.Categorical(logits=logits.detach()).sample()
        opt.update_statistics(F.cross_entropy(logits, sampled, reduction="sum"))
        opt.zero_grad()
        F.cross_entropy(logits, labels).backward()
        opt.step()
    final = F.cross_entropy(model(x), labels).item()
    assert final < 0.3 * initial, (initial, final)


def test_conv_model_trains_and_grouped_conv_is_skipped():
    th.manual_seed(0)
    with pytest.warns(UserWarning, match="grouped convolution"):
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 1),
        )
        opt = KFAC(model, lr=0.1, kfac_clip=0.01)
    assert [block.name for block in opt.blocks] == ["0", "4"]
    x, y = th.randn(32, 2, 8, 8), th.randn(32, 1)
    initial = F.mse_loss(model(x), y).item()
    for _ in range(30):
        _regression_step(model, opt, x, y)
    assert F.mse_loss(model(x), y).item() < 0.7 * initial


def test_non_finite_gradient_never_reaches_parameters():
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    _train_steps(model, opt, 2, seed=0)
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
    assert all(th.isfinite(opt.state[block.weight]["A"]).all() for block in opt.blocks)


def test_decomposition_failure_keeps_previous_basis(monkeypatch):
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    _train_steps(model, opt, 1, seed=0)
    basis = opt.state[model[0].weight]["QA"].clone()

    def broken_eigh(*args, **kwargs):
        raise th.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(th.linalg, "eigh", broken_eigh)
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        _train_steps(model, opt, 1, seed=1)
    assert opt.counters["decomposition_failures"] == 4  # A and G of two layers
    assert th.equal(opt.state[model[0].weight]["QA"], basis)


def test_same_size_factors_decompose_together_and_a_bad_one_fails_alone():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    opt = KFAC(model, lr=0.1)
    gen = th.Generator().manual_seed(0)
    with opt.collect():
        out = model(th.randn(32, 4, dtype=th.float64, generator=gen))
    opt.update_statistics(_sample_loss(out, th.randn(32, 4, dtype=th.float64, generator=gen)))
    opt.update_preconditioner()  # three 5x5 A and three 4x4 G factors: one batched eigh per size
    for layer in (model[0], model[2], model[4]):
        state = opt.state[layer.weight]
        for key, d_key, q_key in (("A", "dA", "QA"), ("G", "dG", "QG")):
            dense = state[q_key] @ th.diag(state[d_key]) @ state[q_key].T
            assert th.allclose(dense, state[key], atol=1e-12)
    previous = opt.state[model[2].weight]["QA"].clone()
    for layer in (model[0], model[4]):
        opt.state[layer.weight]["A"].mul_(2.0)
    opt.state[model[2].weight]["A"].fill_(float("nan"))
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.update_preconditioner()
    assert opt.counters["decomposition_failures"] == 1
    assert th.equal(opt.state[model[2].weight]["QA"], previous)
    for layer in (model[0], model[4]):  # decomposed anyway, one by one
        state = opt.state[layer.weight]
        assert th.allclose(state["QA"] @ th.diag(state["dA"]) @ state["QA"].T, state["A"], atol=1e-12)


def test_cold_start_is_clipped_momentum_sgd():
    model = _mlp()
    opt = KFAC(model, lr=0.5, momentum=0.0, cold_iter=1, cold_max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    _train_steps(model, opt, 1, seed=0)
    step_norm = th.cat([(p.detach() - old).flatten() for p, old in zip(model.parameters(), before)]).norm()
    assert float(step_norm.detach()) == pytest.approx(0.5 * 1e-3, rel=1e-3)


def test_learning_rate_is_read_from_param_groups():
    steps = []
    for lr in (0.1, 0.2):
        model = _mlp()
        opt = KFAC(model, lr=1.0, momentum=0.0, kfac_clip=1e9)
        opt.param_groups[0]["lr"] = lr
        before = model[0].weight.detach().clone()
        _train_steps(model, opt, 1, seed=0)
        steps.append(model[0].weight.detach() - before)
    th.testing.assert_close(steps[1], 2 * steps[0])


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(stats_decay=1.5), ValueError, "stats_decay"),
        (dict(damping=0.0), ValueError, "damping"),
        (dict(kfac_clip=-1.0), ValueError, "kfac_clip"),
        (dict(kfac_update=0), ValueError, "kfac_update"),
        (dict(kfac_update=1.5), TypeError, "kfac_update"),
        (dict(cold_iter=-1), ValueError, "cold_iter"),
        (dict(weight_decay="0.1"), TypeError, "weight_decay"),
        (dict(inverse="cholesky"), ValueError, "inverse"),
        (dict(refine_iterations=-1), ValueError, "refine_iterations"),
        (dict(refine_iterations=1.5), TypeError, "refine_iterations"),
        (dict(modules=[nn.ReLU()]), TypeError, "modules"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        KFAC(_mlp(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        KFAC([nn.Parameter(th.zeros(1))])  # type: ignore[arg-type]


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_low_rank_input_factor_is_exact_when_rank_suffices(inverse):
    th.manual_seed(3)
    layer = nn.Linear(30, 4).double()
    damping = 0.02
    opt = KFAC(layer, lr=1.0, momentum=0.0, kfac_clip=1e9, damping=damping, inverse=inverse, low_rank=8, low_rank_min_dim=10)
    x = th.randn(6, 30, dtype=th.float64)  # A = mean ā āᵀ has rank 6 <= low_rank
    with opt.collect():
        out = layer(x)
    opt.update_statistics(_sample_loss(out, th.randn(6, 4, dtype=th.float64)))
    opt.update_preconditioner()
    assert opt.state[layer.weight]["QA"].shape == (31, 8)
    grad_w, grad_b = th.randn(4, 30, dtype=th.float64), th.randn(4, dtype=th.float64)
    w_out, b_out = opt.precondition([layer.weight, layer.bias], [grad_w, grad_b])
    a, g = opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]
    if inverse == "eigen":
        dense = th.kron(g, a) + damping * th.eye(4 * 31, dtype=th.float64)
    else:
        pi = ((a.trace() / 31) / (g.trace() / 4)).sqrt()
        dense = th.kron(g + damping**0.5 / pi * th.eye(4, dtype=th.float64), a + pi * damping**0.5 * th.eye(31, dtype=th.float64))
    expected = th.linalg.solve(dense, _wbar(layer, grad_w, grad_b).flatten()).reshape(4, 31)
    th.testing.assert_close(_wbar(layer, w_out, b_out), expected)


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
    _regression_step(model, opt, th.randn(16, 3), th.randn(16, 2))
    assert th.float64 in dtypes and opt.counters["decomposition_failures"] == 0
    assert opt.state[model[0].weight]["QA"].dtype == th.float32
    assert opt.counters["updates"] == 1


def test_weight_decay_enters_the_gradient():
    scale = nn.Parameter(th.full((3,), 2.0, dtype=th.float64))
    holder = nn.Module()
    holder.scale = scale  # no K-FAC block: raw (decayed) gradient
    opt = KFAC(holder, lr=0.5, momentum=0.0, kfac_clip=1e9, weight_decay=0.1)
    scale.grad = th.zeros_like(scale)
    opt.step()
    th.testing.assert_close(scale.detach(), th.full((3,), 2.0 - 0.5 * 0.1 * 2.0, dtype=th.float64))


# ---------------------------------------------------------------------- background (async) decompositions
_DECOMPOSITION_KEYS = ("QA", "dA", "QG", "dG", "A_inv", "G_inv")


def _decompositions(opt: KFAC) -> list[th.Tensor]:
    return [opt.state[b.weight][k].clone() for b in opt.blocks for k in _DECOMPOSITION_KEYS if k in opt.state[b.weight]]


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_async_decomposition_equals_synchronous_one_update_late(inverse):
    model = _mlp()
    opt = KFAC(model, lr=0.1, inverse=inverse, async_decomposition=True)
    _train_steps(model, opt, 1, seed=0)  # the first decomposition is synchronous
    assert opt._pending is None and opt.counters["curvature_updates"] == 1
    first = _decompositions(opt)
    _train_steps(model, opt, 1, seed=1)
    # the second step used the first basis and started decomposing a snapshot of the new factors
    assert opt._pending is not None and opt.counters["curvature_updates"] == 1
    assert all(th.equal(a, b) for a, b in zip(first, _decompositions(opt)))
    factors = [(opt.state[b.weight]["A"].clone(), opt.state[b.weight]["G"].clone()) for b in opt.blocks]
    opt._join_pending()
    assert opt.counters["curvature_updates"] == 2 and opt.counters["stats_at_curvature"] == 2
    background = _decompositions(opt)
    assert not all(th.equal(a, b) for a, b in zip(first, background))
    # a synchronous decomposition of the same factors gives the same result
    opt.update_preconditioner()
    for block, (a, g) in zip(opt.blocks, factors):
        assert th.equal(opt.state[block.weight]["A"], a) and th.equal(opt.state[block.weight]["G"], g)
    for a, b in zip(background, _decompositions(opt)):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_async_snapshot_is_not_affected_by_later_statistics():
    model = _mlp()
    opt = KFAC(model, lr=0.1, async_decomposition=True)
    _train_steps(model, opt, 2, seed=0)  # a job on the factors after 2 statistics updates is pending
    snapshot = [(opt.state[b.weight]["A"].clone(), opt.state[b.weight]["G"].clone()) for b in opt.blocks]
    _fit_statistics(model, opt, batches=2)  # in-place updates of the live factors
    opt._join_pending()
    for block, (a, g) in zip(opt.blocks, snapshot):
        d_a, q_a = th.linalg.eigh(a)
        d_g, q_g = th.linalg.eigh(g)
        state = opt.state[block.weight]
        # Q diag(d) Qᵀ reproduces the snapshot, not the updated factors (eigenvalues clamped at 1e-6 only)
        th.testing.assert_close(state["QA"] @ th.diag(state["dA"]) @ state["QA"].T, a, atol=1e-6, rtol=0)
        th.testing.assert_close(state["QG"] @ th.diag(state["dG"]) @ state["QG"].T, g, atol=1e-6, rtol=0)
        th.testing.assert_close(state["dG"], th.where(d_g < 1e-6, 0.0, d_g))
        assert not th.allclose(state["QA"] @ th.diag(state["dA"]) @ state["QA"].T, state["A"], atol=1e-6)
    assert opt.counters["stats_at_curvature"] == 2 and opt.counters["stats_updates"] == 4


def test_async_is_deterministic_and_state_dict_during_pending_job():
    models = [_mlp() for _ in range(3)]
    opts = [KFAC(m, lr=0.1, kfac_update=1, async_decomposition=True) for m in models]
    for model, opt in zip(models, opts):
        _train_steps(model, opt, 4, seed=0)
    assert all(opt._pending is not None for opt in opts)
    # determinism: same data, same result
    assert all(th.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))

    # save while a job is pending: state_dict() joins it; load into an optimizer that has its own pending job
    buffer = io.BytesIO()
    th.save(opts[0].state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(models[0])
    opt_clone = KFAC(clone, lr=0.1, async_decomposition=True)
    _train_steps(clone, opt_clone, 3, seed=5)
    assert opt_clone._pending is not None
    opt_clone.load_state_dict(th.load(buffer, weights_only=False))
    assert opt_clone._pending is None and opt_clone.counters == opts[0].counters
    with th.no_grad():
        for p, q in zip(models[0].parameters(), clone.parameters()):
            q.copy_(p)

    # continuations: after save, after load, and uninterrupted (no state_dict call) all agree
    for model, opt in ((models[0], opts[0]), (clone, opt_clone), (models[1], opts[1])):
        _train_steps(model, opt, 4, seed=1)
    for p, q, r in zip(models[0].parameters(), clone.parameters(), models[1].parameters()):
        assert th.equal(p, q) and th.equal(p, r)


def test_async_decomposition_failure_is_reported_in_the_caller(monkeypatch):
    model = _mlp()
    opt = KFAC(model, lr=0.1, async_decomposition=True)
    _train_steps(model, opt, 1, seed=0)
    basis = opt.state[model[0].weight]["QA"].clone()

    def broken_eigh(*args, **kwargs):
        raise th.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(th.linalg, "eigh", broken_eigh)
    _train_steps(model, opt, 1, seed=1)  # submits the (failing) job
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt._join_pending()
    assert opt.counters["decomposition_failures"] == 4
    assert th.equal(opt.state[model[0].weight]["QA"], basis)


def test_async_worker_only_runs_one_batched_eigh_per_factor_size(monkeypatch):
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()  # A: 5x5 twice, G: 4x4 twice
    opt = KFAC(model, lr=0.1, kfac_update=1, async_decomposition=True)
    original, calls = th.linalg.eigh, []

    def recording_eigh(mat, *args, **kwargs):
        calls.append((threading.current_thread() is threading.main_thread(), tuple(mat.shape)))
        return original(mat, *args, **kwargs)

    monkeypatch.setattr(th.linalg, "eigh", recording_eigh)
    gen = th.Generator().manual_seed(0)
    for step in range(3):
        with opt.collect():
            out = model(th.randn(16, 4, dtype=th.float64, generator=gen))
        opt.update_statistics(_sample_loss(out, th.randn(16, 4, dtype=th.float64, generator=gen)))
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()
        opt._join_pending()
        in_main = sorted(shape for main, shape in calls if main)
        in_worker = sorted(shape for main, shape in calls if not main)
        # the first decomposition is synchronous, the next ones run in the worker: one call per factor size
        batched = [(2, 4, 4), (2, 5, 5)]
        assert (in_main, in_worker) == ((batched, []) if step == 0 else ([], batched))
        calls.clear()


def test_async_bad_argument():
    with pytest.raises(TypeError, match="async_decomposition"):
        KFAC(_mlp(), async_decomposition="yes")  # type: ignore[arg-type]
