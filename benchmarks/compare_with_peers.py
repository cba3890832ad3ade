"""
Side-by-side learning benchmark through the real zoo commands: our TRPO and ACKTR
(``python -m sb3_trpo_kfac train``, our shipped hyperparameters) against SB3's A2C and PPO and sb3-contrib's TRPO
(``python -m rl_zoo3.train``, rl-zoo3's shipped hyperparameters), on a list of envs and seeds, with periodic
deterministic evaluation (rl-zoo3's ``--eval-freq`` / ``evaluations.npz``).

    pip install -e ".[benchmarks]"
    python benchmarks/compare_with_peers.py --quick                    # smoke check: 5 min on 2 quiet cores
    python benchmarks/compare_with_peers.py --out benchmarks/results/full --seeds 0 1 2 --jobs 2
    python benchmarks/compare_with_peers.py --out benchmarks/results/full --report-only
    python benchmarks/compare_with_peers.py --quick --dry-run          # print the zoo commands, train nothing

Every algorithm gets the same budget per env (``-n``, the ENVS table below), so "final return" compares equal
sample counts; each algorithm otherwise runs its own zoo entry unchanged. rl-zoo3 2.9.2 has MuJoCo entries only for
the -v4 robots: for HalfCheetah-v5 the peers run their HalfCheetah-v4 entry (copied into ``OUT/hyperparams``).

Outputs in ``OUT``: ``runs/{algo}/{env}/seed{S}/`` (the zoo log folder, stdout and ``result.json`` with the
command, exit code and wall time), ``evaluations.csv`` (every evaluation of every run), ``runs.csv``,
``summary.md`` (per env: final return -- the mean evaluation return over the last 10% of the budget -- as IQM
with 95% stratified-bootstrap CIs from rliable, mean +- std, env steps until the evaluation mean first reaches the
threshold, wall time) and ``learning_curves.png``.
Finished runs are skipped, so an interrupted benchmark resumes where it stopped. ``--dry-run`` prints the command of
every run still to do, one per line, and writes the peer hyperparameter files they read; it trains nothing.

Full mode on a quiet 2-core machine with --jobs 2 and seeds 0 1 2: 5-7 hours (HalfCheetah-v5 is about 60% of it;
a PPO HalfCheetah run alone takes up to an hour).
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import RL_ZOO3, hyperparams_file, zoo_entries


@dataclasses.dataclass(frozen=True)
class Algo:
    label: str  # how tables and plots name it
    module: str  # the zoo entry point run with `python -m`
    zoo_name: str  # its --algo
    # --hyperparams overrides on top of the entry (a variant of a shipped entry, e.g. ACKTR with target_kl)
    hyperparams: tuple[str, ...] = ()


ALGOS = {
    "acktr": Algo("ACKTR (ours)", "sb3_trpo_kfac", "acktr"),
    "trpo": Algo("TRPO (ours)", "sb3_trpo_kfac", "trpo"),
    "sb3-contrib-trpo": Algo("TRPO (sb3-contrib)", "rl_zoo3.train", "trpo"),
    "a2c": Algo("A2C (SB3)", "rl_zoo3.train", "a2c"),
    "ppo": Algo("PPO (SB3)", "rl_zoo3.train", "ppo"),
    # issue 16 item 4: the shipped entry with baselines' continuous-control KL target
    "acktr-kl": Algo("ACKTR (ours, target_kl 0.002)", "sb3_trpo_kfac", "acktr", ("target_kl:0.002",)),
    # issue 16 item 1: the shipped entry with the decompositions in the background (learning before a default change)
    "acktr-async": Algo("ACKTR (ours, kfac_async)", "sb3_trpo_kfac", "acktr", ("kfac_async:True",)),
}


@dataclasses.dataclass(frozen=True)
class EnvSetting:
    budget: int  # env steps, the same for every algorithm
    eval_freq: int  # env steps between evaluations
    eval_episodes: int
    threshold: float  # "solved" return for the steps-to-threshold column
    quick_budget: int = 0  # --quick; 0: not part of the quick run
    quick_eval_freq: int = 0


ENVS = {
    "CartPole-v1": EnvSetting(200_000, 5_000, 10, 475.0, quick_budget=20_000, quick_eval_freq=2_000),
    "Pendulum-v1": EnvSetting(100_000, 5_000, 10, -200.0, quick_budget=16_000, quick_eval_freq=4_000),
    "LunarLander-v3": EnvSetting(300_000, 10_000, 5, 200.0),
    "HalfCheetah-v5": EnvSetting(1_000_000, 50_000, 5, 3000.0),
}
QUICK_SEEDS = [0, 1]


def peer_conf_file(algo: Algo, envs: list[str], out: Path) -> Path | None:
    """
    rl-zoo3's own hyperparameter file for a peer, or, when an env has no entry there but another version of it
    does (HalfCheetah-v5 -> HalfCheetah-v4), a copy holding the requested envs with the entry of that version.
    """
    shipped = hyperparams_file(algo.zoo_name, RL_ZOO3)
    entries = zoo_entries(algo.zoo_name, RL_ZOO3)
    if all(env in entries for env in envs):
        return None
    copied: dict[str, Any] = {}
    for env in envs:
        if env in entries:
            copied[env] = entries[env]
            continue
        base = env.rsplit("-v", 1)[0]
        versions = sorted((key for key in entries if key.rsplit("-v", 1)[0] == base), reverse=True)
        if not versions:
            raise SystemExit(f"rl-zoo3 has no {algo.zoo_name} hyperparameters for {env} or another version of it")
        copied[env] = entries[versions[0]]
        print(f"{algo.label}: {env} runs rl-zoo3's {versions[0]} entry", file=sys.stderr)
    path = out / "hyperparams" / f"{algo.zoo_name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Copied from {shipped} (rl-zoo3 {importlib.metadata.version('rl_zoo3')}) for {', '.join(envs)}\n"
        + yaml.dump(copied)
    )
    return path


def run_dir(out: Path, algo: str, env: str, seed: int) -> Path:
    return out / "runs" / algo / env / f"seed{seed}"


def finished(folder: Path) -> dict[str, Any] | None:
    """The result.json of a run that ended successfully, else None."""
    path = folder / "result.json"
    result = json.loads(path.read_text()) if path.exists() else None
    return result if result is not None and result["returncode"] == 0 else None


def train_command(
    algo: Algo, env: str, seed: int, setting: EnvSetting, quick: bool, folder: Path, conf: Path | None
) -> list[str]:
    budget, eval_freq = (
        (setting.quick_budget, setting.quick_eval_freq) if quick else (setting.budget, setting.eval_freq)
    )
    command = [sys.executable, "-m", algo.module]
    command += ["train"] if algo.module == "sb3_trpo_kfac" else []
    command += ["--algo", algo.zoo_name, "--env", env, "--seed", str(seed), "-n", str(budget), "-f", str(folder)]
    command += ["--eval-freq", str(eval_freq), "--eval-episodes", str(setting.eval_episodes), "--n-eval-envs", "1"]
    command += ["--num-threads", "1", "--verbose", "0"]
    command += ["--hyperparams", *algo.hyperparams] if algo.hyperparams else []
    return command + (["--conf-file", str(conf)] if conf is not None else [])


def train_one(command: list[str], folder: Path) -> dict[str, Any]:
    """Run one zoo command in a fresh log folder; returns what result.json holds."""
    done = finished(folder)
    if done is not None:  # by another invocation since this one listed its jobs
        return done
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: start over
    folder.mkdir(parents=True)
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    with open(folder / "stdout.txt", "w") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    result = {"command": command, "returncode": returncode, "wall_time_s": time.perf_counter() - start}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{'ok ' if returncode == 0 else 'FAILED'} {result['wall_time_s']:7.0f}s  {folder}", flush=True)
    return result


def planned_runs(args: argparse.Namespace, out: Path) -> list[tuple[list[str], Path]]:
    """The zoo command and log folder of every run not finished yet (the peers' hyperparameter files written)."""
    peers = {
        name: peer_conf_file(ALGOS[name], args.envs, out)
        for name in args.algos
        if ALGOS[name].module != "sb3_trpo_kfac"
    }
    jobs = []
    # Longest envs first so the pool stays busy at the end.
    for env in sorted(args.envs, key=lambda env: -ENVS[env].budget):
        for seed in args.seeds:
            for name in args.algos:
                folder = run_dir(out, name, env, seed)
                if finished(folder):
                    continue
                jobs.append(
                    (train_command(ALGOS[name], env, seed, ENVS[env], args.quick, folder, peers.get(name)), folder)
                )
    return jobs


def run_all(args: argparse.Namespace, out: Path) -> None:
    jobs = planned_runs(args, out)
    print(f"{len(jobs)} runs to do, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train_one(*job), jobs))
    failed = [job[1] for job, result in zip(jobs, results) if result["returncode"] != 0]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed, see stdout.txt in: {', '.join(map(str, failed))}")


def load_runs(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One record per finished run: its evaluation timesteps and returns, and its wall time."""
    runs = []
    for name in args.algos:
        for env in args.envs:
            for seed in args.seeds:
                folder = run_dir(out, name, env, seed)
                evaluations = sorted(folder.glob("**/evaluations.npz"))
                result = finished(folder)
                if result is None or not evaluations:
                    continue
                with np.load(evaluations[-1]) as data:
                    timesteps, returns = data["timesteps"], data["results"]
                runs.append(dict(algo=name, env=env, seed=seed, timesteps=timesteps, returns=returns, **result))
    return runs


def final_return(timesteps: np.ndarray, returns: np.ndarray) -> float:
    """Mean evaluation return over the last 10% of the run (one evaluation alone is noisy)."""
    return float(returns[timesteps >= 0.9 * timesteps[-1]].mean())


def steps_to_threshold(timesteps: np.ndarray, mean_returns: np.ndarray, threshold: float) -> float:
    reached = np.flatnonzero(mean_returns >= threshold)
    return float(timesteps[reached[0]]) if reached.size else float("inf")


def write_tables(runs: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> str:
    from rliable import library as rly
    from rliable import metrics

    with open(out / "evaluations.csv", "w") as csv:
        csv.write("algo,env,seed,timesteps,mean_return,std_return,episodes\n")
        for run in runs:
            for step, returns in zip(run["timesteps"], run["returns"]):
                row = [
                    run["algo"],
                    run["env"],
                    run["seed"],
                    step,
                    f"{returns.mean():.3f}",
                    f"{returns.std():.3f}",
                    returns.size,
                ]
                csv.write(",".join(map(str, row)) + "\n")
    with open(out / "runs.csv", "w") as csv:
        csv.write("algo,env,seed,final_return,steps_to_threshold,wall_time_s\n")
        for run in runs:
            final = final_return(run["timesteps"], run["returns"])
            steps = steps_to_threshold(run["timesteps"], run["returns"].mean(1), ENVS[run["env"]].threshold)
            csv.write(f"{run['algo']},{run['env']},{run['seed']},{final:.3f},{steps},{run['wall_time_s']:.1f}\n")

    lines = []
    for env in args.envs:
        setting = ENVS[env]
        budget = setting.quick_budget if args.quick else setting.budget
        env_runs = {name: [run for run in runs if run["algo"] == name and run["env"] == env] for name in args.algos}
        env_runs = {name: found for name, found in env_runs.items() if found}
        if not env_runs:
            continue
        # Final return per run (seed), then the IQM over runs.
        finals = {
            name: np.array([[final_return(run["timesteps"], run["returns"])] for run in found])
            for name, found in env_runs.items()
        }
        iqm, ci = rly.get_interval_estimates(  # seeded: the same runs give the same tables
            finals,
            lambda scores: np.array([metrics.aggregate_iqm(scores)]),
            reps=2000,
            random_state=np.random.RandomState(0),
        )
        lines += [
            f"### {env} ({budget:,} env steps, {setting.eval_episodes} deterministic evaluation episodes every "
            f"{setting.quick_eval_freq if args.quick else setting.eval_freq:,} steps)",
            "",
        ]
        columns = ["algorithm", "runs", "final return IQM [95% CI]", "final mean +- std"]
        columns += [f"steps to {setting.threshold:g}: median (reached)", "wall time min (mean)"]
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for name, found in env_runs.items():
            steps = [steps_to_threshold(run["timesteps"], run["returns"].mean(1), setting.threshold) for run in found]
            reached = sum(np.isfinite(steps))
            median = np.median(steps)
            median_text = f"{median:,.0f}" if np.isfinite(median) else f"> {budget:,}"
            score = finals[name][:, 0]
            interval = f"{iqm[name][0]:.1f} [{ci[name][0, 0]:.1f}, {ci[name][1, 0]:.1f}]"
            lines.append(
                f"| {ALGOS[name].label} | {len(found)} | {interval} "
                f"| {score.mean():.1f} +- {score.std():.1f} | {median_text} ({reached}/{len(found)}) "
                f"| {np.mean([run['wall_time_s'] for run in found]) / 60:.1f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def plot_curves(runs: list[dict[str, Any]], args: argparse.Namespace, out: Path, reps: int = 1000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [env for env in args.envs if any(run["env"] == env for run in runs)]
    figure, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    rng = np.random.default_rng(0)
    for axis, env in zip(axes[0], envs):
        for name in args.algos:
            found = [run for run in runs if run["algo"] == name and run["env"] == env]
            if not found:
                continue
            length = min(len(run["timesteps"]) for run in found)
            curves = np.stack([run["returns"][:length].mean(1) for run in found])  # (seeds, evaluations)
            # 95% bootstrap band of the mean over seeds at each evaluation.
            resampled = curves[rng.integers(0, len(found), (reps, len(found)))].mean(1)
            low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
            steps = found[0]["timesteps"][:length]
            axis.plot(steps, curves.mean(0), label=f"{ALGOS[name].label} ({len(found)})")
            axis.fill_between(steps, low, high, alpha=0.2)
        # early catastrophic evaluations (LunarLander's crashes) would squash the rest of the panel
        means = np.concatenate([line.get_ydata() for line in axis.get_lines()])
        low = min(np.percentile(means, 3), ENVS[env].threshold)
        axis.set_ylim(bottom=low - 0.05 * (means.max() - low))
        axis.axhline(ENVS[env].threshold, color="grey", linestyle=":", linewidth=1)
        axis.set(title=env, xlabel="env steps", ylabel="evaluation return")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")  # per panel: the runs (in brackets) differ between envs
    figure.tight_layout()
    figure.savefig(out / "learning_curves.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--envs", nargs="+", choices=list(ENVS), default=None, help="default: all (quick: CartPole, Pendulum)"
    )
    variants = [name for name, algo in ALGOS.items() if algo.hyperparams]  # only on request
    parser.add_argument(
        "--algos", nargs="+", choices=list(ALGOS), default=[name for name in ALGOS if name not in variants]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument("--quick", action="store_true", help="small budgets on CartPole and Pendulum, 2 seeds")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/{quick,full}")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--dry-run", action="store_true", help="only print the zoo commands of the runs still to do")
    args = parser.parse_args()
    args.envs = args.envs or [env for env, setting in ENVS.items() if setting.quick_budget or not args.quick]
    args.seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else [0, 1, 2])
    if args.quick and any(not ENVS[env].quick_budget for env in args.envs):
        parser.error(
            "--quick has budgets for: " + ", ".join(env for env, setting in ENVS.items() if setting.quick_budget)
        )
    out = args.out or Path(__file__).parent / "results" / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for command, _ in planned_runs(args, out):
            print(shlex.join(command))
        return
    start = time.perf_counter()
    if not args.report_only:
        with open(out / "commands.txt", "a") as log:  # every invocation that trained into OUT
            log.write(" ".join(["python", *sys.argv]) + "\n")
        run_all(args, out)
    runs = load_runs(args, out)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    print(write_tables(runs, args, out))
    plot_curves(runs, args, out)
    print(
        f"wrote {out}/summary.md, learning_curves.png, evaluations.csv, runs.csv ({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
