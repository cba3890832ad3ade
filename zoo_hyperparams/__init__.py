"""rl-zoo3 hyperparameter files shipped with sb3_trpo_kfac (see ``sb3_trpo_kfac.zoo.hyperparams_path``)."""
