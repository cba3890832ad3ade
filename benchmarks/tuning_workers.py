"""
Optuna tuning throughput with 1 and with 2 ``-optimize`` workers sharing one study on PostgreSQL.

Each round tunes a fresh study of ``--trials`` trials twice, in turn, with the same trials both times: two worker
processes (``--n-trials T/2`` each, seeds s and s + 1; the random sampler draws the same values whatever the study
holds) run one after the other ("1 worker"), then together ("2 workers"). Every trial is a tiny ACKTR budget on
CartPole-v1 (no pruner). Reported: trials per minute of tuning, i.e. T over the time from a worker's first trial start
to its last trial end (summed over the workers run one after the other; process start-up excluded). Without
``--storage`` a throwaway PostgreSQL cluster is started (``tests/postgres.py``: the server binaries and
``sb3_trpo_kfac[tune]`` are needed).

    python benchmarks/tuning_workers.py [--trials 6] [--rounds 2] [--timesteps 1000] [--storage postgresql://...]
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import time_in_turn

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def storage_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from postgres import postgresql_server

    with postgresql_server() as url:
        yield url


def run_study(url: str, name: str, concurrent: bool, trials: int, timesteps: int, seed: int, folder: Path) -> dict:
    optuna.create_study(storage=url, study_name=name, direction="maximize")  # once, before the workers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    commands = [
        [
            sys.executable, "-m", "sb3_trpo_kfac", "train", "--algo", "acktr", "--env", "CartPole-v1", "-optimize",
            "--storage", url, "--study-name", name, "--n-trials", str(trials // 2), "--n-jobs", "1",
            "-n", str(timesteps), "--sampler", "random", "--pruner", "none", "--n-evaluations", "1",
            "--eval-episodes", "2", "--no-optim-plots", "--seed", str(seed + worker),
            "-f", str(folder / f"{name}_{worker}"), "--num-threads", "1", "--eval-freq", "-1",
        ]
        for worker in range(2)
    ]

    def start(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(worker: subprocess.Popen) -> None:
        _, error = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"worker failed:\n{error.decode()[-3000:]}")

    if concurrent:
        for worker in [start(command) for command in commands]:
            finish(worker)
    else:
        for command in commands:
            finish(start(command))
    finished = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    if len(finished) != trials:
        raise RuntimeError(f"study {name}: {len(finished)} trials, expected {trials}")
    by_worker: dict[str, list] = {}
    for trial in finished:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial)
    spans = [
        (max(t.datetime_complete for t in share) - min(t.datetime_start for t in share)).total_seconds()
        for share in by_worker.values()
    ]
    if concurrent:
        tuning = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    else:
        tuning = sum(spans)
    return {"workers": 2 if concurrent else 1, "tuning_s": tuning, "trials_per_min": 60 * trials / tuning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--trials", type=int, default=6, help="trials per study (even)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timesteps", type=int, default=1000, help="-n of every trial")
    parser.add_argument("--storage", help="an existing database URL (default: a throwaway PostgreSQL cluster)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "tuning_workers.json")
    args = parser.parse_args()
    if args.trials < 2 or args.trials % 2:
        parser.error("--trials must be an even number >= 2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    records: list[dict] = []
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"tuning_workers_{os.getpid()}"
    with storage_url(args.storage) as url:
        counter = iter(range(10**6))

        def study(n_workers: int) -> None:
            index = next(counter)
            seed = 1000 + 10 * (index // 2)  # the same for both configurations of a round: the same trials
            name = f"tuning-workers-{os.getpid()}-{index}"
            records.append(run_study(url, name, n_workers == 2, args.trials, args.timesteps, seed, folder))

        runs = {"1 worker": lambda: study(1), "2 workers": lambda: study(2)}
        time_in_turn(runs, rounds=args.rounds, warm_up={name: lambda: None for name in runs})

    summary = {}
    for n_workers in (1, 2):
        mine = [record for record in records if record["workers"] == n_workers]
        summary[n_workers] = {
            "trials_per_min_median": statistics.median(record["trials_per_min"] for record in mine),
            "tuning_s_median": statistics.median(record["tuning_s"] for record in mine),
        }
        print(
            f"{n_workers} worker(s): {summary[n_workers]['trials_per_min_median']:.1f} trials/min (median of "
            f"{len(mine)}: {[round(record['trials_per_min'], 1) for record in mine]}), "
            f"{summary[n_workers]['tuning_s_median']:.0f} s of tuning per study of {args.trials} trials"
        )
    print(f"speedup, trials/min: {summary[2]['trials_per_min_median'] / summary[1]['trials_per_min_median']:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {"trials": args.trials, "rounds": args.rounds, "timesteps": args.timesteps}
    result = {"settings": settings, "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "runs": records}
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
