"""
Final return of our TRPO against sb3-contrib's TRPO, each with its shipped zoo entry (ours: zoo_hyperparams/trpo.yml;
sb3-contrib: rl-zoo3's rl_zoo3/hyperparams/trpo.yml, which ours follows) at the same budget, over several seeds.

    python benchmarks/trpo_learning.py [--envs CartPole-v1 Pendulum-v1] [--seeds 0 1 2 3 4] [--workers 2]
    python benchmarks/trpo_learning.py --dry-run     # the settings of each implementation and env, as JSON

Each run trains with its entry's n_envs / n_timesteps / hyperparameters (read through benchmarks/common.py), then
evaluates the deterministic policy on 20 episodes of a separately seeded environment. Prints one line per run and a
summary table (mean ± std over seeds). On CartPole-v1 and Pendulum-v1 the two entries are the same; where the
actions have d > 1 dimensions ours scales ``target_kl`` and ``cg_damping`` by d to take the same steps (trpo.yml).
"""

import argparse
import multiprocessing
import time

import numpy as np

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import OURS, RL_ZOO3, ZooEntry, zoo_entry

IMPLEMENTATIONS = {"ours": OURS, "sb3-contrib": RL_ZOO3}  # each with the file its zoo command reads


def entry(implementation: str, env_id: str) -> ZooEntry:
    """The entry ``implementation`` trains on ``env_id`` with."""
    found = zoo_entry("trpo", env_id, IMPLEMENTATIONS[implementation])
    if found.normalize is not None:
        raise ValueError(f"{env_id} uses VecNormalize in the zoo; this script covers unnormalized envs only")
    return found


def run(job: tuple[str, str, int]) -> tuple[str, str, int, float, float]:
    implementation, env_id, seed = job
    import torch as th
    from sb3_contrib import TRPO as ContribTRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_trpo_kfac import TRPO

    th.set_num_threads(1)
    settings = entry(implementation, env_id)
    algorithm = TRPO if implementation == "ours" else ContribTRPO
    start = time.perf_counter()
    model = algorithm(settings.policy, settings.make_env(seed), seed=seed, **settings.kwargs)
    model.learn(settings.n_timesteps)
    elapsed = time.perf_counter() - start
    mean, _ = evaluate_policy(model, make_vec_env(env_id, n_envs=1, seed=10_000 + seed), n_eval_episodes=20)
    print(f"{implementation:<12} {env_id:<14} seed {seed}: return {mean:9.2f}  ({elapsed:6.1f} s)", flush=True)
    return implementation, env_id, seed, float(mean), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print the settings of every run, run nothing")
    args = parser.parse_args()
    # every entry read (and checked) before any training
    entries = {(impl, env_id): entry(impl, env_id) for env_id in args.envs for impl in IMPLEMENTATIONS}
    if args.dry_run:
        for (impl, _), found in entries.items():
            print(found.describe(implementation=impl, seeds=args.seeds))
        return
    jobs = [(impl, env_id, seed) for env_id in args.envs for seed in args.seeds for impl in IMPLEMENTATIONS]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run, jobs, chunksize=1)
    print(f"\n| env | implementation | final return (mean ± std over {len(args.seeds)} seeds) | per-seed | train time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for env_id in args.envs:
        for impl in IMPLEMENTATIONS:
            rows = [r for r in results if r[0] == impl and r[1] == env_id]
            returns = np.array([r[3] for r in rows])
            per_seed = ", ".join(f"{x:.1f}" for x in returns)
            seconds = np.mean([r[4] for r in rows])
            print(f"| {env_id} | {impl} | {returns.mean():.1f} ± {returns.std():.1f} | {per_seed} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
