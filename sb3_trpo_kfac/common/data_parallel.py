"""
What makes an on-policy algorithm data-parallel, shared by TRPO and ACKTR: setup, seeds, global timestep counts,
rank-0-only logging, the parameter identity check, and the global advantage normalisation.

**How a model becomes data-parallel.** By detection: a model built (or loaded: ``load`` calls ``_setup_model``)
inside an initialised default ``torch.distributed`` process group of more than one process (``torchrun``, or
``th.distributed.init_process_group`` from Python) is data-parallel. Every rank builds the same model on its own
environments; outside such a group nothing here changes anything.

**Per rank and global.** ``n_envs``, ``n_steps`` and ``batch_size`` are per rank: one update uses
world_size × n_envs × n_steps samples. ``total_timesteps`` and ``num_timesteps`` are global: each rank's
``num_timesteps`` advances by world_size × n_envs per environment step (summed exactly over the ranks at the end of
every rollout), so ``learn()``'s budget, schedules' progress, ``reset_num_timesteps=False``, callbacks and the logged
fps count the whole run (as rl-zoo3's ``-n`` is the run's budget while ``--n-envs`` is per process).

**Seeds.** Rank r seeds its environments, action sampling and torch with ``seed + r``; parameters and buffers are
broadcast from rank 0 when the model is set up, so every rank starts identical whatever the seed.

**Rank 0 alone logs**: the other ranks get a logger without outputs (evaluating and saving on rank 0 only is the
caller's part, as in the CLI). A saved model holds nothing rank-specific: it loads and continues in one process.

**Identical parameters.** The policy's parameters and buffers are compared across ranks (a fingerprint of a few
numbers per tensor) before every rollout and at the end of ``learn()``, i.e. after every update: a mismatch raises
a RuntimeError. If any rank's callback stops training, every rank stops at the end of that rollout.
"""

from typing import TypeVar

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from sb3_trpo_kfac.common import distributed

SelfDataParallel = TypeVar("SelfDataParallel", bound="DataParallelAlgorithm")

# numpy's seeds are 32-bit
_SEED_MODULUS = 2**32


class DataParallelAlgorithm(OnPolicyAlgorithm):
    """
    An ``OnPolicyAlgorithm`` that runs data-parallel inside a ``torch.distributed`` process group (see the module
    docstring for the contract); the subclass's ``train()`` reduces its update's quantities across ranks.
    """

    def _setup_model(self) -> None:
        super()._setup_model()
        distributed.broadcast_module_(self.policy)

    def set_random_seed(self, seed: int | None = None) -> None:
        """Seed as SB3 does, with ``seed + rank`` on rank ``rank`` of a data-parallel run."""
        if seed is not None and distributed.is_data_parallel():
            seed = (seed + distributed.rank()) % _SEED_MODULUS
        super().set_random_seed(seed)

    def check_ranks_identical(self) -> None:
        """Raise a RuntimeError unless the policy's parameters and buffers are the same on every rank."""
        distributed.check_identical([*self.policy.parameters(), *self.policy.buffers()], "policy parameters")

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        if distributed.rank() != 0:
            # records are kept but written nowhere (and no tensorboard folder is created)
            self.set_logger(Logger(folder=None, output_formats=[]))
            progress_bar = False
        return super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        if not distributed.is_data_parallel():
            return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        self.check_ranks_identical()
        start = self.num_timesteps
        counting = _CountAllRanksSteps(callback, (distributed.world_size() - 1) * env.num_envs)
        continue_training = super().collect_rollouts(env, counting, rollout_buffer, n_rollout_steps)
        # [steps of all ranks, ranks that stop]: one collective (exact even if a rank stopped early)
        own_steps = counting.n_steps * env.num_envs
        counts = th.tensor([own_steps, int(not continue_training)], dtype=th.int64, device=self.device)
        distributed.all_reduce_sum_([counts])
        self.num_timesteps = start + int(counts[0])
        return int(counts[1]) == 0

    def learn(
        self: SelfDataParallel,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "OnPolicyAlgorithm",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfDataParallel:
        super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
        self.check_ranks_identical()  # after the last update (the others are checked before each rollout)
        return self


class _CountAllRanksSteps(BaseCallback):
    """
    Passes a rollout's callback events on, after adding the other ranks' environment steps to ``num_timesteps`` at
    every step (so callbacks, e.g. an evaluation, see the run's count during the rollout as well).
    """

    def __init__(self, callback: BaseCallback, other_ranks_steps: int) -> None:
        super().__init__()
        self.callback, self.other_ranks_steps, self.n_steps = callback, other_ranks_steps, 0

    def on_rollout_start(self) -> None:
        self.callback.on_rollout_start()

    def update_locals(self, locals_: dict) -> None:
        self.callback.update_locals(locals_)

    def on_step(self) -> bool:
        self.n_steps += 1
        self.callback.model.num_timesteps += self.other_ranks_steps
        return self.callback.on_step()

    def on_rollout_end(self) -> None:
        self.callback.on_rollout_end()

    def _on_step(self) -> bool:  # never called: on_step is passed on whole
        return True


def normalize_advantages(advantages: th.Tensor, eps: float = 1e-8) -> th.Tensor:
    """
    ``(A − mean) / (std + eps)`` with the mean and the unbiased std of all ranks' advantages (every rank holds as
    many): in one process exactly SB3's ``(A − A.mean()) / (A.std() + eps)``; data-parallel, the same statistics of
    the union of the batches (two passes, as ``th.std``, for the same rounding behaviour).
    """
    if not distributed.is_data_parallel():
        return (advantages - advantages.mean()) / (advantages.std() + eps)
    n_total = advantages.numel() * distributed.world_size()
    mean = distributed.mean_over_ranks(advantages.mean())
    squares = distributed.mean_over_ranks(((advantages - mean) ** 2).sum())
    std = th.sqrt(squares * distributed.world_size() / (n_total - 1))
    return (advantages - mean) / (std + eps)
