"""KFAC, the optimizer: the preconditioner plus a step rule; its saved state, parameter groups, dtype changes."""

import copy
import io
import re

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

import sb3_trpo_kfac.common.kfac as kfac_package
from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import (
    mlp,
    sample_loss,
    saved_state,
    train_steps,
)


def test_state_dict_round_trip():
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_update=3)
    train_steps(model, opt, 4, seed=0)
    buffer = io.BytesIO()
    th.save(opt.state_dict(), buffer)
    buffer.seek(0)

    clone = copy.deepcopy(model)
    opt2 = KFAC(clone, lr=0.1, kfac_update=3)
    opt2.load_state_dict(th.load(buffer, weights_only=False))
    assert opt2.counters == opt.counters
    state, state2 = saved_state(opt), saved_state(opt2)
    assert state.keys() == state2.keys() and all(th.equal(state[key], state2[key]) for key in state)
    # the saved format: torch's, with the factors and eigenbases beside the first layer weight's momentum
    assert {"A", "G", "QA", "QG", "dA", "dG", "momentum_buffer"} == set(opt2.state_dict()["state"][0])
    # identical continuation (eigenbasis refresh period included)
    train_steps(model, opt, 4, seed=1)
    train_steps(clone, opt2, 4, seed=1)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert th.equal(p, q)


def test_loaded_state_is_a_copy():
    model = mlp()
    opt = KFAC(model, lr=0.1)
    train_steps(model, opt, 2, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1)
    twin_opt.load_state_dict(opt.state_dict())  # in memory: torch's loader would keep these very tensors
    loaded = saved_state(twin_opt)
    train_steps(model, opt, 1, seed=1)  # updates the source's factors and momentum in place
    after = saved_state(twin_opt)
    for key, value in loaded.items():
        assert th.equal(after[key], value), key


def test_parameter_groups_survive_state_dict():
    model = mlp()
    groups = [{"params": model[0].parameters(), "kfac_clip": 0.01}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = KFAC(model, lr=0.1, params=groups)
    train_steps(model, opt, 2, seed=0)
    other = mlp()
    restored = KFAC(other, params=[{"params": other[0].parameters()}, {"params": other[2].parameters()}])
    restored.load_state_dict(opt.state_dict())
    for group, expected in zip(restored.param_groups, opt.param_groups):
        assert group["kfac_clip"] == expected["kfac_clip"] and group["lr"] == expected["lr"]
    # state saved before groups had their own radius: every group gets the optimizer's kfac_clip
    legacy = opt.state_dict()
    for group in legacy["param_groups"]:
        del group["kfac_clip"]
    restored.load_state_dict(legacy)
    assert [group["kfac_clip"] for group in restored.param_groups] == [restored.preconditioner.kfac_clip] * 2


def test_added_parameter_group_is_its_own_trust_region():
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_clip=0.01)
    train_steps(model, opt, 2, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = KFAC(twin, lr=0.1, kfac_clip=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    extra = nn.Parameter(th.zeros(3, dtype=th.float64))
    opt.add_param_group({"params": [extra]})
    train_steps(twin, twin_opt, 1, seed=1)
    gen = th.Generator().manual_seed(1)
    x, y = th.randn(16, 3, dtype=th.float64, generator=gen), th.randn(16, 2, dtype=th.float64, generator=gen)
    with opt.collect():
        out = model(x)
    opt.update_statistics(sample_loss(out, y))
    opt.zero_grad()
    (F.mse_loss(out, y) + (extra * th.tensor([1.0, 2.0, 3.0], dtype=th.float64)).sum()).backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):  # the model's momentum moved into the new buffers
        th.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    nu = min(1.0, (0.01 / (0.1**2 * 14.0)) ** 0.5)  # raw gradient (1, 2, 3): Vᵀ∇ = 14
    th.testing.assert_close(extra.detach(), -0.1 * (1 - 0.9) * nu * th.tensor([1.0, 2.0, 3.0], dtype=th.float64))


def test_parameters_without_gradient_keep_value_and_momentum():
    model = mlp()
    opt = KFAC(model, lr=0.1, momentum=0.5, kfac_clip=0.01)
    train_steps(model, opt, 3, seed=0)
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


def test_the_documented_supervised_example_runs():
    # the package docstring's example, verbatim, on a plain nn.Module and a data loader of 3 classes
    example = re.search(r"Supervised use.*?::\n\n(.*?)\n\n", kfac_package.__doc__, re.S).group(1)
    th.manual_seed(0)
    data = th.randn(128, 10)
    dataset = th.utils.data.TensorDataset(data, data[:, :3].argmax(dim=1))
    namespace = dict(KFAC=KFAC, nn=nn, th=th, F=F, loader=th.utils.data.DataLoader(dataset, batch_size=32))
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "docstring", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert optimizer.counters["updates"] == 4 and optimizer.counters["stats_updates"] == 4
    assert all(optimizer.preconditioner.curvature[block].ready for block in optimizer.blocks)
    assert F.cross_entropy(model(data), dataset.tensors[1]) < 1.1  # ln 3 = 1.0986 at chance: it learned something


@pytest.mark.parametrize("kwargs", [dict(kfac_update=1), dict(kfac_update=3), dict(kfac_async=True)])
def test_state_follows_the_parameters_to_float64(kwargs):
    def float32_run() -> tuple[nn.Module, KFAC]:
        th.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        opt = KFAC(model, lr=0.1, kfac_clip=0.01, **kwargs)
        train_steps(model, opt, 2, seed=0, dtype=th.float32)
        return model, opt

    model, opt = float32_run()
    # the reference: a fresh float64 optimizer given the same state, converted by torch's loader
    reference_model, reference_opt = float32_run()
    reference_state = reference_opt.state_dict()  # (with kfac_async: joins the reference's pending job)
    reference_model.double()
    reference_opt = KFAC(reference_model, lr=0.1, kfac_clip=0.01, **kwargs)
    reference_opt.load_state_dict(reference_state)

    model.double()  # the optimizer still holds float32 factors, decompositions and momentum
    for net, optimizer in ((model, opt), (reference_model, reference_opt)):
        train_steps(net, optimizer, 2, seed=1, dtype=th.float64)
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    state, reference = saved_state(opt), saved_state(reference_opt)
    assert state.keys() == reference.keys()
    for key, value in state.items():
        assert value.dtype == th.float64 and th.equal(value, reference[key]), key
    assert opt.counters == reference_opt.counters


def test_group_with_parameters_of_two_dtypes_raises_at_the_step():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = KFAC(model, lr=0.1)
    train_steps(model, opt, 1, seed=0, dtype=th.float32)
    model[2].double()
    for p in model.parameters():
        p.grad = th.zeros_like(p)
    with pytest.raises(TypeError, match="share one dtype and device"):
        opt.step()


def test_renamed_keywords_still_work():
    pairs = dict(
        damping=("kfac_damping", 0.02), stats_decay=("kfac_stats_decay", 0.9), cold_iter=("kfac_cold_iter", 2),
        cold_max_grad_norm=("kfac_cold_max_grad_norm", 0.7), inverse=("kfac_inverse", "inverse"),
        low_rank=("kfac_low_rank", 3), low_rank_min_dim=("kfac_low_rank_min_dim", 2),
        async_decomposition=("kfac_async", True), refine_iterations=("kfac_refine", 2),
    )  # fmt: skip
    results = []
    for renamed in (False, True):
        model = mlp()
        kwargs = {old if renamed else new: value for old, (new, value) in pairs.items()}
        if renamed:
            with pytest.warns(DeprecationWarning) as record:
                opt = KFAC(model, lr=0.1, **kwargs)
            assert {str(w.message).split("`")[1] for w in record} == set(pairs)
        else:
            opt = KFAC(model, lr=0.1, **kwargs)
        train_steps(model, opt, 4, seed=0)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(th.equal(p, q) for p, q in zip(*results))
    with pytest.raises(TypeError, match="got both `damping`"):
        KFAC(mlp(), damping=0.1, kfac_damping=0.2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampening'"):
        KFAC(mlp(), dampening=0.1)
    with pytest.warns(DeprecationWarning, match="update_curvature"):
        KFAC(mlp()).update_preconditioner()
