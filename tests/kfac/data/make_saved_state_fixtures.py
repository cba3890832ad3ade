"""
Writes the saved states of tests/kfac/test_saved_state.py with the code *before* the K-FAC package existed (run on
commit f7e81d7, where ``sb3_trpo_kfac/common/kfac.py`` was one module):

    git archive f7e81d7 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python tests/kfac/data/make_saved_state_fixtures.py

Each fixture holds a state saved mid-training and the parameters after training on from it, so the tests check that
today's code loads yesterday's state and continues bit for bit.
"""

import copy
import os
import warnings

import torch as th
from stable_baselines3.common.env_util import make_vec_env
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac import ACKTR
from sb3_trpo_kfac.common.kfac import KFAC

HERE = os.path.dirname(os.path.abspath(__file__))


def sample_loss(out: th.Tensor, target: th.Tensor) -> th.Tensor:
    return (th.tanh(out) * target).sum() + 0.3 * (out**2).sum()


def train_steps(model: nn.Module, opt: KFAC, steps: int, seed: int, inputs: int) -> None:
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


def model_and_optimizer(kind: str) -> tuple[nn.Module, KFAC]:
    th.manual_seed(0)
    if kind == "eigen":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "kfac_clip": 0.1}]
        return model, KFAC(model, lr=0.1, momentum=0.5, kfac_update=2, refine_iterations=1, params=groups)
    model = nn.Sequential(nn.Linear(30, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, KFAC(model, lr=0.1, kfac_clip=0.01, inverse="inverse", low_rank=4, low_rank_min_dim=10, cold_iter=1)


def main() -> None:
    th.set_num_threads(1)
    for kind, inputs in (("eigen", 3), ("low_rank_inverse", 30)):
        model, opt = model_and_optimizer(kind)
        train_steps(model, opt, 3, seed=0, inputs=inputs)
        # copies: the state dicts hold the live tensors, which the steps below update in place
        saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
        train_steps(model, opt, 2, seed=1, inputs=inputs)
        saved["continued"] = [p.detach().clone() for p in model.parameters()]
        th.save(saved, os.path.join(HERE, f"kfac_{kind}_v1.pt"))

    warnings.simplefilter("ignore")
    kwargs = dict(
        n_steps=8, damping=0.02, stats_decay=0.95, cold_iter=1, kfac_update=2, vf_kfac_clip=0.05, n_critic_updates=2
    )
    model = ACKTR(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=2, seed=0),
        policy_kwargs=dict(net_arch=[8]),
        seed=0,
        device="cpu",
        **kwargs,
    )
    model.learn(64)
    path = os.path.join(HERE, "acktr_v1.zip")
    model.save(path)
    loaded = ACKTR.load(path, env=make_vec_env("CartPole-v1", n_envs=2, seed=0), device="cpu")
    loaded.set_random_seed(1)
    loaded.learn(64, reset_num_timesteps=False)
    th.save([p.detach().clone() for p in loaded.policy.parameters()], os.path.join(HERE, "acktr_v1_continued.pt"))


if __name__ == "__main__":
    main()
