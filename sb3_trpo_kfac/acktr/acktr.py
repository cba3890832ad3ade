import contextlib
import io
import pathlib
from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common import distributed
from sb3_trpo_kfac.common.adaptive_step import adapt_kl_step_factor, scale_kfac_step
from sb3_trpo_kfac.common.data_parallel import DataParallelAlgorithm, normalize_advantages
from sb3_trpo_kfac.common.distributed import mean_over_ranks
from sb3_trpo_kfac.common.fisher import detached_distribution, mean_kl
from sb3_trpo_kfac.common.gradient_clipping import clip_grad_norm_
from sb3_trpo_kfac.common.kfac import KFAC
from sb3_trpo_kfac.common.kfac.options import check_kfac_arguments, check_momentum
from sb3_trpo_kfac.common.kfac.renamed import renamed_keywords
from sb3_trpo_kfac.common.policy_parameters import (
    frozen_features_value_fn,
    split_actor_critic_parameters,
    zero_observations,
)
from sb3_trpo_kfac.common.saving import OURS, SavedModel, check_model_file
from sb3_trpo_kfac.common.validation import (
    SUPPORTED_ACTION_SPACES,
    ArgumentError,
    check_bool,
    check_float,
    check_int,
    check_on_policy_arguments,
    check_rollout_size,
)

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

# keywords renamed so that each K-FAC knob has the one name it has in KFAC (old name -> new name); old saved models
# carry the old attribute names, which _setup_model carries over
RENAMED = {"damping": "kfac_damping", "stats_decay": "kfac_stats_decay", "cold_iter": "kfac_cold_iter"}


class ACKTR(DataParallelAlgorithm):
    """
    Actor Critic using Kronecker-Factored Trust Region (ACKTR): A2C's loss, its gradient preconditioned by K-FAC
    (:class:`sb3_trpo_kfac.common.kfac.KFAC`) with a trust-region bound on the step.

    Paper: https://arxiv.org/abs/1708.05144 (Wu et al. 2017). Defaults follow OpenAI baselines / Stable-Baselines 2
    (learning rate 0.25, ``kfac_clip`` 0.001, momentum 0.9, ``kfac_damping`` 0.01, ``kfac_stats_decay`` 0.99,
    ``vf_fisher_coef`` 1.0, ``n_steps`` 20, ``ent_coef`` 0.01, ``vf_coef`` 0.25) except where noted
    (``kfac_cold_iter``: 0 here, 10 in baselines' Atari ACKTR; see below) and for the K-FAC cadence, chosen so that
    an update costs about what A2C's does: statistics every 10 updates from at most 128 samples of the batch,
    decompositions right after them, and only layers of more than 2²⁰ parameters kept low-rank
    (``kfac_stats_interval=10, kfac_update=10, kfac_stats_samples=128, kfac_low_rank="auto"``; SB2 and baselines:
    ``1, 1, None, None``). The K-FAC knobs have the names and the
    checks they have in ``KFAC``; ``damping``, ``stats_decay`` and ``cold_iter`` are their former names, still
    accepted (with a DeprecationWarning) and read from models saved with them.

    The K-FAC statistics come from a sampled "Fisher loss" on the same forward pass:
    ``−Σ log π(a|s) − vf_fisher_coef · Σ (V(s) − sg(V(s) + ε))²``, ε ~ N(0, 1), where ``a`` are the rollout actions
    (samples of the current policy: there is one update per rollout). The value term is baselines' form, kept as is:
    its gradient with respect to V is ``2 · vf_fisher_coef · ε``, so the value output's Fisher is
    ``4 · vf_fisher_coef²`` (4 at the default), not the unit variance of a unit-variance Gaussian likelihood. The
    K-FAC optimizer replaces ``policy.optimizer``, so ``save()`` / ``load()`` carry its statistics, eigenbases,
    counters and the state of its step rule.

    K-FAC preconditions; a first-order rule steps. By default it is the paper's momentum SGD
    (``buf ← momentum · buf + ν V``, ``θ ← θ − η (1 − momentum) buf``); as with A2C, ``policy_kwargs`` may name
    another (``optimizer_class``, with ``optimizer_kwargs``, e.g. ``dict(optimizer_class=th.optim.Adam)``), which
    then steps on the natural gradient scaled into the trust region (``.grad ← ν V``) at the learning rate η
    (``momentum`` is then unused, as A2C's ``rms_prop_eps`` is with an ``optimizer_class``).

    Logged per update: ``train/kfac_nu`` (ν) and ``train/kfac_quadratic_kl``, ``η² ν² Vᵀ F V`` of the preconditioned
    direction ``ν V`` before momentum (at most ``kfac_clip`` after the cold start); the applied step
    ``η (1 − momentum) buf`` also carries the earlier directions in the momentum buffer, which this value does not
    bound.

    An A2C user can swap the class name: every A2C keyword is accepted with A2C's meaning, except the default
    optimizer choice: ``use_rms_prop=True`` raises a ``ValueError`` (name RMSprop in ``policy_kwargs`` instead) and
    ``rms_prop_eps`` is accepted and ignored.

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate η of K-FAC, it can be a function
        of the current progress remaining (from 1 to 0). It also scales the trust region.
    :param n_steps: The number of steps to run for each environment per update
        (i.e. batch size is n_steps * n_env where n_env is number of environment copies running in parallel)
    :param gamma: Discount factor
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator.
        Equivalent to classic advantage when set to 1.
    :param ent_coef: Entropy coefficient for the loss calculation
    :param vf_coef: Value function coefficient for the loss calculation
    :param max_grad_norm: The maximum value for the gradient clipping (of the raw gradient, before K-FAC;
        also the clip of the cold-start steps)
    :param rms_prop_eps: Accepted for A2C compatibility and ignored (K-FAC replaces RMSprop)
    :param use_rms_prop: Must be False: the default step rule is momentum SGD (True raises a ValueError)
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation.
    :param normalize_advantage: Whether to normalize or not the advantage
    :param kfac_clip: Trust-region radius κ: the preconditioned gradient V is scaled by
        ν = min(1, sqrt(κ / (η² Vᵀ∇))) before it enters the momentum buffer
    :param vf_kfac_clip: If given, the critic-only parameters (value head and the critic's own layers) get their
        own trust region of this radius, and ``kfac_clip`` bounds the rest (actor and shared layers): a large
        value-loss step then no longer shrinks the policy's step. ``None`` (default): one trust region over all
        parameters, as in the ACKTR paper. OpenAI baselines' continuous-control ACKTR also trains its value
        function with a K-FAC optimizer of its own. On HalfCheetah-v5 (``zoo_hyperparams/acktr.yml``) the critic
        held most of ``Vᵀ∇`` in a joint trust region over the first updates and the policy barely moved.
    :param n_critic_updates: K-FAC steps on the value loss per rollout: ACKTR's joint step, then
        ``n_critic_updates - 1`` steps of the critic-only parameters on the same batch and K-FAC statistics, each
        clipped by ``max_grad_norm`` and inside the trust region of its group. 1 (default): the paper's single joint
        step. OpenAI baselines' continuous-control ACKTR fits its value function with 25 K-FAC steps per batch; our
        CartPole-v1 zoo entry uses 5 (it halved the steps to return 475; ``zoo_hyperparams/acktr.yml``).
    :param kfac_damping: Tikhonov damping added to the Kronecker-factored Fisher
    :param momentum: Momentum of the default step rule (the step is η (1 − momentum) times the momentum buffer)
    :param kfac_stats_decay: Running-average factor of the Kronecker factors, per update
    :param kfac_update: Recompute the eigendecompositions (or inverses) of the factors every this many updates
        (at the first update with new statistics once this many have passed, so with ``kfac_stats_interval``
        they follow the statistics). Default 10: right after each statistics update (1: SB2's and baselines')
    :param kfac_stats_interval: Update the K-FAC statistics every this many updates (1: every update, as SB2 and
        baselines; larger values save the extra backward pass and factor products). The running averages then decay
        by ``kfac_stats_decay ** kfac_stats_interval`` per statistics update, so their memory in updates is unchanged.
        Default 10: with ``kfac_update=10`` the K-FAC overhead per update is a tenth of the paper's cadence (see
        docs/performance.md for the cost and the learning measured with it)
    :param kfac_inverse: ``"eigen"`` (exact damping via eigendecompositions) or ``"inverse"`` (factored
        damping with plain inverses, cheaper for large layers)
    :param kfac_low_rank: If an int, input factors larger than 1024 keep only this many eigenpairs (plus the mean
        of the others): cheaper solves for large layers such as NatureCNN's 3136 -> 512 (see ``KFAC``). ``"auto"``
        (default): only layers of more than 2²⁰ parameters (NatureCNN's 3136 -> 512; none of the default MLPs) keep 64
        eigenpairs of each factor (with ``kfac_inverse="eigen"``; of the input factor with ``"inverse"``), which
        replaces the eigendecomposition of a 3137 x 3137 matrix and the solve's products with it by products with 64
        vectors; every other layer is solved exactly. None: every factor in full (SB2's)
    :param kfac_async: Compute the eigendecompositions (or inverses) in a background thread, overlapped with
        the next rollout: each update then uses the basis of the previous update's statistics (the first one is
        computed synchronously). Deterministic; it needs a free second CPU core to pay off. Off by default (it
        starts a thread); the shipped CartPole-v1 entry uses it with ``kfac_refine=1``, which makes the update that
        waits for the new basis solve its own statistics anyway.
    :param kfac_refine: Conjugate-gradient iterations on the current K-FAC factors, preconditioned by the last
        decomposition, in the updates whose statistics are newer than it: with ``kfac_update > 1`` or ``kfac_async``
        the step then follows the current statistics although the decompositions lag behind. 0 (default): none.
    :param kfac_stats_samples: Each statistics update estimates the factors from at most this many samples of the
        batch, drawn uniformly without replacement (an unbiased estimate of the whole batch's factors; the backward
        that gives the layer-output gradients still runs on the whole batch). Default 128: it matters for large
        batches of images (the conv patches make the factor products of one sample cost about twice an A2C update's
        arithmetic on it); None: every sample (SB2's)
    :param kfac_split_decompositions: In data-parallel training (the model built inside a ``torch.distributed``
        process group of several processes): True, each K-FAC block's decompositions are computed by one rank (blocks
        balanced by cost) and broadcast; False, every rank computes all of them. None (default): split when the
        decompositions are expensive enough to pay for the exchange (e.g. NatureCNN, not a small MLP; measured in
        ``docs/performance.md``). Ignored in a single process.
    :param vf_fisher_coef: Weight c of the value term ``c · Σ (V − sg(V + ε))²`` of the Fisher loss; the value
        output's Fisher is then ``4 c²`` (baselines' convention), not 1
    :param kfac_cold_iter: Number of initial updates done without preconditioning (gradient clipped to
        ``max_grad_norm``, no trust region) while the statistics warm up. With the default step rule their step is
        ``η (1 − momentum) · clip(g)`` from rest (see ``KFAC``); OpenAI baselines' Atari ACKTR uses ``cold_iter=10``
        and runs these updates with momentum at the learning rate itself, without the ``(1 − momentum)`` factor, i.e.
        about 10x larger at momentum 0.9. Our default 0 uses K-FAC from the first update (its factors come from that
        update's own batch).
    :param target_kl: If set, the step size follows the measured KL, as in OpenAI baselines' continuous-control ACKTR
        (target 0.002 there): after each update the mean KL(π_old ‖ π_new) of the policy on the batch (a mean over
        ranks when data-parallel) is compared with this target, and a step factor f is divided by 1.5 when it is above
        ``2 · target_kl`` and multiplied by 1.5 when below ``target_kl / 2``, within [0.01, 10]. f scales the whole step
        of the policy's parameters (those of the critic's own trust region, with ``vf_kfac_clip``, keep theirs): the
        learning rate by f and ``kfac_clip`` by f², which leaves ν unchanged, so the step is f times the one without
        the rule whether the trust region binds or not (baselines scales the learning rate alone, which does nothing
        while the trust region binds, as it does at every update of our HalfCheetah-v5 entry). A non-finite KL, or an
        update with a skipped step, leaves f. f (``kl_step_factor``) is saved with the model. Cost: two forward passes
        of the actor on the batch per update (in eval mode, as in the rollout), none when ``None`` (default).
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: Verbosity level: 0 for no output, 1 for info messages (such as device or wrappers used), 2 for
        debug messages
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    :param renamed: ``damping``, ``stats_decay``, ``cold_iter``: former names of ``kfac_damping``,
        ``kfac_stats_decay``, ``kfac_cold_iter`` (DeprecationWarning)
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }
    policy: ActorCriticPolicy

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.25,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = False,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = False,
        kfac_clip: float = 0.001,
        vf_kfac_clip: float | None = None,
        n_critic_updates: int = 1,
        kfac_damping: float = 0.01,
        momentum: float = 0.9,
        kfac_stats_decay: float = 0.99,
        kfac_update: int = 10,
        kfac_stats_interval: int = 10,
        kfac_inverse: str = "eigen",
        kfac_low_rank: int | str | None = "auto",
        kfac_async: bool = False,
        kfac_refine: int = 0,
        kfac_stats_samples: int | None = 128,
        kfac_split_decompositions: bool | None = None,
        vf_fisher_coef: float = 1.0,
        kfac_cold_iter: int = 0,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        **renamed: Any,
    ):
        given = dict(kfac_damping=kfac_damping, kfac_stats_decay=kfac_stats_decay, kfac_cold_iter=kfac_cold_iter)
        defaults = {"kfac_damping": 0.01, "kfac_stats_decay": 0.99, "kfac_cold_iter": 0}
        given.update(renamed_keywords("ACKTR", renamed, RENAMED, {k: (v, defaults[k]) for k, v in given.items()}))
        # Fail before building anything.
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
        if check_bool("use_rms_prop", use_rms_prop):
            raise ArgumentError(
                "`use_rms_prop=True` is not supported: ACKTR's default step rule is momentum SGD (leave it False, or "
                "pass policy_kwargs=dict(optimizer_class=th.optim.RMSprop))"
            )
        if policy_kwargs is not None and "optimizer_kwargs" in policy_kwargs and "optimizer_class" not in policy_kwargs:
            raise ArgumentError(
                "`policy_kwargs['optimizer_kwargs']` needs `policy_kwargs['optimizer_class']`: the default step rule "
                "is K-FAC's momentum SGD, set by `momentum`"
            )
        check_float("rms_prop_eps", rms_prop_eps, 0.0)  # accepted for A2C compatibility, unused
        normalize_advantage = check_bool("normalize_advantage", normalize_advantage)
        check_rollout_size(on_policy_kwargs["n_steps"], env, normalize_advantage)
        check_bool("_init_setup_model", _init_setup_model)
        ent_coef = check_float("ent_coef", ent_coef, 0.0)
        vf_coef = check_float("vf_coef", vf_coef, 0.0)
        # inf: no clipping, as in A2C
        max_grad_norm = check_float("max_grad_norm", max_grad_norm, 0.0, low_inclusive=False, allow_inf=True)
        self.vf_kfac_clip = (
            None if vf_kfac_clip is None else check_float("vf_kfac_clip", vf_kfac_clip, 0.0, low_inclusive=False)
        )
        self.n_critic_updates = check_int("n_critic_updates", n_critic_updates, 1)
        self.vf_fisher_coef = check_float("vf_fisher_coef", vf_fisher_coef, 0.0)
        self.target_kl = None if target_kl is None else check_float("target_kl", target_kl, 0.0, low_inclusive=False)
        self.kl_step_factor = 1.0  # state of the target_kl rule, saved with the model
        # the K-FAC knobs: KFAC's own checks (options.py), run here too so that a bad value fails this early
        self.momentum = check_momentum(momentum)
        knobs = check_kfac_arguments(
            kfac_clip=kfac_clip, kfac_update=kfac_update, kfac_stats_interval=kfac_stats_interval,
            kfac_inverse=kfac_inverse, kfac_low_rank=kfac_low_rank, kfac_async=kfac_async, kfac_refine=kfac_refine,
            kfac_stats_samples=kfac_stats_samples,
            kfac_split_decompositions=kfac_split_decompositions, **given,
        )  # fmt: skip
        self.kfac_clip: float = knobs["kfac_clip"]
        self.kfac_damping: float = knobs["kfac_damping"]
        self.kfac_stats_decay: float = knobs["kfac_stats_decay"]
        self.kfac_update: int = knobs["kfac_update"]
        self.kfac_stats_interval: int = knobs["kfac_stats_interval"]
        self.kfac_cold_iter: int = knobs["kfac_cold_iter"]
        self.kfac_inverse: str = knobs["kfac_inverse"]
        self.kfac_low_rank: int | str | None = knobs["kfac_low_rank"]
        self.kfac_async: bool = knobs["kfac_async"]
        self.kfac_refine: int = knobs["kfac_refine"]
        self.kfac_stats_samples: int | None = knobs["kfac_stats_samples"]
        self.kfac_split_decompositions: bool | None = knobs["kfac_split_decompositions"]

        super().__init__(
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            _init_setup_model=False,
            supported_action_spaces=SUPPORTED_ACTION_SPACES,
            **on_policy_kwargs,
        )

        self.normalize_advantage = normalize_advantage

        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        for old, new in RENAMED.items():  # a model saved before the renaming
            if old in self.__dict__:
                setattr(self, new, self.__dict__.pop(old))
        super()._setup_model()
        params = None
        # parameters only the value depends on: own trust region (vf_kfac_clip) and extra steps (n_critic_updates)
        self._critic_params: list[nn.Parameter] = []
        if self.vf_kfac_clip is not None or self.n_critic_updates > 1:
            _, self._critic_params = split_actor_critic_parameters(
                self.policy, zero_observations(self.observation_space, 2, self.device)
            )
            if not self._critic_params:
                name = "vf_kfac_clip" if self.vf_kfac_clip is not None else "n_critic_updates"
                raise ValueError(f"`{name}` needs critic-only parameters, but the policy's value shares all its layers")
        if self.vf_kfac_clip is not None:
            critic_ids = {id(p) for p in self._critic_params}
            actor = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in critic_ids]
            params = [{"params": actor}, {"params": self._critic_params, "kfac_clip": self.vf_kfac_clip}]
        # the step rule: the paper's momentum SGD, or the optimizer policy_kwargs name (as the policy resolved it)
        step_rule: dict[str, Any] = dict(momentum=self.momentum)
        if "optimizer_class" in self.policy_kwargs:
            step_rule = dict(optimizer_class=self.policy.optimizer_class, optimizer_kwargs=self.policy.optimizer_kwargs)
        # K-FAC replaces the policy's optimizer, so SB3's save/load ("policy.optimizer") carries its state.
        self.policy.optimizer = KFAC(
            self.policy,
            params=params,
            lr=self.lr_schedule(1),
            kfac_clip=self.kfac_clip,
            kfac_damping=self.kfac_damping,
            kfac_stats_decay=self.kfac_stats_decay,
            kfac_stats_interval=self.kfac_stats_interval,
            kfac_update=self.kfac_update,
            kfac_cold_iter=self.kfac_cold_iter,
            kfac_cold_max_grad_norm=self.max_grad_norm,
            kfac_inverse=self.kfac_inverse,
            kfac_low_rank=self.kfac_low_rank,
            kfac_async=self.kfac_async,
            kfac_refine=self.kfac_refine,
            # a model saved before the knob existed has no attribute
            kfac_stats_samples=getattr(self, "kfac_stats_samples", None),
            # absent from models saved before data-parallel training existed
            kfac_split_decompositions=getattr(self, "kfac_split_decompositions", None),
            **step_rule,
        )

    def train(self) -> None:
        """
        Update policy using the currently gathered rollout buffer (one K-FAC step over the whole data).
        """
        # Switch to train mode (this affects batch norm / dropout)
        self.policy.set_training_mode(True)
        optimizer: KFAC = self.policy.optimizer  # type: ignore[assignment]
        self._update_learning_rate(optimizer)
        if self.target_kl is not None:
            scale_kfac_step(optimizer.param_groups[0], optimizer.param_groups[0]["lr"], self.kfac_clip, self.kl_step_factor)

        # This will only loop once (get all data in one go)
        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                # Convert discrete action from float to long
                actions = actions.long().flatten()
            if self.target_kl is not None:
                old_distribution = self._rollout_distribution(rollout_data.observations)
                skipped_before = optimizer.counters["skipped_steps"]

            update_stats = self._n_updates % self.kfac_stats_interval == 0
            with optimizer.capture_gradient_rows(), optimizer.collect() if update_stats else contextlib.nullcontext():
                values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
            values = values.flatten()

            advantages = rollout_data.advantages
            if self.normalize_advantage:
                advantages = normalize_advantages(advantages)

            policy_loss = -(advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values)
            if entropy is None:
                # Approximate entropy when no analytical form
                entropy_loss = -th.mean(-log_prob)
            else:
                entropy_loss = -th.mean(entropy)
            loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

            if update_stats:
                # Sampled Fisher loss on the same forward: the rollout actions are samples of the current policy;
                # the value's sample is V + ε, ε ~ N(0, 1) (value-output Fisher 4 · vf_fisher_coef², baselines' form).
                noisy_values = (values + self._fisher_value_noise(values)).detach()
                fisher_loss = -log_prob.sum() - self.vf_fisher_coef * ((values - noisy_values) ** 2).sum()
                optimizer.update_statistics(fisher_loss)

            optimizer.zero_grad()
            loss.backward()
            # the mean over all ranks' samples, before the clip (which then sees the global norm)
            distributed.all_reduce_gradients_(p for p in self.policy.parameters() if p.grad is not None)
            clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            optimizer.step()
            nus, vfvs = optimizer.last_nu, optimizer.last_vfv  # of the joint step, for the logs
            self._fit_critic(rollout_data.observations, rollout_data.returns)
            if self.target_kl is not None:
                skipped = optimizer.counters["skipped_steps"] > skipped_before
                self._adapt_kl_step(rollout_data.observations, old_distribution, skipped)

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        # ν: trust-region scale; quadratic KL: lr² ν² Vᵀ F V of ν V before momentum (≤ kfac_clip after the cold start)
        self.logger.record("train/kfac_nu", nus[0])
        self.logger.record("train/kfac_quadratic_kl", nus[0] ** 2 * vfvs[0])
        if len(nus) == 2:  # the critic's own trust region (vf_kfac_clip)
            self.logger.record("train/vf_kfac_nu", nus[1])
            self.logger.record("train/vf_kfac_quadratic_kl", nus[1] ** 2 * vfvs[1])
        self.logger.record("train/kfac_skipped_steps", optimizer.counters["skipped_steps"])
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

    def _fisher_value_noise(self, values: th.Tensor) -> th.Tensor:
        """ε ~ N(0, 1) per sample, the value's sample in the Fisher loss (drawn per rank in data-parallel training)."""
        return th.randn_like(values)

    def _rollout_distribution(self, observations: PyTorchObs) -> Distribution:
        """The policy's action distribution on the batch, detached, computed as in the rollout (eval mode)."""
        self.policy.set_training_mode(False)
        with th.no_grad():
            distribution = detached_distribution(self.policy.get_distribution(observations))
        self.policy.set_training_mode(True)
        return distribution

    def _adapt_kl_step(self, observations: PyTorchObs, old_distribution: Distribution, skipped: bool) -> None:
        """
        ``target_kl``'s rule after an update: the mean KL(π_old ‖ π_new) on the batch (over all ranks) sets the step
        factor of the next update. The critic's extra steps move critic-only parameters, so the policy measured here is
        the one the joint step made.
        """
        assert self.target_kl is not None
        with th.no_grad():
            kl = float(mean_over_ranks(mean_kl(old_distribution, self._rollout_distribution(observations))))
        self.logger.record("train/kl_step_factor", self.kl_step_factor)  # the factor this update used
        self.logger.record("train/kl", kl)
        if not skipped:  # a skipped step did not move the policy: its zero KL says nothing of the step size
            self.kl_step_factor = adapt_kl_step_factor(self.kl_step_factor, kl, self.target_kl)

    def _fit_critic(self, observations: PyTorchObs, returns: th.Tensor) -> None:
        """The ``n_critic_updates - 1`` extra K-FAC steps of the critic-only parameters on the value loss."""
        if self.n_critic_updates == 1:
            return
        optimizer = self.policy.optimizer
        assert isinstance(optimizer, KFAC)
        # A shared extractor is an actor layer: its features stay the same through these steps, computed once
        # (unless the policy overrides predict_values, which is then called as it is).
        inputs, predict = frozen_features_value_fn(self.policy, observations, self._critic_params)
        optimizer.zero_grad()  # the actor has no gradient, so these steps leave it as it is
        for _ in range(self.n_critic_updates - 1):
            values = predict(inputs)
            value_loss = F.mse_loss(returns, values.flatten())
            grads = th.autograd.grad(self.vf_coef * value_loss, self._critic_params)
            distributed.all_reduce_mean_(grads)  # all ranks' samples, before the clip
            for param, grad in zip(self._critic_params, grads, strict=True):
                param.grad = grad
            clip_grad_norm_(self._critic_params, self.max_grad_norm)
            optimizer.step(refresh_curvature=False)

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, Any],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """
        SB3's ``set_parameters``, then the model's trust-region radii (and the momentum of the default step rule) are
        written into the loaded optimizer state, whose parameter groups would otherwise keep the saved values:
        ``ACKTR.load(path, kfac_clip=...)`` (rl-zoo3's ``train -i``) then trains with what the model says.

        :param load_path_or_dict: as SB3's
        :param exact_match: as SB3's
        :param device: as SB3's
        """
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)
        radii = [self.kfac_clip] if self.vf_kfac_clip is None else [self.kfac_clip, self.vf_kfac_clip]
        for group, radius in zip(self.policy.optimizer.param_groups, radii, strict=True):
            group["kfac_clip"] = radius
            if "optimizer_class" not in self.policy_kwargs:  # the paper's momentum SGD (else momentum is unused)
                group["momentum"] = self.momentum

    def _excluded_save_params(self) -> list[str]:
        # The parameter list points into the live policy; it is rebuilt after loading.
        return [*super()._excluded_save_params(), "_critic_params"]

    def learn(
        self: SelfACKTR,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "ACKTR",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfACKTR:
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
        cls: type[SelfACKTR],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfACKTR:
        """
        Load an ACKTR model as SB3's ``load`` does, after checking the file: one that is not a readable model
        zip, or that holds another algorithm's model (TRPO, A2C, PPO, ...; an A2C model's optimizer
        state is not K-FAC's), is refused with a ``ValueError`` saying what it holds. The ``kwargs`` that are
        constructor keywords are checked as the constructor checks them.

        :param path: the file (a path, with or without ".zip", or a binary file object)
        :param env: the environment to run the loaded model on (if None, the saved one, if any)
        :param device: device on which the model should run
        :param custom_objects: saved attributes to replace instead of reading them (e.g. unreadable ones)
        :param print_system_info: whether to print the system information of the saving and of this machine
        :param force_reset: reset the environment before the next ``learn()``
        :param kwargs: attributes to set on the loaded model
        :return: the loaded model
        """
        check_model_file(cls, (SavedModel("ACKTR", OURS),), path, custom_objects, kwargs)
        return super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )
