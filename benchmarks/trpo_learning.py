"""
Final return of our TRPO against sb3-contrib's TRPO with rl-zoo3's tuned hyperparameters (rl_zoo3/hyperparams/trpo.yml)
at the same budget, over several seeds.

    python benchmarks/trpo_learning.py [--envs CartPole-v1 Pendulum-v1] [--seeds 0 1 2 3 4] [--workers 2]

Each run trains with the zoo's n_envs / n_timesteps / hyperparameters, then evaluates the deterministic policy on 20
episodes of a separately seeded environment. Prints one line per run and a summary table (mean ± std over seeds).
"""

import argparse
import multiprocessing
import os
import time

import numpy as np
import yaml

ZOO_KEYS = ("n_envs", "n_timesteps", "policy", "normalize")


def zoo_hyperparams(env_id: str) -> dict:
    import rl_zoo3

    with open(os.path.join(os.path.dirname(rl_zoo3.__file__), "hyperparams", "trpo.yml")) as file:
        entry = yaml.safe_load(file)[env_id]
    if entry.get("normalize"):
        raise ValueError(f"{env_id} uses VecNormalize in the zoo; this script covers unnormalized envs only")
    return entry


def run(job: tuple[str, str, int]) -> tuple[str, str, int, float, float]:
    implementation, env_id, seed = job
    import torch as th
    from sb3_contrib import TRPO as ContribTRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_trpo_kfac import TRPO

    th.set_num_threads(1)
    entry = zoo_hyperparams(env_id)
    kwargs = {k: v for k, v in entry.items() if k not in ZOO_KEYS}
    algorithm = TRPO if implementation == "ours" else ContribTRPO
    start = time.perf_counter()
    model = algorithm(entry["policy"], make_vec_env(env_id, n_envs=entry["n_envs"], seed=seed), seed=seed, **kwargs)
    model.learn(int(entry["n_timesteps"]))
    elapsed = time.perf_counter() - start
    mean, _ = evaluate_policy(model, make_vec_env(env_id, n_envs=1, seed=10_000 + seed), n_eval_episodes=20)
    print(f"{implementation:<12} {env_id:<14} seed {seed}: return {mean:9.2f}  ({elapsed:6.1f} s)", flush=True)
    return implementation, env_id, seed, float(mean), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    jobs = [(impl, env_id, seed) for env_id in args.envs for seed in args.seeds for impl in ("ours", "sb3-contrib")]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run, jobs, chunksize=1)
    print(f"\n| env | implementation | final return (mean ± std over {len(args.seeds)} seeds) | per-seed | train time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for env_id in args.envs:
        for impl in ("ours", "sb3-contrib"):
            rows = [r for r in results if r[0] == impl and r[1] == env_id]
            returns = np.array([r[3] for r in rows])
            per_seed = ", ".join(f"{x:.1f}" for x in returns)
            seconds = np.mean([r[4] for r in rows])
            print(f"| {env_id} | {impl} | {returns.mean():.1f} ± {returns.std():.1f} | {per_seed} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
