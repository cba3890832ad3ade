"""K-FAC on every model it accepts: empty batches, repeated and sequence locations, tied weights, in-place ops after
a layer and dtype changes, each against a dense float64 oracle (or refused with a clear error)."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC


def _mlp() -> nn.Sequential:
    th.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _sample_loss(out: th.Tensor, target: th.Tensor) -> th.Tensor:
    """A sum over samples of a per-sample loss that depends nonlinearly on the output."""
    return (th.tanh(out) * target).sum() + 0.3 * (out**2).sum()


def _homogeneous(a: th.Tensor) -> th.Tensor:
    return F.pad(a, (0, 1), value=1.0)


def _location_oracle(inputs: list[th.Tensor], deltas: list[th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
    """
    The factors by their definition, sample by sample and location by location: ``inputs[n]`` and ``deltas[n]`` hold
    the rows (layer inputs without the 1, gradients of the loss w.r.t. the layer output) of sample ``n`` at its ``T``
    locations; ``A = Σ_n Σ_t (ā/T)(ā/T)ᵀ / N``, ``G = T² Σ_n Σ_t δ δᵀ / (N T)``.
    """
    n, locations = len(inputs), inputs[0].shape[0]
    a_ref = sum(th.outer(a, a) for rows in inputs for a in _homogeneous(rows) / locations) / n
    g_ref = locations**2 * sum(th.outer(d, d) for rows in deltas for d in rows) / (n * locations)
    return a_ref, g_ref


def _state(opt: KFAC) -> dict[tuple[int, str], th.Tensor]:
    return {(i, key): value.clone() for i, p in enumerate(opt.param_groups[0]["params"]) for key, value in opt.state[p].items()}


def _dense_step(opt: KFAC, block_params: list[nn.Parameter], grads: list[th.Tensor], lr: float, damping: float) -> th.Tensor:
    """``lr (A ⊗ G + λI)⁻¹ ∇`` of a block (momentum 0, no clipping), in row-major vec of ``W̄ = [W, b]``."""
    a, g = opt.state[block_params[0]]["A"], opt.state[block_params[0]]["G"]
    wbar = th.cat([grads[0].reshape(grads[0].shape[0], -1), grads[1].reshape(-1, 1)], dim=1)
    dense = th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=th.float64)
    return lr * th.linalg.solve(dense, wbar.flatten())


def _applied_step(before: list[th.Tensor], params: list[nn.Parameter]) -> th.Tensor:
    weight, bias = (old - p.detach() for old, p in zip(before, params))
    return th.cat([weight.reshape(weight.shape[0], -1), bias.reshape(-1, 1)], dim=1).flatten()


# ---------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("statistics_before", [False, True])
def test_empty_batch_changes_nothing(statistics_before):
    model, twin = _mlp(), _mlp()
    opt, twin_opt = KFAC(model, lr=0.1), KFAC(twin, lr=0.1)
    gen = th.Generator().manual_seed(0)
    x, y = th.randn(8, 3, dtype=th.float64, generator=gen), th.randn(8, 2, dtype=th.float64, generator=gen)
    if statistics_before:
        for net, optimizer in ((model, opt), (twin, twin_opt)):
            with optimizer.collect():
                out = net(x)
            optimizer.update_statistics(_sample_loss(out, y))
    state, counters = _state(opt), dict(opt.counters)

    with opt.collect():
        out = model(th.zeros(0, 3, dtype=th.float64))
    with pytest.warns(UserWarning, match="no samples"):
        assert opt.update_statistics(_sample_loss(out, th.zeros(0, 2, dtype=th.float64))) is False
    assert opt.counters == counters
    after = _state(opt)
    assert after.keys() == state.keys() and all(th.equal(after[key], state[key]) for key in state)

    # the optimizer goes on exactly as one that never saw the empty batch (no NaN factor, no fallback)
    for net, optimizer in ((model, opt), (twin, twin_opt)):
        with optimizer.collect():
            out = net(x)
        optimizer.update_statistics(_sample_loss(out, y))
        optimizer.zero_grad()
        F.mse_loss(out, y).backward()
        optimizer.step()
    assert opt.counters == twin_opt.counters and opt.counters["decomposition_failures"] == 0
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert all(th.isfinite(value).all() for value in _state(opt).values())


def test_block_without_samples_keeps_its_factors():
    th.manual_seed(0)
    model = nn.ModuleDict({"seen": nn.Linear(3, 2), "empty": nn.Linear(3, 2)}).double()
    opt = KFAC(model)
    x = th.randn(6, 3, dtype=th.float64)
    with opt.collect():
        out = model["seen"](x)
        empty = model["empty"](x[:0])  # e.g. a branch no sample was routed to
    assert opt.update_statistics(_sample_loss(out, th.ones_like(out)) + _sample_loss(empty, th.ones_like(empty)))
    assert "A" not in opt.state[model["empty"].weight]
    th.testing.assert_close(opt.state[model["seen"].weight]["A"], _homogeneous(x).T @ _homogeneous(x) / 6)


# ---------------------------------------------------------------------- one convention: locations per sample
def test_linear_on_sequences_matches_the_location_definition():
    model = _mlp()
    opt = KFAC(model)
    n, locations = 4, 3
    x = th.randn(n, locations, 3, dtype=th.float64)
    target = th.randn(n, locations, 2, dtype=th.float64)

    def loss_fn(out: th.Tensor, target: th.Tensor) -> th.Tensor:  # mixes the locations of a sample
        return _sample_loss(out, target) + 0.5 * (out.sum(1) ** 2).sum()

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
        a_ref, g_ref = _location_oracle(*rows[layer])
        th.testing.assert_close(opt.state[layer.weight]["A"], a_ref)
        th.testing.assert_close(opt.state[layer.weight]["G"], g_ref)


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
    steps, factors = [], []
    for model, layer in ((conv_model, conv), (linear_model, linear)):
        opt = KFAC(model, lr=lr, momentum=0.0, kfac_clip=1e9, damping=damping)
        with opt.collect():
            out = model(x)
        opt.update_statistics(_sample_loss(out, target))
        opt.zero_grad()
        F.mse_loss(out, target).backward()
        grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
        opt.step()
        step = _applied_step(before, [layer.weight, layer.bias])
        th.testing.assert_close(step, _dense_step(opt, [layer.weight], grads, lr, damping))
        steps.append(step)
        factors.append((opt.state[layer.weight]["A"], opt.state[layer.weight]["G"]))
    # same function, same factors, same step (up to the order of the sums)
    th.testing.assert_close(factors[1][0], factors[0][0], rtol=1e-13, atol=1e-15)
    th.testing.assert_close(factors[1][1], factors[0][1], rtol=1e-13, atol=1e-15)
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
    opt.update_statistics(_sample_loss(out, target))

    inputs, deltas = [], []
    for i in range(n):  # each sample has two locations: its two calls
        pre_x, pre_y = model.shared(x[i : i + 1]), model.shared(y[i : i + 1])
        loss = _sample_loss(model.head(th.tanh(pre_x) * th.tanh(pre_y)), target[i : i + 1])
        d_x, d_y = th.autograd.grad(loss, [pre_x, pre_y])
        inputs.append(th.cat([x[i : i + 1], y[i : i + 1]]))
        deltas.append(th.cat([d_x, d_y]))
    a_ref, g_ref = _location_oracle(inputs, deltas)
    th.testing.assert_close(opt.state[model.shared.weight]["A"], a_ref)
    th.testing.assert_close(opt.state[model.shared.weight]["G"], g_ref)


def test_calls_that_disagree_on_the_sample_count_raise():
    th.manual_seed(0)
    model = TwoCalls().double()
    opt = KFAC(model)
    with opt.collect():
        out = model(th.randn(4, 3, dtype=th.float64), th.randn(1, 3, dtype=th.float64))  # broadcast to 4 samples
    with pytest.raises(ValueError, match="shared was called on 4 and on 1 samples"):
        opt.update_statistics(_sample_loss(out, th.ones_like(out)))
    assert all(not opt.state[p] for p in model.parameters()) and opt.counters["stats_updates"] == 0


def test_unbatched_inputs_are_one_sample():
    th.manual_seed(0)
    conv, linear = nn.Conv2d(2, 3, 3).double(), nn.Linear(4, 2).double()
    model = nn.ModuleDict(dict(conv=conv, linear=linear))
    image, vector = th.randn(2, 5, 5, dtype=th.float64), th.randn(4, dtype=th.float64)
    factors = []
    for batched in (False, True):
        opt = KFAC(model)
        with opt.collect():
            outs = [conv(image.unsqueeze(0) if batched else image), linear(vector.unsqueeze(0) if batched else vector)]
        opt.update_statistics(sum(_sample_loss(out, th.ones_like(out)) for out in outs))
        factors.append([opt.state[layer.weight][key] for layer in (conv, linear) for key in ("A", "G")])
    for unbatched, batched in zip(*factors):
        th.testing.assert_close(unbatched, batched, rtol=0, atol=0)


# ---------------------------------------------------------------------- tied weights
def _tied_pair(tie_bias: bool) -> nn.Sequential:
    th.manual_seed(0)
    encoder, decoder = nn.Linear(3, 3), nn.Linear(3, 3)
    decoder.weight = encoder.weight
    if tie_bias:
        decoder.bias = encoder.bias
    return nn.Sequential(encoder, nn.Tanh(), decoder).double()


def test_tied_weight_and_bias_are_one_block_fed_by_both_uses():
    model = _tied_pair(tie_bias=True)
    layer = model[0]
    lr, damping = 0.5, 0.05
    opt = KFAC(model, lr=lr, momentum=0.0, kfac_clip=1e9, damping=damping)
    assert [block.name for block in opt.blocks] == ["0, 2"]
    assert opt.blocks[0].modules == [model[0], model[2]]
    n = 6
    gen = th.Generator().manual_seed(0)
    x, target = th.randn(n, 3, dtype=th.float64, generator=gen), th.randn(n, 3, dtype=th.float64, generator=gen)
    with opt.collect():
        out = model(x)
    opt.update_statistics(_sample_loss(out, target))

    inputs, deltas = [], []
    for i in range(n):  # the two uses are two locations of each sample
        pre1 = layer(x[i : i + 1])
        hidden = th.tanh(pre1)
        pre2 = layer(hidden)
        d1, d2 = th.autograd.grad(_sample_loss(pre2, target[i : i + 1]), [pre1, pre2])
        inputs.append(th.cat([x[i : i + 1], hidden.detach()]))
        deltas.append(th.cat([d1, d2]))
    a_ref, g_ref = _location_oracle(inputs, deltas)
    th.testing.assert_close(opt.state[layer.weight]["A"], a_ref)
    th.testing.assert_close(opt.state[layer.weight]["G"], g_ref)

    # the step: the dense solve of the tied parameters' whole gradient (both uses)
    opt.zero_grad()
    F.mse_loss(model(x), target).backward()
    grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
    before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
    opt.step()
    th.testing.assert_close(_applied_step(before, [layer.weight, layer.bias]), _dense_step(opt, [layer.weight], grads, lr, damping))


def test_tied_modules_and_a_module_called_twice_are_the_same_block():
    tied = _tied_pair(tie_bias=True)
    twice = copy.deepcopy(tied)
    twice[2] = twice[0]  # one module, two calls
    results = []
    for model in (tied, twice):
        opt = KFAC(model, lr=0.3, momentum=0.0, kfac_clip=1e9)
        gen = th.Generator().manual_seed(1)
        x, target = th.randn(8, 3, dtype=th.float64, generator=gen), th.randn(8, 3, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(_sample_loss(out, target))
        opt.zero_grad()
        F.mse_loss(out, target).backward()
        opt.step()
        results.append([opt.state[model[0].weight][key] for key in ("A", "G")] + [p.detach() for p in model[0].parameters()])
    for a, b in zip(*results):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_tied_weight_with_different_biases_raises():
    with pytest.raises(ValueError, match="0 and 2 share their weight but not their bias"):
        KFAC(_tied_pair(tie_bias=False))
    model = _tied_pair(tie_bias=False)
    model[2].bias = None
    with pytest.raises(ValueError, match="0 and 2 share their weight"):
        KFAC(model)


class TiedEmbedding(nn.Module):
    """A language-model-style tie: the output layer's weight is the input embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(5, 4), nn.Linear(4, 5)
        self.out.weight = self.embed.weight

    def forward(self, tokens: th.Tensor) -> th.Tensor:
        return self.out(th.tanh(self.embed(tokens)))


def test_parameter_with_a_use_outside_its_block_raises():
    with pytest.raises(ValueError, match=r"weight of out is also used as embed\.weight"):
        KFAC(TiedEmbedding())
    # a bias shared by layers with different weights
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].bias = model[0].bias
    with pytest.raises(ValueError, match="0 and 2 share their bias but not their weight"):
        KFAC(model)
    # a tied pair of which only one module is covered
    model = _tied_pair(tie_bias=True)
    with pytest.raises(ValueError, match=r"weight of 0 is also used as 2\.weight"):
        KFAC(model, modules=[model[0]])
    # a weight shared with a layer K-FAC skips (grouped convolution)
    conv, grouped = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1, groups=2)
    grouped.weight = nn.Parameter(th.zeros(2, 1, 1, 1))
    grouped.bias = conv.bias
    with pytest.warns(UserWarning, match="grouped"), pytest.raises(ValueError, match=r"bias of 0 is also used as 1\.bias"):
        KFAC(nn.Sequential(conv, grouped))


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
    opt.update_statistics(_sample_loss(out, target))
    opt.zero_grad()
    _sample_loss(out, target).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    first, last = model[0], model[2]
    rows: dict[nn.Module, tuple[list[th.Tensor], list[th.Tensor]]] = {first: ([], []), last: ([], [])}
    for i in range(n):
        pre1 = first(x[i : i + 1])
        hidden = th.relu(pre1)
        pre2 = last(hidden)
        d1, d2 = th.autograd.grad(_sample_loss(pre2, target[i : i + 1]), [pre1, pre2])
        for layer, a, d in ((first, x[i : i + 1], d1), (last, hidden.detach(), d2)):
            rows[layer][0].append(a)
            rows[layer][1].append(d)
    for layer in (first, last):
        a_ref, g_ref = _location_oracle(*rows[layer])
        th.testing.assert_close(opt.state[layer.weight]["A"], a_ref)
        th.testing.assert_close(opt.state[layer.weight]["G"], g_ref)
    # collect() changes neither the forward nor the training gradient
    opt.zero_grad()
    reference_out = reference(x)
    _sample_loss(reference_out, target).backward()
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
        opt.update_statistics(_sample_loss(out, th.ones_like(out)))
    assert all(not opt.state[p] for p in model.parameters()) and opt.counters["stats_updates"] == 0


# ---------------------------------------------------------------------- dtype changes
def _train(model: nn.Module, opt: KFAC, steps: int, seed: int, dtype: th.dtype) -> None:
    gen = th.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = th.randn(16, 3, generator=gen, dtype=dtype), th.randn(16, 2, generator=gen, dtype=dtype)
        with opt.collect():
            out = model(x)
        opt.update_statistics(_sample_loss(out, y))
        opt.zero_grad()
        F.mse_loss(out, y).backward()
        opt.step()


@pytest.mark.parametrize("kwargs", [dict(kfac_update=1), dict(kfac_update=3), dict(async_decomposition=True)])
def test_state_follows_the_parameters_to_float64(kwargs):
    def float32_run() -> tuple[nn.Module, KFAC]:
        th.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        opt = KFAC(model, lr=0.1, kfac_clip=0.01, **kwargs)
        _train(model, opt, 2, seed=0, dtype=th.float32)
        return model, opt

    model, opt = float32_run()
    # the reference: a fresh float64 optimizer given the same state, converted by torch's loader
    reference_model, reference_opt = float32_run()
    reference_state = reference_opt.state_dict()  # (with async_decomposition: joins the reference's pending job)
    reference_model.double()
    reference_opt = KFAC(reference_model, lr=0.1, kfac_clip=0.01, **kwargs)
    reference_opt.load_state_dict(reference_state)

    model.double()  # the optimizer still holds float32 factors, decompositions and momentum
    for net, optimizer in ((model, opt), (reference_model, reference_opt)):
        _train(net, optimizer, 2, seed=1, dtype=th.float64)
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert opt.state[p].keys() == reference_opt.state[q].keys()
        for key, value in opt.state[p].items():
            assert value.dtype == th.float64 and th.equal(value, reference_opt.state[q][key]), key
    assert opt.counters == reference_opt.counters


def test_group_with_parameters_of_two_dtypes_raises_at_the_step():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = KFAC(model, lr=0.1)
    _train(model, opt, 1, seed=0, dtype=th.float32)
    model[2].double()
    for p in model.parameters():
        p.grad = th.zeros_like(p)
    with pytest.raises(TypeError, match="share one dtype and device"):
        opt.step()
