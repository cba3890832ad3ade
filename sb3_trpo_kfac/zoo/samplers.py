"""
Optuna samplers and converters for rl-zoo3's ``-optimize`` mode.

rl-zoo3 calls a sampler as ``sampler(trial, n_actions, n_envs, additional_args)`` and passes the returned keywords
to the algorithm's constructor. A converter maps a finished trial's raw ``trial.params`` back to the same keywords
(``--storage ... --study-name ... --trial-id N`` uses it to train with a trial's hyperparameters), so every sampler
here suggests raw values, then calls its converter: the two can never disagree.

A sampled combination that cannot work raises ``ValueError``; ``sb3_trpo_kfac.zoo.register()`` makes such a trial
pruned instead of aborting the study.
"""

from typing import Any

import optuna
from torch import nn

# Shared by both algorithms; "tiny" and "small" are the SB3 / rl-zoo3 sizes, "medium" is rl-zoo3's.
NET_ARCH: dict[str, dict[str, list[int]]] = {
    "tiny": dict(pi=[64], vf=[64]),
    "small": dict(pi=[64, 64], vf=[64, 64]),
    "medium": dict(pi=[256, 256], vf=[256, 256]),
}

ACTIVATION_FN: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

# Fewer samples than this make a Fisher estimate (TRPO) or K-FAC statistics (ACKTR) mostly noise.
MIN_FISHER_SAMPLES = 32


def _convert_common(params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn the raw parameters both samplers share into constructor keywords; the others are copied unchanged.

    :param params: raw ``trial.params``
    :return: constructor keywords
    """
    hyperparams = dict(params)
    # Discounts are searched as 1 - x on a log scale: the interesting values crowd near 1.
    for name in ("gamma", "gae_lambda"):
        key = f"one_minus_{name}"
        if key in hyperparams:
            hyperparams[name] = 1.0 - hyperparams.pop(key)
    for name in ("n_steps", "batch_size"):
        key = f"{name}_pow"
        if key in hyperparams:
            hyperparams[name] = 2 ** int(hyperparams.pop(key))

    policy_kwargs: dict[str, Any] = {}
    if "net_arch" in hyperparams:
        policy_kwargs["net_arch"] = NET_ARCH[hyperparams.pop("net_arch")]
    if "activation_fn" in hyperparams:
        policy_kwargs["activation_fn"] = ACTIVATION_FN[hyperparams.pop("activation_fn")]
    if "log_std_init" in hyperparams:
        policy_kwargs["log_std_init"] = hyperparams.pop("log_std_init")
    if "ortho_init" in hyperparams:
        policy_kwargs["ortho_init"] = hyperparams.pop("ortho_init")
    if policy_kwargs:
        hyperparams["policy_kwargs"] = policy_kwargs
    return hyperparams


def convert_trpo_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Map raw TRPO trial parameters (as stored in an Optuna study) to ``sb3_trpo_kfac.TRPO`` keywords.

    :param sampled_params: ``trial.params`` of a trial sampled by :func:`sample_trpo_params`
    :return: constructor keywords
    """
    hyperparams = _convert_common(sampled_params)
    # Stored as a string: "none" reads better than a null in the study and in reports.
    if hyperparams.get("cg_preconditioner") == "none":
        hyperparams["cg_preconditioner"] = None
    return hyperparams


def convert_acktr_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Map raw ACKTR trial parameters (as stored in an Optuna study) to ``sb3_trpo_kfac.ACKTR`` keywords.

    A linear learning-rate schedule comes out in rl-zoo3's ``"lin_<initial value>"`` form, which rl-zoo3 turns into
    a schedule when it reads hyperparameters (and which reads well in the saved ``config.yml``).

    :param sampled_params: ``trial.params`` of a trial sampled by :func:`sample_acktr_params`
    :return: constructor keywords
    """
    hyperparams = _convert_common(sampled_params)
    hyperparams.pop("trust_region", None)  # "separate" comes with a vf_kfac_clip
    if hyperparams.pop("lr_schedule", "constant") == "linear":
        hyperparams["learning_rate"] = f"lin_{hyperparams['learning_rate']}"
    return hyperparams


def _check_batch(n_steps: int, n_envs: int, batch_size: int | None = None) -> None:
    """
    :param n_steps: steps per environment per rollout
    :param n_envs: number of parallel environments
    :param batch_size: critic minibatch size (TRPO), if any
    :raises ValueError: if the rollout is too small for a curvature estimate, or smaller than one minibatch
    """
    buffer_size = n_steps * n_envs
    if buffer_size < MIN_FISHER_SAMPLES:
        raise ValueError(
            f"n_steps * n_envs = {n_steps} * {n_envs} = {buffer_size} < {MIN_FISHER_SAMPLES} samples per update"
        )
    if batch_size is not None and batch_size > buffer_size:
        raise ValueError(f"batch_size {batch_size} > n_steps * n_envs = {buffer_size}")


def sample_trpo_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sampler for ``sb3_trpo_kfac.TRPO`` (rl-zoo3 signature).

    Searches the trust region (``target_kl``), the natural-gradient solve (``cg_damping``, ``cg_max_steps``,
    ``cg_preconditioner``, ``fisher_subsample``), the rollout size, the critic fit (``n_critic_updates``, ``batch_size``,
    ``learning_rate``), the discounts and the network.

    :param trial: the Optuna trial
    :param n_actions: action dimension for continuous actions, 0 otherwise
    :param n_envs: number of parallel environments
    :param additional_args: rl-zoo3's extra information (unused: on-policy, no replay buffer)
    :return: constructor keywords
    :raises ValueError: for a combination that cannot work (rollout smaller than a minibatch, too few Fisher samples)
    """
    # n_steps from 2**5=32 to 2**12=4096 per env, critic minibatch from 32 to 1024
    n_steps_pow = trial.suggest_int("n_steps_pow", 5, 12)
    batch_size_pow = trial.suggest_int("batch_size_pow", 5, 10)
    one_minus_gamma = trial.suggest_float("one_minus_gamma", 1e-4, 0.03, log=True)
    one_minus_gae_lambda = trial.suggest_float("one_minus_gae_lambda", 1e-4, 0.1, log=True)
    target_kl = trial.suggest_float("target_kl", 1e-3, 0.1, log=True)
    cg_damping = trial.suggest_float("cg_damping", 1e-3, 0.5, log=True)
    cg_max_steps = trial.suggest_int("cg_max_steps", 5, 30)
    # A K-FAC preconditioner lets CG reach the same residual in fewer steps, which matters when cg_max_steps is small.
    cg_preconditioner = trial.suggest_categorical("cg_preconditioner", ["none", "kfac"])
    fisher_subsample = trial.suggest_categorical("fisher_subsample", [0.1, 0.2, 0.5, 1.0])
    line_search_shrinking_factor = trial.suggest_categorical("line_search_shrinking_factor", [0.6, 0.7, 0.8, 0.9])
    # Critic (Adam) learning rate and epochs
    learning_rate = trial.suggest_float("learning_rate", 1e-5, 3e-3, log=True)
    n_critic_updates = trial.suggest_int("n_critic_updates", 5, 30)
    net_arch = trial.suggest_categorical("net_arch", ["small", "medium"])
    activation_fn = trial.suggest_categorical("activation_fn", ["tanh", "relu"])
    sampled: dict[str, Any] = {
        "n_steps_pow": n_steps_pow,
        "batch_size_pow": batch_size_pow,
        "one_minus_gamma": one_minus_gamma,
        "one_minus_gae_lambda": one_minus_gae_lambda,
        "target_kl": target_kl,
        "cg_damping": cg_damping,
        "cg_max_steps": cg_max_steps,
        "cg_preconditioner": cg_preconditioner,
        "fisher_subsample": fisher_subsample,
        "line_search_shrinking_factor": line_search_shrinking_factor,
        "learning_rate": learning_rate,
        "n_critic_updates": n_critic_updates,
        "net_arch": net_arch,
        "activation_fn": activation_fn,
    }
    if n_actions > 0:
        # Continuous actions: the initial exploration noise matters as much as the step size.
        sampled["log_std_init"] = trial.suggest_float("log_std_init", -3.0, 0.5)

    hyperparams = convert_trpo_params(sampled)
    # Show the real values next to the raw ones in the study.
    for key in ("n_steps", "batch_size", "gamma", "gae_lambda"):
        trial.set_user_attr(key, hyperparams[key])
    _check_batch(hyperparams["n_steps"], n_envs, hyperparams["batch_size"])
    n_fisher = round(fisher_subsample * hyperparams["n_steps"] * n_envs)
    if n_fisher < MIN_FISHER_SAMPLES:
        raise ValueError(f"fisher_subsample {fisher_subsample} leaves {n_fisher} < {MIN_FISHER_SAMPLES} Fisher samples")
    return hyperparams


def sample_acktr_params(trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sampler for ``sb3_trpo_kfac.ACKTR`` (rl-zoo3 signature).

    Searches the step size and its schedule, the K-FAC trust region (``kfac_clip``, and whether the critic gets its
    own, ``vf_kfac_clip``), extra critic steps (``n_critic_updates``), damping (``kfac_damping``), statistics decay
    (``kfac_stats_decay``) and refresh period (``kfac_update``), the inverse mode (``kfac_inverse``), the loss weights
    (``vf_coef``, ``vf_fisher_coef``, ``ent_coef``), the rollout length, the discounts, advantage normalization and the
    network.

    :param trial: the Optuna trial
    :param n_actions: action dimension for continuous actions, 0 otherwise
    :param n_envs: number of parallel environments
    :param additional_args: rl-zoo3's extra information (unused: on-policy, no replay buffer)
    :return: constructor keywords
    :raises ValueError: for a rollout too small to estimate the K-FAC factors
    """
    # n_steps from 2**3=8 (the paper's regime with many envs) to 2**11=2048 (continuous control, few envs)
    n_steps_pow = trial.suggest_int("n_steps_pow", 3, 11)
    one_minus_gamma = trial.suggest_float("one_minus_gamma", 1e-4, 0.03, log=True)
    one_minus_gae_lambda = trial.suggest_float("one_minus_gae_lambda", 1e-4, 0.1, log=True)
    # The natural-gradient step: the paper uses 0.25 with kfac_clip 0.001, the SB2 zoo's tuned values span 0.02-0.3.
    learning_rate = trial.suggest_float("learning_rate", 1e-3, 1.0, log=True)
    lr_schedule = trial.suggest_categorical("lr_schedule", ["constant", "linear"])
    kfac_clip = trial.suggest_float("kfac_clip", 1e-4, 0.1, log=True)
    # One trust region for actor and critic (the paper), or one each (ACKTR's vf_kfac_clip).
    trust_region = trial.suggest_categorical("trust_region", ["joint", "separate"])
    vf_kfac_clip = trial.suggest_float("vf_kfac_clip", 1e-4, 1.0, log=True) if trust_region == "separate" else None
    n_critic_updates = trial.suggest_categorical("n_critic_updates", [1, 5, 10, 25])
    kfac_damping = trial.suggest_float("kfac_damping", 1e-4, 0.1, log=True)
    kfac_stats_decay = trial.suggest_categorical("kfac_stats_decay", [0.9, 0.95, 0.99])
    kfac_update = trial.suggest_categorical("kfac_update", [1, 2, 5, 10])
    # Exact damping through eigendecompositions, or the cheaper factored-damping inverses.
    kfac_inverse = trial.suggest_categorical("kfac_inverse", ["eigen", "inverse"])
    vf_coef = trial.suggest_float("vf_coef", 0.1, 1.0)
    vf_fisher_coef = trial.suggest_float("vf_fisher_coef", 0.1, 10.0, log=True)
    ent_coef = trial.suggest_float("ent_coef", 1e-8, 0.1, log=True)
    max_grad_norm = trial.suggest_float("max_grad_norm", 0.3, 10.0, log=True)
    normalize_advantage = trial.suggest_categorical("normalize_advantage", [False, True])
    net_arch = trial.suggest_categorical("net_arch", ["tiny", "small", "medium"])
    activation_fn = trial.suggest_categorical("activation_fn", ["tanh", "relu"])
    sampled: dict[str, Any] = {
        "n_steps_pow": n_steps_pow,
        "one_minus_gamma": one_minus_gamma,
        "one_minus_gae_lambda": one_minus_gae_lambda,
        "learning_rate": learning_rate,
        "lr_schedule": lr_schedule,
        "kfac_clip": kfac_clip,
        "trust_region": trust_region,
        "n_critic_updates": n_critic_updates,
        "kfac_damping": kfac_damping,
        "kfac_stats_decay": kfac_stats_decay,
        "kfac_update": kfac_update,
        "kfac_inverse": kfac_inverse,
        "vf_coef": vf_coef,
        "vf_fisher_coef": vf_fisher_coef,
        "ent_coef": ent_coef,
        "max_grad_norm": max_grad_norm,
        "normalize_advantage": normalize_advantage,
        "net_arch": net_arch,
        "activation_fn": activation_fn,
    }
    if vf_kfac_clip is not None:
        sampled["vf_kfac_clip"] = vf_kfac_clip
    if n_actions > 0:
        sampled["log_std_init"] = trial.suggest_float("log_std_init", -3.0, 0.5)

    hyperparams = convert_acktr_params(sampled)
    for key in ("n_steps", "gamma", "gae_lambda"):
        trial.set_user_attr(key, hyperparams[key])
    _check_batch(hyperparams["n_steps"], n_envs)
    if isinstance(hyperparams["learning_rate"], str):
        # rl-zoo3 only parses "lin_x" strings in the config file; a sampled value goes straight to the constructor.
        from rl_zoo3.utils import SimpleLinearSchedule

        hyperparams["learning_rate"] = SimpleLinearSchedule(learning_rate)
    return hyperparams


HYPERPARAMS_SAMPLER = {"trpo": sample_trpo_params, "acktr": sample_acktr_params}
HYPERPARAMS_CONVERTER = {"trpo": convert_trpo_params, "acktr": convert_acktr_params}
