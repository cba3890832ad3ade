"""
One convention for every layer kind: the rows a layer sees for one sample are its locations (sequence positions, a
conv's output positions, the calls of a layer used several times), each checked against the per-location definition;
in-place ops after a layer and inputs modified in place.
"""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import applied_step, dense_step, factors, location_oracle, mlp, sample_loss, saved_state


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
