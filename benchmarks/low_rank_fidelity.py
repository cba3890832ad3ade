"""
How close the low-rank K-FAC solve of a large layer comes to the exact one, on a trained Atari ACKTR model's own
factors and a real batch: the natural-gradient direction of the NatureCNN 3136 -> 512 layer with both factors kept
as their top ``rank`` eigenpairs (``TwoSidedLowRankEigenCurvature``, what ``kfac_low_rank="auto"`` uses) against the
exact eigendecomposition of both (float64), for several ranks.

    python benchmarks/low_rank_fidelity.py MODEL.zip [--env PongNoFrameskip-v4] [--ranks 128 64 32 16 8]

The batch: one rollout of 8 envs x 20 steps of the model (environments seeded with ``--seed``), A2C's loss
(policy gradient with n-step advantages, entropy 0.01, value 0.25) as ACKTR's update takes it. Printed per rank: the
cosine to the exact direction (what matters under the trust region, which rescales the step), ``gᵀV / gᵀV_exact``
and the norm ratio; the raw gradient's row is the reference of no preconditioning. A single batch of a single
model: a probe of the approximation, not a learning result.
"""

import argparse

import ale_py
import gymnasium as gym
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack, VecTransposeImage

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.common.kfac.curvature import Eigen, LowRankEigen, top_eigen
from sb3_trpo_kfac.common.kfac.eigen import EigenCurvature
from sb3_trpo_kfac.common.kfac.low_rank import TwoSidedLowRankEigenCurvature

N_ENVS, N_STEPS = 8, 20


class Continue(BaseCallback):
    def _on_step(self) -> bool:
        return True


def batch_gradient(model: ACKTR, env: VecTransposeImage) -> None:
    """One rollout of the model, and A2C's loss on it backpropagated into ``.grad``."""
    buffer = RolloutBuffer(N_STEPS, env.observation_space, env.action_space, device="cpu", n_envs=N_ENVS)
    model._last_obs = env.reset()  # type: ignore[assignment]
    model._last_episode_starts = th.ones(N_ENVS, dtype=th.bool).numpy()
    callback = Continue()
    callback.init_callback(model)
    model.collect_rollouts(env, callback, buffer, N_STEPS)
    data = next(buffer.get(None))
    values, log_prob, entropy = model.policy.evaluate_actions(data.observations, data.actions.long().flatten())
    assert entropy is not None
    value_loss = ((data.returns - values.flatten()) ** 2).mean()
    loss = -(data.advantages * log_prob).mean() - 0.01 * entropy.mean() + 0.25 * value_loss
    model.policy.zero_grad()
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an ACKTR model zip trained on an Atari env (its K-FAC factors saved with it)")
    parser.add_argument("--env", default="PongNoFrameskip-v4")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 64, 32, 16, 8])
    args = parser.parse_args()
    th.set_num_threads(1)
    gym.register_envs(ale_py)
    env = VecTransposeImage(VecFrameStack(make_atari_env(args.env, n_envs=N_ENVS, seed=args.seed), 4))
    model = ACKTR.load(args.model, env=env, device="cpu")
    batch_gradient(model, env)

    preconditioner = model.policy.optimizer.preconditioner  # type: ignore[attr-defined]
    block = max(preconditioner.blocks, key=lambda b: b.matrix_shape[0] * b.matrix_shape[1])
    gradient = th.cat([block.weight.grad, block.bias.grad[:, None]], 1).double()
    factors = preconditioner.statistics.factors[block]
    a, g, damping = factors.a.double(), factors.g.double(), model.kfac_damping
    exact_a, exact_g = th.linalg.eigh(a), th.linalg.eigh(g)
    exact = EigenCurvature(
        a=Eigen(exact_a.eigenvalues.clamp(min=0), exact_a.eigenvectors),
        g=Eigen(exact_g.eigenvalues.clamp(min=0), exact_g.eigenvectors),
    ).solve(gradient, damping)

    print(f"{block.name} ({block.matrix_shape[0]} x {block.matrix_shape[1]}), {args.model}")
    print(f"{'solve':>10} | cosine to exact | gᵀV / gᵀV_exact | |V| / |V_exact|")

    def row(name: str, direction: th.Tensor) -> None:
        cosine = (direction * exact).sum() / direction.norm() / exact.norm()
        captured = (direction * gradient).sum() / (exact * gradient).sum()
        print(f"{name:>10} | {cosine:15.4f} | {captured:15.3f} | {direction.norm() / exact.norm():15.3f}")

    row("gradient", gradient)
    for rank in args.ranks:
        low_a: LowRankEigen | None = None
        low_g: LowRankEigen | None = None
        for _ in range(6):  # converged subspace iterations (the first call sweeps 4 times, each further one once)
            low_a, low_g = top_eigen(a, rank, low_a), top_eigen(g, rank, low_g)
        row(f"rank {rank}", TwoSidedLowRankEigenCurvature(a=low_a, g=low_g).solve(gradient, damping))


if __name__ == "__main__":
    main()
