"""Step rules of KFAC: a torch optimizer stepping on ``ν V``, its state saved and converted, its checks."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import dense_kfac, factors, fit_statistics, loss_and_grads, mlp, sample_loss, train_steps, wbar


def _adam_reference(model: nn.Module, lr: float, damping: float, kfac_clip: float, steps: int) -> list[th.Tensor]:
    """Adam stepping on ``ν V`` computed densely: ``V = (A ⊗ G + λI)⁻¹ ∇`` from the same factors, one trust region."""
    opt = KFAC(model, lr=lr, kfac_clip=kfac_clip, kfac_damping=damping)  # its statistics only
    adam = th.optim.Adam(model.parameters(), lr=lr, betas=(0.8, 0.9))
    layers = [model[0], model[2]]
    gen = th.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = th.randn(16, 3, dtype=th.float64, generator=gen), th.randn(16, 2, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, y))
        adam.zero_grad()
        F.mse_loss(out, y).backward()
        grads = [wbar(layer, layer.weight.grad, layer.bias.grad).flatten() for layer in layers]
        naturals = [th.linalg.solve(dense_kfac([factors(opt, layer)], damping), g) for layer, g in zip(layers, grads)]
        nu = min(1.0, (kfac_clip / (lr**2 * sum(float(v @ g) for v, g in zip(naturals, grads)))) ** 0.5)
        for layer, natural in zip(layers, naturals):
            mat = nu * natural.reshape(layer.weight.shape[0], -1)
            layer.weight.grad, layer.bias.grad = mat[:, :-1].clone(), mat[:, -1].clone()
        adam.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_torch_optimizer_steps_on_the_scaled_natural_gradient():
    lr, damping, kfac_clip = 0.05, 0.05, 1e-6
    reference = _adam_reference(mlp(), lr, damping, kfac_clip, steps=4)
    model = mlp()
    opt = KFAC(
        model,
        lr=lr,
        kfac_clip=kfac_clip,
        kfac_damping=damping,
        optimizer_class=th.optim.Adam,
        optimizer_kwargs=dict(betas=(0.8, 0.9)),
    )
    train_steps(model, opt, 4, seed=0)
    assert opt.last_nu[0] < 1.0, "the trust region should bind"
    for p, q in zip(model.parameters(), reference):
        th.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)
    inner = opt._step_rule.optimizer
    assert isinstance(inner, th.optim.Adam) and inner.param_groups[0]["betas"] == (0.8, 0.9)
    assert all(inner.state[p]["step"] == 4 for p in model.parameters())
    # the learning rate is KFAC's (SB3's schedules set it there)
    opt.param_groups[0]["lr"] = 0.003
    train_steps(model, opt, 1, seed=1)
    assert inner.param_groups[0]["lr"] == 0.003


def test_the_step_rule_state_is_saved_and_loaded():
    def make(model: nn.Module) -> KFAC:
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "kfac_clip": 0.1}]
        return KFAC(model, lr=0.01, kfac_update=2, params=groups, optimizer_class=th.optim.Adam)

    model = mlp()
    opt = make(model)
    train_steps(model, opt, 3, seed=0)
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups", "kfac_counters", "step_rule"} and saved["step_rule"]["state"]
    clone = copy.deepcopy(model)
    opt2 = make(clone)
    opt2.load_state_dict(saved)
    assert opt2.counters == opt.counters
    train_steps(model, opt, 3, seed=1)
    train_steps(clone, opt2, 3, seed=1)
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), clone.parameters()))
    # the loaded optimizer's learning rate (torch's loader made new param groups) still reaches the step rule
    opt2.param_groups[1]["lr"] = 0.002
    train_steps(clone, opt2, 1, seed=2)
    assert [group["lr"] for group in opt2._step_rule.optimizer.param_groups] == [0.01, 0.002]
    # a state saved with the other step rule is refused, naming it
    with pytest.raises(ValueError, match="saved with an optimizer_class step rule"):
        KFAC(mlp()).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved with the default step rule"):
        make(mlp()).load_state_dict(KFAC(mlp()).state_dict())


def test_the_step_rule_follows_added_groups_and_dtype_changes():
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = KFAC(model, lr=0.01, optimizer_class=th.optim.Adam)
    train_steps(model, opt, 2, seed=0, dtype=th.float32)
    extra = nn.Parameter(th.ones(2))
    opt.add_param_group({"params": [extra]})
    assert opt._step_rule.optimizer.param_groups[-1]["params"] == [extra]
    model.double()
    extra.data = extra.data.double()
    fit_statistics(model, opt, batches=1)
    loss_and_grads(model, opt)
    extra.grad = th.ones_like(extra)
    opt.step()
    inner = opt._step_rule.optimizer
    assert all(t.dtype == th.float64 for p in model.parameters() for k, t in inner.state[p].items() if k != "step")
    assert th.isfinite(extra).all() and not th.equal(extra, th.ones_like(extra))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(optimizer_class=th.optim.Adam, momentum=0.9), ValueError, "momentum"),
        (dict(optimizer_kwargs=dict(betas=(0.9, 0.9))), ValueError, "optimizer_kwargs"),
        (dict(optimizer_class="adam"), TypeError, "optimizer_class"),
        (dict(optimizer_class=th.optim.Adam, optimizer_kwargs=[0.9]), TypeError, "optimizer_kwargs"),
    ],
)
def test_bad_step_rules(kwargs, error, name):
    with pytest.raises(error, match=name):
        KFAC(mlp(), **kwargs)
