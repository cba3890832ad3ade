"""``python -m sb3_trpo_kfac COMMAND ...``: rl-zoo3's scripts with TRPO and ACKTR registered (see ``zoo.cli``)."""

from sb3_trpo_kfac.zoo.cli import main

# Guarded: SubprocVecEnv's spawn/forkserver workers re-import the main module.
if __name__ == "__main__":
    main()
