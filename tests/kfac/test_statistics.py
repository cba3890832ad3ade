"""K-FAC statistics: the running factors against their per-sample, per-location definition; what is collected when."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC, Conv2dBlock
from sb3_trpo_kfac.common.kfac.products import GRAM_PANEL

from .conftest import factors, homogeneous, mlp, sample_loss, saved_state


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
                    [
                        padded[i, c, oy * sh + ky * dh, ox * sw + kx * dw]
                        for c in range(2)
                        for ky in range(kh)
                        for kx in range(kw)
                    ]
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


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [2, 8, 16])  # 18, 72 and 144 patch entries: one, two and three panels
def test_conv_input_moment_from_one_triangle_equals_the_product_of_the_padded_rows(bias, channels):
    th.manual_seed(0)
    conv = nn.Conv2d(channels, 3, 3, stride=2, padding=1, bias=bias).double()
    x = th.randn(4, channels, 9, 9, dtype=th.float64)
    rows = Conv2dBlock.patches(conv, x)
    assert (GRAM_PANEL < rows.shape[1]) == (channels > 2)
    if bias:
        rows = homogeneous(rows)
    moment = Conv2dBlock("conv", conv).patch_moment(Conv2dBlock.patch_matrix(conv, x))
    th.testing.assert_close(moment, rows.T @ rows)


def test_a_large_input_moment_is_written_into_the_last_folded_one_and_the_average_stays_exact():
    th.manual_seed(0)
    layer = nn.Linear(1024, 2).double()  # A is 1025 x 1025: large enough to be kept as a spare
    opt = KFAC(layer, kfac_stats_decay=0.9)
    expected = None
    for step in range(3):
        x = th.randn(5, 1024, dtype=th.float64)
        with opt.collect():
            out = layer(x)
        opt.update_statistics(sample_loss(out, th.zeros_like(out)))
        batch = homogeneous(x).T @ homogeneous(x) / 5
        expected = batch if expected is None else 0.9 * expected + 0.1 * batch
        th.testing.assert_close(factors(opt, layer)[0], expected)
        spares = opt.preconditioner.statistics._spares
        # after the first update the batch moment became the running factor; afterwards it is kept for the next one
        assert len(spares) == (0 if step == 0 else 1)
        if step == 1:
            spare = spares[0].data_ptr()
        if step == 2:
            assert spares[0].data_ptr() == spare and factors(opt, layer)[0].data_ptr() != spare


class _TwoHeads(nn.Module):
    """An actor and a critic head on shared features, as SB3's CnnPolicy: both heads' input factors are equal."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.actor, self.critic = nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(5, 1)

    def forward(self, x: th.Tensor) -> th.Tensor:
        features = th.tanh(self.features(x))
        return th.cat([self.actor(features), self.critic(features)], 1)


def _fit(model: nn.Module, opt: KFAC, batches: int, seed: int) -> None:
    gen = th.Generator().manual_seed(seed)
    for _ in range(batches):
        x = th.randn(6, 3, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, th.randn(6, 3, dtype=th.float64, generator=gen)))


def test_heads_on_the_same_features_share_one_running_input_factor_decomposed_once(monkeypatch):
    th.manual_seed(0)
    model = _TwoHeads().double()
    opt = KFAC(model)
    _fit(model, opt, 3, seed=0)
    actor, critic = factors(opt, model.actor), factors(opt, model.critic)
    assert actor[0] is critic[0] and actor[1] is not critic[1]
    # the shared factor is folded once per update: the average of the batches' moments of the features
    expected, gen = None, th.Generator().manual_seed(0)
    for _ in range(3):
        x = th.randn(6, 3, dtype=th.float64, generator=gen)
        th.randn(6, 3, dtype=th.float64, generator=gen)
        rows = homogeneous(th.tanh(model.features(x))).detach()
        batch = rows.T @ rows / 6
        expected = batch if expected is None else 0.99 * expected + 0.01 * batch
    th.testing.assert_close(actor[0], expected)
    sizes = []
    eigh = th.linalg.eigh
    monkeypatch.setattr(th.linalg, "eigh", lambda mats: sizes.append(tuple(mats.shape)) or eigh(mats))
    opt.update_curvature()
    assert sorted(sizes) == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 5, 5), (1, 6, 6)]  # G's, A of the features, one A of 6
    curvature = opt.preconditioner.curvature
    blocks = {block.module: block for block in opt.blocks}
    assert curvature[blocks[model.actor]].a is curvature[blocks[model.critic]].a

    # after a reload the equal factors are separate tensors again: the next update merges them, still exact
    again = copy.deepcopy(model)
    reloaded = KFAC(again)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"] = {i: {k: v.clone() for k, v in entries.items()} for i, entries in saved["state"].items()}  # unshared
    reloaded.load_state_dict(saved)
    assert factors(reloaded, again.actor)[0] is not factors(reloaded, again.critic)[0]
    _fit(model, opt, 2, seed=1)
    _fit(again, reloaded, 2, seed=1)
    assert factors(reloaded, again.actor)[0] is factors(reloaded, again.critic)[0]
    for layer in ("features", "actor", "critic"):
        for mine, theirs in zip(factors(opt, getattr(model, layer)), factors(reloaded, getattr(again, layer))):
            th.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_shared_input_factor_is_split_when_the_heads_are_fed_differently():
    th.manual_seed(0)
    model = _TwoHeads().double()
    opt = KFAC(model)
    _fit(model, opt, 2, seed=0)
    before = factors(opt, model.actor)[0].clone()
    x = th.randn(6, 3, dtype=th.float64)
    with opt.collect():
        features = th.tanh(model.features(x))
        out = th.cat([model.actor(features), model.critic(features.flip(0) * 0.5)], 1)
    opt.update_statistics(sample_loss(out, th.randn(6, 3, dtype=th.float64)))
    actor, critic = factors(opt, model.actor)[0], factors(opt, model.critic)[0]
    assert actor is not critic
    for a, inputs in ((actor, features), (critic, features.flip(0) * 0.5)):
        rows = homogeneous(inputs).detach()
        th.testing.assert_close(a, 0.99 * before + 0.01 * rows.T @ rows / 6)
