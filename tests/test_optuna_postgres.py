"""
Two ``-optimize`` workers, separate processes running our command at the same time, share one Optuna study on a real
PostgreSQL server (a throwaway cluster, see ``tests/postgres.py``) and finish it with no trial lost or duplicated.

Without PostgreSQL server binaries or the ``psycopg`` driver the test fails in CI (``CI`` set, as ``.ci/run`` does)
and is skipped, with the reason, elsewhere.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import postgres
import pytest
from optuna.trial import TrialState
from postgres import ServerUnavailable, postgresql_server

from sb3_trpo_kfac.zoo.samplers import HYPERPARAMS_SAMPLER

ALGO = "acktr"
STUDY = "shared"
TRIALS_PER_WORKER = 2
# One per worker (the same seed would sample the same trials), chosen so that the random sampler's first two trials have
# short rollouts (n_steps 32 to 128 of 2 environments): the trials are cheap, the test is of the storage.
SEEDS = (16, 2)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture
def postgresql_url():
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgresql_server())
        except ServerUnavailable as reason:
            if in_ci():
                pytest.fail(f"CI needs a PostgreSQL server for this test: {reason}")
            pytest.skip(f"{reason} (a failure when CI is set)")
        yield url


def start_worker(url: str, seed: int, cwd: Path) -> subprocess.Popen:
    # `--n-trials` counts per worker: the study ends with exactly 2 * TRIALS_PER_WORKER trials. (`--max-total-trials`
    # may end one trial over when two workers finish at the same instant: optuna's MaxTrialsCallback counts after a
    # trial, before the next one is created.) Two environments keep the largest sampled rollout small.
    command = [
        sys.executable, "-m", "sb3_trpo_kfac", "train", "--algo", ALGO, "--env", "CartPole-v1", "-optimize",
        "--storage", url, "--study-name", STUDY, "--n-trials", str(TRIALS_PER_WORKER), "--n-jobs", "1",
        "-n", "200", "--sampler", "random", "--pruner", "none", "--n-evaluations", "1", "--eval-episodes", "2",
        "-params", "n_envs:2", "--no-optim-plots", "--seed", str(seed), "-f", f"logs_{seed}",
        "--num-threads", "1", "--eval-freq", "-1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def replayed_through_our_sampler(trial: optuna.trial.FrozenTrial) -> optuna.trial.FixedTrial:
    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial only warns about a value outside the suggested range
        HYPERPARAMS_SAMPLER[ALGO](fixed, 0, 2, {})
    return fixed


@contextlib.contextmanager
def trial_creation_held(url: str, study_name: str, workers: list[subprocess.Popen]) -> Iterator[None]:
    """
    Hold every worker at its first trial until all of them wait there, so that they start trials together.

    Optuna creates a trial under a ``FOR UPDATE`` lock on the study's row (that is what keeps trial numbers unique);
    holding a ``FOR NO KEY UPDATE`` lock on it blocks exactly that, not the workers' other writes to the study.
    """
    import psycopg  # only once the fixture has found it

    # pg_stat_activity is read on a second connection: within a transaction it is a snapshot taken at first read.
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as observer:
        holder.execute("SELECT 1 FROM studies WHERE study_name = %s FOR NO KEY UPDATE", (study_name,))
        yield
        deadline = time.monotonic() + 300
        while True:
            (waiting,) = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting == len(workers):
                break
            exited = [worker for worker in workers if worker.poll() is not None]
            assert not exited, f"a worker exited before its first trial:\n{exited[0].communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, f"{waiting} of {len(workers)} workers reached their first trial"
            time.sleep(0.2)
    # leaving the block commits the holder's transaction, which releases the lock


def test_two_workers_finish_one_study_on_postgresql(postgresql_url, tmp_path):
    # As in docs/scaling.md: the study (and, in an empty database, Optuna's tables) first, once. Workers that start
    # together on an empty database race to create the tables, and one of them fails.
    optuna.create_study(storage=postgresql_url, study_name=STUDY, direction="maximize")
    workers: list[subprocess.Popen] = []
    try:
        with trial_creation_held(postgresql_url, STUDY, workers):
            workers += [start_worker(postgresql_url, seed, tmp_path) for seed in SEEDS]
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name=STUDY, storage=postgresql_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len(SEEDS) * TRIALS_PER_WORKER
    assert sorted(trial.number for trial in trials) == list(range(len(trials)))  # none duplicated, none missing
    assert {trial.state for trial in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}  # none RUNNING or FAILed

    # Every trial names the process that ran it (hostname:pid, set by our objective): the two workers, each its share.
    by_worker: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial)
    host = socket.gethostname()
    assert sorted(by_worker) == sorted(f"{host}:{worker.pid}" for worker in workers)
    assert all(len(share) == TRIALS_PER_WORKER for share in by_worker.values())
    # ...and ran at the same time: their first trials, created together, overlap.
    first, second = (min(share, key=lambda trial: trial.number) for share in by_worker.values())
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete

    # The best trial's parameters are exactly what our sampler suggests, with the same search distributions.
    best = study.best_trial
    assert best.state == TrialState.COMPLETE
    replay = replayed_through_our_sampler(best)
    assert replay.params == best.params
    assert replay.distributions == best.distributions


def test_missing_server_binaries_are_named(monkeypatch):
    # What the fixture reports (a failure in CI, a skip elsewhere) on a machine without the server.
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres, "DEBIAN_BIN_DIRS", "/nonexistent/postgresql/*/bin")
    with pytest.raises(ServerUnavailable, match=r"initdb, pg_ctl.*apt-get install postgresql"):
        postgres.find_server_bin_dir()
