"""
States saved by the code before the K-FAC package (tests/kfac/data, see make_saved_state_fixtures.py) load and
continue bit for bit: KFAC's saved format is unchanged, ACKTR's former keyword names are read from old models.
"""

import os
import warnings

import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac import ACKTR
from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import sample_loss

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _train_steps(model: nn.Module, opt: KFAC, steps: int, seed: int, inputs: int) -> None:
    gen = th.Generator().manual_seed(seed)
    for _ in range(steps):
        x = th.randn(16, inputs, dtype=th.float64, generator=gen)
        y = th.randn(16, 2, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, y))
        opt.zero_grad()
        F.mse_loss(out, y).backward()
        opt.step()


def _model_and_optimizer(kind: str) -> tuple[nn.Module, KFAC, int]:
    th.manual_seed(0)
    if kind == "eigen":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "kfac_clip": 0.1}]
        return model, KFAC(model, lr=0.1, momentum=0.5, kfac_update=2, kfac_refine=1, params=groups), 3
    model = nn.Sequential(nn.Linear(30, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = KFAC(
        model,
        lr=0.1,
        kfac_clip=0.01,
        kfac_inverse="inverse",
        kfac_low_rank=4,
        kfac_low_rank_min_dim=10,
        kfac_cold_iter=1,
    )
    return model, opt, 30


@pytest.mark.parametrize("kind", ["eigen", "low_rank_inverse"])
def test_an_optimizer_state_saved_by_the_previous_code_continues_bit_for_bit(kind):
    saved = th.load(os.path.join(DATA, f"kfac_{kind}_v1.pt"), weights_only=False)
    model, opt, inputs = _model_and_optimizer(kind)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    # the same format comes out again
    again = opt.state_dict()
    assert again["kfac_counters"] == saved["optimizer"]["kfac_counters"]
    assert again["param_groups"] == saved["optimizer"]["param_groups"]
    assert {i: set(entries) for i, entries in again["state"].items()} == {
        i: set(entries) for i, entries in saved["optimizer"]["state"].items()
    }
    _train_steps(model, opt, 2, seed=1, inputs=inputs)
    assert all(th.equal(p, q) for p, q in zip(model.parameters(), saved["continued"]))


def test_an_acktr_model_saved_by_the_previous_code_continues_bit_for_bit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SB3's own, on loading
        model = ACKTR.load(
            os.path.join(DATA, "acktr_v1.zip"), env=make_vec_env("CartPole-v1", n_envs=2, seed=0), device="cpu"
        )
    # saved as damping=0.02, stats_decay=0.95, cold_iter=1: read under their current names
    assert (model.kfac_damping, model.kfac_stats_decay, model.kfac_cold_iter) == (0.02, 0.95, 1)
    assert not {"damping", "stats_decay", "cold_iter"} & set(vars(model))
    preconditioner = model.policy.optimizer.preconditioner
    assert preconditioner.kfac_damping == 0.02 and preconditioner.schedule.kfac_cold_iter == 1
    model.set_random_seed(1)
    model.learn(64, reset_num_timesteps=False)
    expected = th.load(os.path.join(DATA, "acktr_v1_continued.pt"), weights_only=False)
    assert all(th.equal(p, q) for p, q in zip(model.policy.parameters(), expected))


def test_acktr_accepts_the_former_keyword_names():
    kwargs = dict(n_steps=8, policy_kwargs=dict(net_arch=[8]), seed=0, device="cpu")
    with pytest.warns(DeprecationWarning) as record:
        old = ACKTR("MlpPolicy", "CartPole-v1", damping=0.02, stats_decay=0.95, cold_iter=1, **kwargs).learn(32)
    assert {str(w.message) for w in record} >= {
        f"ACKTR: `{name}` is deprecated, use `kfac_{name}`" for name in ("damping", "stats_decay", "cold_iter")
    }
    new = ACKTR("MlpPolicy", "CartPole-v1", kfac_damping=0.02, kfac_stats_decay=0.95, kfac_cold_iter=1, **kwargs).learn(
        32
    )
    assert all(th.equal(p, q) for p, q in zip(old.policy.parameters(), new.policy.parameters()))
    with pytest.raises(TypeError, match="got both `damping`"):
        ACKTR("MlpPolicy", "CartPole-v1", damping=0.02, kfac_damping=0.03, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampening'"):
        ACKTR("MlpPolicy", "CartPole-v1", dampening=0.02, **kwargs)
