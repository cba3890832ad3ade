"""``torchrun --nproc-per-node 2 -m sb3_trpo_kfac train``: a data-parallel rl-zoo3 run whose log folder is rank 0's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

N_ENVS = 2  # the CartPole-v1 entry of zoo_hyperparams/trpo.yml
N_STEPS = 64


def test_torchrun_trains_trpo_with_rank_0_alone_writing_the_log_folder(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "sb3_trpo_kfac", "train", "--algo", "trpo", "--env", "CartPole-v1", "-n", str(4 * 2 * N_ENVS * N_STEPS),
        "--eval-freq", str(2 * 2 * N_ENVS * N_STEPS), "--eval-episodes", "1",
        "-params", f"n_steps:{N_STEPS}", f"batch_size:{N_ENVS * N_STEPS}", "n_critic_updates:2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # one seed, drawn once for both ranks
    # (not anchored at line starts: the two ranks share one stdout pipe, so their lines may interleave)
    seeds = re.findall(r"Seed: (\d+)", result.stdout)
    assert len(seeds) == 2 and seeds[0] == seeds[1]
    # rank 0 wrote the log folder, rank 1 a temporary one that is gone
    log_paths = re.findall(r"Log path: (\S+?CartPole-v1_1)", result.stdout)
    ours, other = sorted(log_paths, key=os.path.isabs)
    assert ours == "logs/trpo/CartPole-v1_1"
    assert os.path.isabs(other) and not Path(other).exists()
    run = tmp_path / "logs" / "trpo" / "CartPole-v1_1"
    assert [path.name for path in (tmp_path / "logs" / "trpo").iterdir()] == ["CartPole-v1_1"]
    assert {path.name for path in run.iterdir()} == {
        "CartPole-v1", "CartPole-v1.zip", "best_model.zip", "evaluations.npz", "0.monitor.csv", "1.monitor.csv"
    }  # fmt: skip
    # evaluation every --eval-freq timesteps of both ranks
    timesteps = np.load(run / "evaluations.npz")["timesteps"]
    assert list(timesteps) == [2 * 2 * N_ENVS * N_STEPS, 4 * 2 * N_ENVS * N_STEPS]
