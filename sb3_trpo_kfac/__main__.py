"""``python -m sb3_trpo_kfac train|enjoy ...``: rl-zoo3 with TRPO and ACKTR registered (see ``sb3_trpo_kfac.zoo``)."""

from sb3_trpo_kfac.zoo.cli import main

# Guarded: SubprocVecEnv's spawn/forkserver workers re-import the main module.
if __name__ == "__main__":
    main()
