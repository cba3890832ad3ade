"""K-FAC statistics: the running factors against their per-sample, per-location definition; what is collected when."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import applied_step, dense_step, factors, homogeneous, location_oracle, mlp, sample_loss, saved_state


def test_linear_factors_match_per_sample_definition():
    model = mlp()
    opt = KFAC(model)
    x, target = th.randn(7, 3, dtype=th.float64), th.randn(7, 2, dtype=th.float64)
    with opt.collect():
        out = model(x)
    opt.update_statistics(sample_loss(out, target))

    # oracle: per-sample layer inputs and output gradients by explicit loops
    first, last = model[0], model[2]
    inputs = {first: [], last: []}
    deltas = {first: [], last: []}
    for i in range(7):
        pre1 = first(x[i : i + 1])
        h = th.tanh(pre1)
        pre2 = last(h)
        loss_i = sample_loss(pre2, target[i : i + 1])
        d1, d2 = th.autograd.grad(loss_i, [pre1, pre2])
        inputs[first].append(th.cat([x[i], th.ones(1, dtype=th.float64)]))
        inputs[last].append(th.cat([h[0].detach(), th.ones(1, dtype=th.float64)]))
        deltas[first].append(d1[0])
        deltas[last].append(d2[0])
    for layer in (first, last):
        a_ref = sum(th.outer(a, a) for a in inputs[layer]) / 7
        g_ref = sum(th.outer(d, d) for d in deltas[layer]) / 7
        a, g = factors(opt, layer)
        th.testing.assert_close(a, a_ref)
        th.testing.assert_close(g, g_ref)

    # second batch: running average with kfac_stats_decay
    a_old, g_old = (t.clone() for t in factors(opt, first))
    x2 = th.randn(4, 3, dtype=th.float64)
    with opt.collect():
        out = model(x2)
    opt.update_statistics(sample_loss(out, target[:4]))
    a_new = th.cat([x2, th.ones(4, 1, dtype=th.float64)], 1)
    a_new = a_new.T @ a_new / 4
    th.testing.assert_close(factors(opt, first)[0], 0.99 * a_old + 0.01 * a_new)
    assert not th.equal(factors(opt, first)[1], g_old)


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
    opt.update_statistics(sample_loss(out, target))

    # oracle: explicit patches from the zero-padded input, per sample and output position
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    out_ref = conv(x)
    delta = th.autograd.grad(sample_loss(out_ref, target), out_ref)[0]
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
    a, g = factors(opt, conv)
    th.testing.assert_close(a, a_ref.detach())
    th.testing.assert_close(g, g_ref)
    assert factors(opt, head) is None  # a layer outside the forward gets no statistics


def test_statistics_only_inside_collect_and_with_grad():
    model = mlp()
    opt = KFAC(model)
    x = th.randn(5, 3, dtype=th.float64)
    model(x)  # outside collect()
    with opt.collect():
        with th.no_grad():
            model(x)  # rollout-style forward: never counted
    with pytest.warns(UserWarning, match="no forward"):
        assert opt.update_statistics(th.zeros((), dtype=th.float64, requires_grad=True)) is False
    assert all(factors(opt, layer) is None for layer in (model[0], model[2]))
    assert opt.counters["stats_updates"] == 0

    with opt.collect():
        out = model(x)
    model(x)  # after collect(): not saved, statistics come from the 5 samples above only
    opt.update_statistics(sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    a_ref = th.cat([x, th.ones(5, 1, dtype=th.float64)], 1)
    th.testing.assert_close(factors(opt, model[0])[0], a_ref.T @ a_ref / 5)


def test_hooks_only_inside_collect():
    model = mlp()
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
    assert opt.update_statistics(sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    with pytest.raises(RuntimeError, match="boom"), opt.collect():
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in linears)

    opt.remove_hooks()
    with opt.collect():
        assert all(not m._forward_hooks for m in linears)
        out = model(x)
    with pytest.warns(UserWarning, match="no forward"):
        assert opt.update_statistics(sample_loss(out, th.randn(5, 2, dtype=th.float64))) is False
    assert opt.counters["stats_updates"] == 1


def test_statistics_leave_grad_untouched():
    model = mlp()
    opt = KFAC(model)
    model[0].weight.grad = th.full_like(model[0].weight, 3.0)
    x = th.randn(5, 3, dtype=th.float64)
    with opt.collect():
        out = model(x)
    opt.update_statistics(sample_loss(out, th.randn(5, 2, dtype=th.float64)))
    assert th.equal(model[0].weight.grad, th.full_like(model[0].weight, 3.0))
    assert model[2].weight.grad is None and model[0].bias.grad is None
    out.sum().backward()  # the graph was retained for the training loss
    assert model[2].weight.grad is not None


def test_non_finite_statistics_are_refused():
    model = mlp()
    opt = KFAC(model)
    with opt.collect():
        out = model(th.randn(4, 3, dtype=th.float64))
    opt.update_statistics(sample_loss(out, th.ones_like(out)))
    before = [t.clone() for layer in (model[0], model[2]) for t in factors(opt, layer)]
    with opt.collect():
        out = model(th.randn(4, 3, dtype=th.float64))
    with pytest.warns(UserWarning, match="non-finite"):
        assert not opt.update_statistics((out * float("inf")).sum())
    after = [t for layer in (model[0], model[2]) for t in factors(opt, layer)]
    assert all(th.equal(a, b) for a, b in zip(before, after))
    assert opt.counters["skipped_stats"] == 1 and opt.counters["stats_updates"] == 1


# ---------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("statistics_before", [False, True])
def test_empty_batch_changes_nothing(statistics_before):
    model, twin = mlp(), mlp()
    opt, twin_opt = KFAC(model, lr=0.1), KFAC(twin, lr=0.1)
    gen = th.Generator().manual_seed(0)
    x, y = th.randn(8, 3, dtype=th.float64, generator=gen), th.randn(8, 2, dtype=th.float64, generator=gen)
    if statistics_before:
        for net, optimizer in ((model, opt), (twin, twin_opt)):
            with optimizer.collect():
                out = net(x)
            optimizer.update_statistics(sample_loss(out, y))
    state, counters = saved_state(opt), opt.counters.as_dict()

    with opt.collect():
        out = model(th.zeros(0, 3, dtype=th.float64))
    with pytest.warns(UserWarning, match="no samples"):
        assert opt.update_statistics(sample_loss(out, th.zeros(0, 2, dtype=th.float64))) is False
    assert opt.counters.as_dict() == counters
    after = saved_state(opt)
    assert after.keys() == state.keys() and all(th.equal(after[key], state[key]) for key in state)

    # the optimizer goes on exactly as one that never saw the empty batch (no NaN factor, no fallback)
    for net, optimizer in ((model, opt), (twin, twin_opt)):
        with optimizer.collect():
            out = net(x)
        optimizer.update_statistics(sample_loss(out, y))
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
    assert opt.counters == twin_opt.counters and opt.counters["decomposition_failures"] == 0
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(th.isfinite(value).all() for value in saved_state(opt).values())


def test_block_without_samples_keeps_its_factors():
    th.manual_seed(0)
    model = nn.ModuleDict({"seen": nn.Linear(3, 2), "empty": nn.Linear(3, 2)}).double()
    opt = KFAC(model)
    x = th.randn(6, 3, dtype=th.float64)
    with opt.collect():
        out = model["seen"](x)
        empty = model["empty"](x[:0])  # e.g. a branch no sample was routed to
    assert opt.update_statistics(sample_loss(out, th.ones_like(out)) + sample_loss(empty, th.ones_like(empty)))
    assert factors(opt, model["empty"]) is None
    th.testing.assert_close(factors(opt, model["seen"])[0], homogeneous(x).T @ homogeneous(x) / 6)


# ---------------------------------------------------------------------- one convention: locations per sample
def test_linear_on_sequences_matches_the_location_definition():
    model = mlp()
    opt = KFAC(model)
    n, locations = 4, 3
    x = th.randn(n, locations, 3, dtype=th.float64)
    target = th.randn(n, locations, 2, dtype=th.float64)

    def loss_fn(out: th.Tensor, target: th.Tensor) -> th.Tensor:  # mixes the locations of a sample
        return sample_loss(out, target) + 0.5 * (out.sum(1) ** 2).sum()

    with opt.collect():
        out = model(x)
    opt.update_statistics(loss_fn(out, target))

    first, last = model[0], model[2]
    rows: dict[nn.Module, tuple[list[th.Tensor], list[th.Tensor]]] = {first: ([], []), last: ([], [])}
    for i in range(n):  # sample by sample: the loss is a sum over samples
        pre1 = first(x[i : i + 1])
        hidden = th.tanh(pre1)
        pre2 = last(hidden)
        d1, d2 = th.autograd.grad(loss_fn(pre2, target[i : i + 1]), [pre1, pre2])
        for layer, a, d in ((first, x[i], d1[0]), (last, hidden[0].detach(), d2[0])):
            rows[layer][0].append(a)
            rows[layer][1].append(d)
    for layer in (first, last):
        a_ref, g_ref = location_oracle(*rows[layer])
        a, g = factors(opt, layer)
        th.testing.assert_close(a, a_ref)
        th.testing.assert_close(g, g_ref)


class PerPixelLinear(nn.Module):
    """An nn.Linear applied to the channels of each pixel: the same function as a 1x1 Conv2d."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_linear_and_equivalent_1x1_conv_get_the_same_factors_and_step():
    th.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1).double()
    head = nn.Linear(2 * 4 * 5, 2).double()
    linear = nn.Linear(3, 2).double()
    with th.no_grad():
        linear.weight.copy_(conv.weight.view(2, 3))
        linear.bias.copy_(conv.bias)
    conv_model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    linear_model = nn.Sequential(PerPixelLinear(linear), nn.Tanh(), nn.Flatten(), copy.deepcopy(head))
    lr, damping = 0.5, 0.05
    gen = th.Generator().manual_seed(0)
    x, target = th.randn(6, 3, 4, 5, dtype=th.float64, generator=gen), th.randn(6, 2, dtype=th.float64, generator=gen)
    steps, all_factors = [], []
    for model, layer in ((conv_model, conv), (linear_model, linear)):
        opt = KFAC(model, lr=lr, momentum=0.0, kfac_clip=1e9, kfac_damping=damping)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, target))
        opt.zero_grad()
        F.mse_loss(out, target).backward()
        grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
        opt.step()
        step = applied_step(before, [layer.weight, layer.bias])
        th.testing.assert_close(step, dense_step(opt, layer, grads, lr, damping))
        steps.append(step)
        all_factors.append(factors(opt, layer))
    # same function, same factors, same step (up to the order of the sums)
    th.testing.assert_close(all_factors[1][0], all_factors[0][0], rtol=1e-13, atol=1e-15)
    th.testing.assert_close(all_factors[1][1], all_factors[0][1], rtol=1e-13, atol=1e-15)
    th.testing.assert_close(steps[1], steps[0], rtol=1e-12, atol=1e-15)


class TwoCalls(nn.Module):
    """One Linear applied to two inputs of the same samples."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: th.Tensor, y: th.Tensor) -> th.Tensor:
        return self.head(th.tanh(self.shared(x)) * th.tanh(self.shared(y)))


def test_layer_called_twice_gets_the_statistics_of_both_calls():
    th.manual_seed(0)
    model = TwoCalls().double()
    opt = KFAC(model)
    n = 5
    x, y, target = (th.randn(n, d, dtype=th.float64) for d in (3, 3, 2))
    with opt.collect():
        out = model(x, y)
    opt.update_statistics(sample_loss(out, target))

    inputs, deltas = [], []
    for i in range(n):  # each sample has two locations: its two calls
        pre_x, pre_y = model.shared(x[i : i + 1]), model.shared(y[i : i + 1])
        loss = sample_loss(model.head(th.tanh(pre_x) * th.tanh(pre_y)), target[i : i + 1])
        d_x, d_y = th.autograd.grad(loss, [pre_x, pre_y])
        inputs.append(th.cat([x[i : i + 1], y[i : i + 1]]))
        deltas.append(th.cat([d_x, d_y]))
    a_ref, g_ref = location_oracle(inputs, deltas)
    a, g = factors(opt, model.shared)
    th.testing.assert_close(a, a_ref)
    th.testing.assert_close(g, g_ref)


def test_calls_that_disagree_on_the_sample_count_raise():
    th.manual_seed(0)
    model = TwoCalls().double()
    opt = KFAC(model)
    with opt.collect():
        out = model(th.randn(4, 3, dtype=th.float64), th.randn(1, 3, dtype=th.float64))  # broadcast to 4 samples
    with pytest.raises(ValueError, match="shared was called on 4 and on 1 samples"):
        opt.update_statistics(sample_loss(out, th.ones_like(out)))
    assert not saved_state(opt) and opt.counters["stats_updates"] == 0


def test_unbatched_inputs_are_one_sample():
    th.manual_seed(0)
    conv, linear = nn.Conv2d(2, 3, 3).double(), nn.Linear(4, 2).double()
    model = nn.ModuleDict(dict(conv=conv, linear=linear))
    image, vector = th.randn(2, 5, 5, dtype=th.float64), th.randn(4, dtype=th.float64)
    results = []
    for batched in (False, True):
        opt = KFAC(model)
        with opt.collect():
            outs = [conv(image.unsqueeze(0) if batched else image), linear(vector.unsqueeze(0) if batched else vector)]
        opt.update_statistics(sum(sample_loss(out, th.ones_like(out)) for out in outs))
        results.append([t for layer in (conv, linear) for t in factors(opt, layer)])
    for unbatched, batched in zip(*results):
        th.testing.assert_close(unbatched, batched, rtol=0, atol=0)


# ---------------------------------------------------------------------- in-place ops after a layer
def test_inplace_activation_after_a_layer_keeps_its_statistics_exact():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    reference = nn.Sequential(model[0], nn.ReLU(), model[2])  # the same layers, out-of-place activation
    opt = KFAC(model)
    n = 7
    x, target = th.randn(n, 3, dtype=th.float64), th.randn(n, 2, dtype=th.float64)
    with opt.collect():
        out = model(x)
    opt.update_statistics(sample_loss(out, target))
    opt.zero_grad()
    sample_loss(out, target).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    first, last = model[0], model[2]
    rows: dict[nn.Module, tuple[list[th.Tensor], list[th.Tensor]]] = {first: ([], []), last: ([], [])}
    for i in range(n):
        pre1 = first(x[i : i + 1])
        hidden = th.relu(pre1)
        pre2 = last(hidden)
        d1, d2 = th.autograd.grad(sample_loss(pre2, target[i : i + 1]), [pre1, pre2])
        for layer, a, d in ((first, x[i : i + 1], d1), (last, hidden.detach(), d2)):
            rows[layer][0].append(a)
            rows[layer][1].append(d)
    for layer in (first, last):
        a_ref, g_ref = location_oracle(*rows[layer])
        a, g = factors(opt, layer)
        th.testing.assert_close(a, a_ref)
        th.testing.assert_close(g, g_ref)
    # collect() changes neither the forward nor the training gradient
    opt.zero_grad()
    reference_out = reference(x)
    sample_loss(reference_out, target).backward()
    assert th.equal(out, reference_out)
    assert all(th.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


class ModifiesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: th.Tensor) -> th.Tensor:
        out = self.second(th.tanh(self.first(x)))
        # after the first layer read it; no δ is taken through that layer's backward, so autograd does not notice
        x.mul_(2.0)
        return out


def test_layer_input_modified_in_place_after_the_forward_raises():
    th.manual_seed(0)
    model = ModifiesItsInput().double()
    opt = KFAC(model)
    with opt.collect():
        out = model(th.randn(5, 3, dtype=th.float64))
    with pytest.raises(RuntimeError, match="input of first was modified in place"):
        opt.update_statistics(sample_loss(out, th.ones_like(out)))
    assert not saved_state(opt) and opt.counters["stats_updates"] == 0
