import contextlib
import io
import pathlib
import warnings
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common import distributed
from sb3_trpo_kfac.common.conjugate_gradient import conjugate_gradient
from sb3_trpo_kfac.common.data_parallel import DataParallelAlgorithm, normalize_advantages
from sb3_trpo_kfac.common.fisher import (
    LinearCall,
    detached_distribution,
    flat_concat,
    gauss_newton_fisher,
    mean_kl,
    record_linear_calls,
    split_like,
)
from sb3_trpo_kfac.common.kfac import KFACPreconditioner
from sb3_trpo_kfac.common.policy_parameters import (
    frozen_features_value_fn,
    index_observations,
    split_actor_critic_parameters,
)
from sb3_trpo_kfac.common.saving import CONTRIB, OURS, SavedModel, check_model_file, kl_dimensions
from sb3_trpo_kfac.common.validation import (
    SUPPORTED_ACTION_SPACES,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_on_policy_arguments,
    check_rollout_size,
)
from sb3_trpo_kfac.trpo.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

SelfTRPO = TypeVar("SelfTRPO", bound="TRPO")

CG_PRECONDITIONERS = (None, "kfac")


class TRPO(DataParallelAlgorithm):
    """
    Trust Region Policy Optimization (TRPO), with exact Gauss-Newton Fisher-vector products.

    Paper: https://arxiv.org/abs/1502.05477 (and John Schulman's thesis, http://joschu.net/docs/thesis.pdf)

    Drop-in for sb3-contrib's ``TRPO``: it accepts every sb3-contrib keyword with the same name and default, and all
    but two with the same meaning. ``target_kl`` and ``cg_damping`` refer to the KL summed over action dimensions,
    where sb3-contrib averages it over the d dimensions of Box, MultiDiscrete and MultiBinary actions: a value v of
    sb3-contrib's corresponds to d·v here (the same for Discrete actions, d = 1). The line search bounds
    KL(π_old ‖ π_new) where sb3-contrib bounds KL(π_new ‖ π_old), which agree to second order. Per rollout the policy
    takes one natural-gradient step, solving (F + cg_damping·I) s = g by conjugate gradient with F the policy's
    Fisher (computed in Gauss-Newton form, see ``sb3_trpo_kfac.common.fisher``), scaling it to the trust region
    ``target_kl`` and backtracking until KL(π_old ‖ π_new) <= target_kl and the surrogate improves. The critic is
    then fitted by minibatch Adam on the value loss.

    Actor parameters are those the action distribution depends on; with a shared features extractor these include
    the extractor, so the policy step owns it and the critic step leaves it untouched (only the value-only layers are
    fitted by the critic). With separate extractors (``share_features_extractor=False``) the critic trains its own.

    Non-finite data (a NaN reward, an inf observation) never reaches the parameters: such a policy step is skipped
    and logged as ``train/non_finite_step``, such critic minibatches are skipped and counted in
    ``train/critic_skipped_steps`` (since the start of training). A zero policy gradient is logged as
    ``train/zero_gradient_step``.

    Data-parallel (built inside a ``torch.distributed`` process group of several processes, e.g. under ``torchrun``;
    see :mod:`sb3_trpo_kfac.common.data_parallel` for seeds, logging and what is per rank): the update is the one on
    all ranks' samples. The gradient, every Fisher-vector product (one all-reduce per CG iteration), the K-FAC
    preconditioner's statistics, the advantage normalisation and the line search's surrogate and KL are means over
    all ranks, so every rank takes the same step and the same decisions (a candidate or critic minibatch that is not
    finite on one rank is rejected on all). ``n_steps``, ``batch_size`` and ``fisher_subsample`` apply per rank; each
    rank fits the critic on its own minibatches, with gradients averaged over ranks.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate for the value function, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size for the value function
    :param gamma: Discount factor
    :param cg_max_steps: maximum number of steps in the Conjugate Gradient algorithm
        for computing the natural gradient step
    :param cg_damping: damping added to the Fisher-vector product (λ in (F + λI) s = g), F being the Fisher of the
        KL summed over action dimensions (see above)
    :param line_search_shrinking_factor: step-size reduction factor for the line-search
        (i.e., ``theta_new = theta + alpha^i * step``)
    :param line_search_max_iter: maximum number of iteration for the backtracking line-search
    :param n_critic_updates: number of critic updates (epochs over the rollout) per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize or not the advantage
    :param target_kl: Trust region: maximum mean KL(π_old ‖ π_new) per update, summed over action dimensions
        (see above)
    :param sub_sampling_factor: Keep every k-th sample of the rollout for the whole policy step
        (gradient, Fisher and line search); see p40-42 of John Schulman's thesis
    :param fisher_subsample: Fraction of the (sub-sampled) batch used for the Fisher-vector products only, while the
        gradient and the line search use all of it (Schulman's thesis uses 0.1-0.2). 1.0 uses the whole batch.
    :param cg_preconditioner: ``None`` for plain conjugate gradient, or ``"kfac"``: precondition it with the K-FAC
        approximation (A ⊗ G + cg_damping)⁻¹ of the policy Fisher, built from the current batch (the rollout actions
        are samples of the current policy) for every ``nn.Linear`` / ``nn.Conv2d`` among the actor's layers; other
        actor parameters (e.g. ``log_std``) are left unpreconditioned. It pays off on MuJoCo-like control (several
        action dimensions, observations of mixed scale: HalfCheetah-v5 needs 12 instead of 25 iterations for a 1e-3
        relative residual); on small discrete problems plain CG is already as fast.
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    # Critic minibatch steps skipped since the start of training (non-finite value loss or gradient); saved with
    # the model once set on it.
    _critic_skipped_steps: int = 0

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        fisher_subsample: float = 1.0,
        cg_preconditioner: str | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        # Checked before the environment is built, so a typo fails fast.
        on_policy_kwargs = check_on_policy_arguments(
            self.policy_aliases,
            policy=policy,
            env=env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
        )
        normalize_advantage = check_bool("normalize_advantage", normalize_advantage)
        check_rollout_size(on_policy_kwargs["n_steps"], env, normalize_advantage)
        check_bool("_init_setup_model", _init_setup_model)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.cg_max_steps = check_int("cg_max_steps", cg_max_steps, minimum=1)
        self.cg_damping = check_float("cg_damping", cg_damping, low=0.0)
        self.line_search_shrinking_factor = check_float(
            "line_search_shrinking_factor",
            line_search_shrinking_factor,
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=False,
        )
        self.line_search_max_iter = check_int("line_search_max_iter", line_search_max_iter, minimum=1)
        self.n_critic_updates = check_int("n_critic_updates", n_critic_updates, minimum=0)
        self.target_kl = check_float("target_kl", target_kl, low=0.0, low_inclusive=False)
        self.sub_sampling_factor = check_int("sub_sampling_factor", sub_sampling_factor, minimum=1)
        self.fisher_subsample = check_float("fisher_subsample", fisher_subsample, 0.0, 1.0, low_inclusive=False)
        self.cg_preconditioner = check_choice("cg_preconditioner", cg_preconditioner, CG_PRECONDITIONERS)

        super().__init__(
            ent_coef=0.0,  # entropy bonus is not used by TRPO
            vf_coef=0.0,  # value function is optimized separately
            max_grad_norm=0.0,
            _init_setup_model=False,
            supported_action_spaces=SUPPORTED_ACTION_SPACES,
            **on_policy_kwargs,
        )

        self.normalize_advantage = normalize_advantage
        if "optimizer_class" not in self.policy_kwargs and "optimizer_kwargs" not in self.policy_kwargs:
            # The critic takes hundreds of small Adam steps per update; the fused kernel is the same Adam, faster.
            # eps: SB3's default for its policies' Adam, which passing any optimizer_kwargs would otherwise drop.
            # A new dict: the caller's policy_kwargs stay as given (they may be reused, e.g. for ACKTR).
            self.policy_kwargs = {**self.policy_kwargs, "optimizer_kwargs": {"fused": True, "eps": 1e-5}}
        if self.env is not None:
            buffer_size = self.env.num_envs * self.n_steps
            if buffer_size % batch_size > 0:
                warnings.warn(
                    f"You have specified a mini-batch size of {batch_size}, but because the `RolloutBuffer` is of size "
                    f"`n_steps * n_envs = {buffer_size}`, after every {buffer_size // batch_size} untruncated "
                    f"mini-batches, there will be a truncated mini-batch of size {buffer_size % batch_size}\n"
                    f"We recommend using a `batch_size` that is a factor of `n_steps * n_envs`.\n"
                    f"Info: (n_steps={self.n_steps} and n_envs={self.env.num_envs})"
                )

        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        # Found from the autograd graph on the first update (the policy's structure does not change afterwards).
        self._actor_params: list[nn.Parameter] | None = None
        self._critic_params: list[nn.Parameter] | None = None
        self._kfac: KFACPreconditioner | None = None

    def _excluded_save_params(self) -> list[str]:
        # Parameter lists point into the live policy; they are rebuilt after loading.
        return [*super()._excluded_save_params(), "_actor_params", "_critic_params", "_kfac"]

    def _split_parameters(self, observations: PyTorchObs) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        if self._actor_params is None or self._critic_params is None:
            self._actor_params, self._critic_params = split_actor_critic_parameters(
                self.policy, index_observations(observations, slice(0, 2))
            )
        return self._actor_params, self._critic_params

    def _kfac_preconditioner(self, actor_params: list[nn.Parameter]) -> KFACPreconditioner:
        """K-FAC over the actor's layers, holding only the statistics of the current batch."""
        if self._kfac is None:
            actor_ids = {id(p) for p in actor_params}
            layers = [
                m for m in self.policy.modules() if isinstance(m, nn.Linear | nn.Conv2d) and id(m.weight) in actor_ids
            ]
            self._kfac = KFACPreconditioner(
                self.policy, actor_params, kfac_stats_decay=0.0, kfac_damping=max(self.cg_damping, 1e-8), modules=layers
            )
        return self._kfac

    def _policy_step(
        self, observations: PyTorchObs, actions: th.Tensor, old_log_prob: th.Tensor, advantages: th.Tensor
    ) -> dict[str, float]:
        """
        One natural-gradient step of the actor with backtracking line search.

        :return: the statistics to log
        """
        actor_params, _ = self._split_parameters(observations)
        if self.normalize_advantage:
            advantages = normalize_advantages(advantages)

        kfac = self._kfac_preconditioner(actor_params) if self.cg_preconditioner == "kfac" else None
        collect: contextlib.AbstractContextManager[Any] = kfac.collect() if kfac is not None else contextlib.nullcontext()
        # the Fisher products use this forward only without a subsample
        record: contextlib.AbstractContextManager[list[LinearCall]] = (
            record_linear_calls(self.policy) if self.fisher_subsample == 1.0 else contextlib.nullcontext([])
        )
        with collect, record as calls:
            distribution = self.policy.get_distribution(observations)
        old_distribution = detached_distribution(distribution)
        log_prob = distribution.log_prob(actions)
        objective = (advantages * th.exp(log_prob - old_log_prob)).mean()
        gradient = flat_concat(th.autograd.grad(objective, actor_params, retain_graph=True))
        objective = objective.detach()
        # the mean over all ranks' samples; a non-finite entry on any rank makes the sum non-finite on every rank
        distributed.all_reduce_mean_([gradient, objective])

        stats = {
            "policy_objective": objective.item(),
            "kl_divergence_loss": 0.0,
            "is_line_search_success": 0.0,
            "line_search_step_fraction": 0.0,
            "non_finite_step": 0.0,
            "zero_gradient_step": 0.0,
        }
        if not th.isfinite(gradient).all():
            stats["non_finite_step"] = 1.0
            stats["cg_residual"] = float("nan")
            return stats
        if not gradient.any():
            # A flat surrogate (e.g. all advantages zero) has no ascent direction: nothing to step along.
            stats["zero_gradient_step"] = 1.0
            stats["cg_residual"] = 0.0
            return stats

        preconditioner = None
        # The rollout actions are samples of the current policy: their negative log-likelihood is a Fisher loss.
        if kfac is not None and kfac.update_statistics(-log_prob.sum()):
            kfac.update_curvature()

            def preconditioner(vector: th.Tensor) -> th.Tensor:
                return flat_concat(kfac.precondition(actor_params, split_like(vector, actor_params)))

        if self.fisher_subsample < 1.0:
            n_fisher = max(1, round(self.fisher_subsample * len(actions)))
            # Rollout batches come shuffled, so the first rows are a uniform subsample.
            with record_linear_calls(self.policy) as calls:
                fisher_distribution = self.policy.get_distribution(index_observations(observations, slice(0, n_fisher)))
        else:
            fisher_distribution = distribution
        fisher = distributed.mean_over_ranks_of(
            gauss_newton_fisher(fisher_distribution, actor_params, damping=self.cg_damping, linear_calls=calls)
        )

        solve = conjugate_gradient(fisher, gradient, max_iter=self.cg_max_steps, preconditioner=preconditioner)
        stats["cg_residual"] = solve.relative_residual
        stats["cg_iterations"] = float(solve.iterations)
        curvature = th.dot(solve.solution, solve.matrix_solution)
        if not (th.isfinite(solve.solution).all() and th.isfinite(curvature)):
            stats["non_finite_step"] = 1.0
            return stats
        if not curvature > 0:
            # Finite but no measurable curvature: a gradient so small that sᵀ(F + λI)s underflows.
            stats["zero_gradient_step"] = 1.0
            return stats
        step = th.sqrt(2.0 * self.target_kl / curvature) * solve.solution

        old_params = [param.detach().clone() for param in actor_params]
        step_fraction = 1.0
        accepted = False
        try:  # θ_old is restored on every way out but acceptance, exceptions included
            with th.no_grad():
                for _ in range(self.line_search_max_iter):
                    for param, old, delta in zip(actor_params, old_params, split_like(step, actor_params), strict=True):
                        param.copy_(old + step_fraction * delta)
                    candidate = self._evaluate_candidate(
                        observations, actions, old_log_prob, advantages, old_distribution
                    )
                    if candidate is not None:
                        new_objective, kl = candidate
                        if kl <= self.target_kl and new_objective > objective:
                            accepted = True
                            stats.update(
                                policy_objective=new_objective.item(),
                                kl_divergence_loss=kl.item(),
                                is_line_search_success=1.0,
                                line_search_step_fraction=step_fraction,
                            )
                            return stats
                    step_fraction *= self.line_search_shrinking_factor
        finally:
            if not accepted:
                with th.no_grad():
                    for param, old in zip(actor_params, old_params, strict=True):
                        param.copy_(old)
        return stats

    def _evaluate_candidate(
        self,
        observations: PyTorchObs,
        actions: th.Tensor,
        old_log_prob: th.Tensor,
        advantages: th.Tensor,
        old_distribution: Distribution,
    ) -> tuple[th.Tensor, th.Tensor] | None:
        """
        The surrogate and mean KL(π_old ‖ π) of the policy's current parameters (a line-search candidate).

        :return: ``(objective, kl)`` (means over all ranks' samples), or None when the candidate is not a valid
            policy on some rank: a distribution parameter torch's validation refuses (e.g. a scale that overflowed to
            inf or 0) or a non-finite objective or KL
        """
        try:
            distribution = self.policy.get_distribution(observations)
            objective = (advantages * th.exp(distribution.log_prob(actions) - old_log_prob)).mean()
            kl = mean_kl(old_distribution, distribution)
        except ValueError:
            # torch.distributions' argument validation; the same forward passed at θ_old, so the values are at fault.
            # NaN rather than an early return: every rank must join the reduction and reject the candidate.
            objective, kl = advantages.new_tensor(float("nan")), advantages.new_tensor(float("nan"))
        distributed.all_reduce_mean_([objective, kl])
        if not (th.isfinite(objective) and th.isfinite(kl)):
            return None
        return objective, kl

    def _fit_critic(self, observations: PyTorchObs, returns: th.Tensor) -> list[float]:
        """
        ``n_critic_updates`` epochs of minibatch updates of the critic parameters on the value loss. A minibatch
        whose value loss or gradient is not finite (a NaN or inf reward, an inf observation) is skipped before it
        reaches the parameters or Adam's moments, and counted in ``_critic_skipped_steps``.

        :return: the value losses of the minibatch steps taken
        """
        _, critic_params = self._split_parameters(observations)
        optimizer = self.policy.optimizer
        # With a shared extractor the critic step cannot move it, so its features are computed once for all epochs.
        inputs, predict = frozen_features_value_fn(self.policy, observations, critic_params)

        value_losses = []
        n_samples = len(returns)
        for _ in range(self.n_critic_updates):
            for indices in th.randperm(n_samples, device=returns.device).split(self.batch_size):
                values = predict(index_observations(inputs, indices)).flatten()
                value_loss = F.mse_loss(returns[indices], values)
                optimizer.zero_grad()
                # Gradients for critic parameters only: the policy step alone moves actor parameters.
                grads = th.autograd.grad(value_loss, critic_params, allow_unused=True)
                if distributed.is_data_parallel():  # averaged over ranks, so the skip below is decided alike
                    value_loss = value_loss.detach()
                    distributed.all_reduce_mean_([value_loss, *(grad for grad in grads if grad is not None)])
                norms = th._foreach_norm([grad for grad in grads if grad is not None])
                if not bool(th.isfinite(th.stack([value_loss.detach(), *norms])).all()):
                    self._critic_skipped_steps += 1
                    continue
                for param, grad in zip(critic_params, grads, strict=True):
                    param.grad = grad
                optimizer.step()
                value_losses.append(value_loss.item())
        return value_losses

    def train(self) -> None:
        """
        Update policy using the currently gathered rollout buffer.
        """
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        # One batch with all the data, in random order.
        rollout_data = next(self.rollout_buffer.get(batch_size=None))
        actions = rollout_data.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        thin = slice(None, None, self.sub_sampling_factor)
        stats = self._policy_step(
            index_observations(rollout_data.observations, thin),
            actions[thin],
            rollout_data.old_log_prob[thin],
            rollout_data.advantages[thin],
        )
        value_losses = self._fit_critic(rollout_data.observations, rollout_data.returns)

        self._n_updates += 1
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self.logger.record("train/policy_objective", stats["policy_objective"])
        self.logger.record("train/value_loss", np.mean(value_losses) if value_losses else float("nan"))
        self.logger.record("train/kl_divergence_loss", stats["kl_divergence_loss"])
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/is_line_search_success", stats["is_line_search_success"])
        self.logger.record("train/line_search_step_fraction", stats["line_search_step_fraction"])
        self.logger.record("train/cg_residual", stats["cg_residual"])
        if "cg_iterations" in stats:
            self.logger.record("train/cg_iterations", stats["cg_iterations"])
        self.logger.record("train/non_finite_step", stats["non_finite_step"])
        self.logger.record("train/zero_gradient_step", stats["zero_gradient_step"])
        self.logger.record("train/critic_skipped_steps", self._critic_skipped_steps)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfTRPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "TRPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfTRPO:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @classmethod
    def load(
        cls: type[SelfTRPO],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfTRPO:
        """
        Load a TRPO model as SB3's ``load`` does, after checking the file: one that is not a readable model
        zip, or that holds another algorithm's model (ACKTR, A2C, PPO, ...), is refused with a
        ``ValueError`` saying what it holds. A file of sb3-contrib's TRPO loads as it is (same keywords; see the
        class docstring for the two that differ by the action dimension: a warning says so when they do). The
        ``kwargs`` that are constructor keywords are checked as the constructor checks them.

        :param path: the file (a path, with or without ".zip", or a binary file object)
        :param env: the environment to run the loaded model on (if None, the saved one, if any)
        :param device: device on which the model should run
        :param custom_objects: saved attributes to replace instead of reading them (e.g. unreadable ones)
        :param print_system_info: whether to print the system information of the saving and of this machine
        :param force_reset: reset the environment before the next ``learn()``
        :param kwargs: attributes to set on the loaded model
        :return: the loaded model
        """
        accepted = (SavedModel("TRPO", OURS), SavedModel("TRPO", CONTRIB))
        saved, data = check_model_file(cls, accepted, path, custom_objects, kwargs)
        dimensions = kl_dimensions(data["action_space"]) if "action_space" in data else 1
        if saved.library == CONTRIB and dimensions > 1:
            warnings.warn(
                f"Loading a model of sb3-contrib's TRPO: its target_kl ({data.get('target_kl')}) and cg_damping "
                f"({data.get('cg_damping')}) are kept, but sb3-contrib averages the KL over the {dimensions} action "
                f"dimensions where this TRPO sums it: its trust region is {dimensions} times larger. To keep its "
                f"steps, load with target_kl and cg_damping multiplied by {dimensions}."
            )
        return super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )
