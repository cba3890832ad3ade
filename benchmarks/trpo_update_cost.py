"""
Time TRPO updates: ours against sb3-contrib's, identical settings, data and initial weights, in one process.

Two cases: an MLP policy on HalfCheetah-v5 (n_steps 2048, needs ``gymnasium[mujoco]``) and a CnnPolicy on
Atari-sized 84x84x4 frames (SB3's FakeImageEnv, 4 envs x 64 steps). For each, the policy step alone (``n_critic_updates=0``) and
the whole ``train()`` with the critic are timed; runs of the two implementations alternate (``time_in_turn`` of
benchmarks/common.py) and the median is kept. The cases are fixed settings given to both implementations alike (the
figures compare implementations on the same work), not zoo entries.

    python benchmarks/trpo_update_cost.py [--repeats 7] [--threads 1] [--cases mlp cnn] [--fisher-subsample 1.0 0.1]
"""

import argparse
import functools
from collections.abc import Callable

import numpy as np
import torch as th
from sb3_contrib import TRPO as ContribTRPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_trpo_kfac import TRPO

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import time_in_turn


def make_case(name: str) -> tuple[Callable, str, dict]:
    if name == "mlp":
        return lambda: make_vec_env("HalfCheetah-v5", n_envs=1, seed=0), "MlpPolicy", dict(n_steps=2048, batch_size=64)
    if name == "cnn":
        return (
            lambda: DummyVecEnv([lambda: FakeImageEnv(screen_height=84, screen_width=84, n_channels=4)] * 4),
            "CnnPolicy",
            dict(n_steps=64, batch_size=128),
        )
    raise ValueError(f"unknown case {name!r}")


def fill_rollout(model) -> None:
    """Collect one rollout with the model's own policy (the same seed gives the same data for both)."""
    model._setup_learn(total_timesteps=model.n_steps * model.n_envs)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)


def bench(case: str, n_critic_updates: int, fisher_subsample: float, repeats: int) -> tuple[float, float]:
    make_env, policy, kwargs = make_case(case)
    kwargs = dict(kwargs, n_critic_updates=n_critic_updates, cg_max_steps=15, seed=0)
    ours = TRPO(policy, make_env(), fisher_subsample=fisher_subsample, **kwargs)
    theirs = ContribTRPO(policy, make_env(), **kwargs)
    theirs.policy.load_state_dict(ours.policy.state_dict())
    fill_rollout(ours)
    fill_rollout(theirs)
    # Same data for both: copy our buffer into theirs.
    for key in ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs", "advantages"):
        setattr(theirs.rollout_buffer, key, getattr(ours.rollout_buffer, key).copy())
    state = {k: v.clone() for k, v in ours.policy.state_dict().items()}
    # every update starts from the same parameters; a warm-up of each, then the two alternate so that drift in the
    # machine's load hits both alike
    models = {"ours": ours, "theirs": theirs}
    reset = {name: functools.partial(model.policy.load_state_dict, state) for name, model in models.items()}
    times = time_in_turn({name: model.train for name, model in models.items()}, repeats, before_each=reset)
    return float(np.median(times["ours"])), float(np.median(times["theirs"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives the steadiest numbers)")
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--fisher-subsample",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="our fisher_subsample values to time (sb3-contrib has no such option and always uses the whole batch)",
    )
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    print(f"torch {th.__version__}, {args.threads} thread(s), median of {args.repeats} updates")
    print(f"{'case':<6} {'measure':<22} {'fisher_subsample':>16} {'ours (s)':>10} {'sb3-contrib (s)':>16} {'ratio':>7}")
    for case in args.cases:
        for label, n_critic in (("policy step", 0), ("train() with critic", 10)):
            for fraction in args.fisher_subsample:
                ours, theirs = bench(case, n_critic, fraction, args.repeats)
                print(
                    f"{case:<6} {label:<22} {fraction:>16} {ours:>10.4f} {theirs:>16.4f} {ours / theirs:>7.3f}", flush=True
                )


if __name__ == "__main__":
    main()
