"""
A resumable queue of long benchmark runs through the real zoo commands (issue 16: Pong, MuJoCo, Box2D).

    python benchmarks/run_queue.py pong --detach            # start the driver in the background, return at once
    python benchmarks/run_queue.py pong                     # or drive it in the foreground until every run is done
    python benchmarks/run_queue.py pong --status            # pending / running / stopped / done, steps, last return
    python benchmarks/run_queue.py pong --stop              # stop the driver and the runs it started (they resume)
    python benchmarks/run_queue.py pong --dry-run           # what the driver would launch now, one JSON line each
    python benchmarks/run_queue.py pong --adopt /work/runs/pong/logs/a2c/PongNoFrameskip-v4_1 --pid 11834
    python benchmarks/run_queue.py pong --only acktr/PongNoFrameskip-v4/seed0 a2c/PongNoFrameskip-v4/seed1 --detach
    python benchmarks/zoo_report.py pong                    # the report (benchmarks/results/pong/)

Every run is one zoo command, one process with one torch thread (``--num-threads 1``, OMP/MKL 1), at most
``--parallel`` at a time: ours ``python -m sb3_trpo_kfac train --algo acktr|trpo``, the peers ``python -m rl_zoo3.train
--algo a2c|trpo`` with rl-zoo3's entries (for the -v5 robots its -v4 entry, as benchmarks/compare_with_peers.py does).
A run lives in ``ROOT/QUEUE/ALGO/ENV/seedS/segNN/`` (``segment.json``: command, pid, exit code; ``stdout.log``; the
zoo's log folder ``logs/``); the training episodes of every segment stay in its monitor files, and the report stitches
them into one run. A run is done when a segment's final model has reached the budget; a run that was killed or stopped
is resumed from its latest checkpoint (every ``--save-freq`` env steps) or final model with ``-i MODEL -n REMAINING``.

rl-zoo3 alone cannot resume a run faithfully, so each segment runs the zoo command through this script's ``segment``
mode, which changes two things before handing over to the zoo module's ``__main__``:
- the checkpoints also save the ``VecNormalize`` statistics (rl-zoo3's ``CheckpointCallback`` does not), and a resumed
  segment finds them where ``-i`` looks (``dirname(MODEL)/ENV/vecnormalize.pkl``);
- a resumed segment continues the step counter (``learn(reset_num_timesteps=False)``; rl-zoo3 restarts it at 0), so
  ``lin_`` schedules, checkpoint names and evaluation steps go on from the checkpoint instead of starting over.
Ours resume with the hyperparameters their first segment saved (its ``config.yml`` as ``--conf-file``), so an
entry changed meanwhile does not leak into a run. An uninterrupted run is the zoo command's run unchanged. The
environments of a resumed segment are seeded again with the run's seed (as ``-i`` does): a resumed run is one
continuous run in steps and weights, not bit for bit the same.
"""

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

# benchmarks/compare_with_peers.py (run as a script, a benchmark has its folder on sys.path)
from compare_with_peers import ALGOS, peer_conf_file

DEFAULT_ROOT = Path("/work/runs")
SCRIPT = Path(__file__).resolve()
CHECKPOINT = re.compile(r"rl_model_(\d+)_steps\.zip$")
KEEP_CHECKPOINTS = 2  # per segment; older ones are deleted (a NatureCNN ACKTR checkpoint holds its K-FAC factors)


@dataclasses.dataclass(frozen=True)
class Run:
    queue: str
    algo: str  # a key of compare_with_peers.ALGOS
    env: str
    seed: int
    budget: int  # env steps
    eval_freq: int = -1  # env steps between deterministic evaluations (rl-zoo3's --eval-freq); -1: none
    eval_episodes: int = 5

    @property
    def name(self) -> str:
        return f"{self.algo}/{self.env}/seed{self.seed}"

    def folder(self, root: Path) -> Path:
        return root / self.queue / self.algo / self.env / f"seed{self.seed}"


def _runs(queue: str, envs: dict[str, int], algo_seeds: dict[str, tuple[int, ...]], eval_freq: int = -1) -> list[Run]:
    """Seed by seed (every algorithm's seed 0 first), so a partly done queue compares algorithms on equal seeds."""
    seeds = sorted({seed for chosen in algo_seeds.values() for seed in chosen})
    return [
        Run(queue, algo, env, seed, budget, eval_freq)
        for seed in seeds
        for env, budget in envs.items()
        for algo, chosen in algo_seeds.items()
        if seed in chosen
    ]


BOX2D_SEEDS = (0, 1, 2, 3, 4)
QUEUES: dict[str, list[Run]] = {
    # ACKTR's atari entry against rl-zoo3's a2c atari entry, 2M steps (8M frames); the first sessions ran every seed
    # to 1M (the minimum) before extending seed 0
    # acktr-async: the entry with kfac_async, the pixel evidence for the decompositions in the background
    "pong": _runs("pong", {"PongNoFrameskip-v4": 3_000_000}, {"acktr": (0, 1), "a2c": (0, 1), "acktr-async": (0,)}),
    "breakout": _runs("breakout", {"BreakoutNoFrameskip-v4": 1_000_000}, {"acktr": (0, 1), "a2c": (0, 1)}),
    # our TRPO and ACKTR on 3 seeds, the peers on seed 0; evaluated as compare_with_peers.py evaluates HalfCheetah
    "mujoco": _runs(
        "mujoco",
        {"Walker2d-v5": 1_000_000, "Ant-v5": 1_000_000, "Swimmer-v5": 1_000_000},
        {"trpo": (0, 1, 2), "acktr": (0, 1, 2), "sb3-contrib-trpo": (0,), "a2c": (0,), "acktr-kl": (0,)},
        eval_freq=50_000,
    ),
    # item 4 on HalfCheetah: ACKTR's entry with target_kl, against its runs without (compare_with_peers.py's, evaluated
    # alike); on the robots the mujoco queue runs both
    "kl": _runs("kl", {"HalfCheetah-v5": 1_000_000}, {"acktr-kl": (0, 1, 2)}, eval_freq=50_000),
    # MountainCar: both entries' own budget; LunarLander and BipedalWalker: chosen (A2C's entries: 200k and 5M)
    "box2d": _runs(
        "box2d",
        {"MountainCar-v0": 1_000_000, "LunarLander-v3": 1_000_000},
        {"acktr": BOX2D_SEEDS, "a2c": BOX2D_SEEDS},
    )
    + _runs("box2d", {"BipedalWalker-v3": 2_000_000}, {"acktr": (0, 1), "a2c": (0, 1)}),
    # a few minutes: to try the queue, its resumption and the report
    "smoke": _runs("smoke", {"CartPole-v1": 20_000, "Pendulum-v1": 12_000}, {"acktr": (0,), "a2c": (0,)}),
}


# ----------------------------------------------------------------------------------------------------- run state


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def segments(run: Run, root: Path) -> list[Path]:
    return sorted(path.parent for path in run.folder(root).glob("seg*/segment.json"))


def experiment(segment: Path) -> Path | None:
    """The zoo's experiment folder of a segment (``logs/ALGO/ENV_1``), once the zoo has made it."""
    recorded = read_json(segment / "segment.json").get("experiment")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def model_steps(path: Path) -> int | None:
    """``num_timesteps`` saved in an SB3 model zip; None while the zip is being written or if a kill cut it short."""
    try:
        with zipfile.ZipFile(path) as archive:
            return int(json.loads(archive.read("data"))["num_timesteps"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


@dataclasses.dataclass(frozen=True)
class SavedPoint:
    """A model a run can continue from, with the normalization statistics saved at the same step (or None)."""

    steps: int
    model: Path
    normalization: Path | None
    final: bool  # the zoo's final model (end of the budget, or saved on SIGINT), not a checkpoint


def saved_points(exp: Path, env: str) -> list[SavedPoint]:
    points = []
    for path in exp.glob("rl_model_*_steps.zip"):
        match = CHECKPOINT.search(path.name)
        if match and zipfile.is_zipfile(path):  # not one cut short by a kill while it was written
            steps = int(match.group(1))
            stats = exp / f"rl_model_vecnormalize_{steps}_steps.pkl"
            points.append(SavedPoint(steps, path, stats if stats.exists() else None, final=False))
    final = exp / f"{env}.zip"
    final_steps = model_steps(final) if final.exists() else None
    if final_steps is not None:
        stats = exp / env / "vecnormalize.pkl"
        points.append(SavedPoint(final_steps, final, stats if stats.exists() else None, final=True))
    return sorted(points, key=lambda point: point.steps)


def normalizes(exp: Path, env: str) -> bool:
    """Whether the segment's entry wraps the env in VecNormalize (rl-zoo3's saved config.yml)."""
    config = exp / env / "config.yml"
    if not config.exists():
        return False
    entries = dict(yaml.load(config.read_text(), Loader=yaml.UnsafeLoader))  # rl-zoo3 writes an OrderedDict
    return entries.get("normalize", False) not in (False, "False", None)


def pid_alive(pid: int | None, marker: str) -> bool:
    """The process is alive (not a zombie) and its command line holds ``marker`` (not another one that got its pid)."""
    if not pid:
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z" and marker in command


@dataclasses.dataclass
class RunState:
    run: Run
    state: str  # pending | running | stopped | failed | done
    steps: int  # env steps of the latest saved model
    segments: list[Path]
    resume: SavedPoint | None  # where a new segment would start
    pid: int | None = None
    problem: str = ""


def run_state(run: Run, root: Path) -> RunState:
    found = segments(run, root)
    if not found:
        return RunState(run, "pending", 0, found, None)
    points: list[SavedPoint] = []
    needs_stats = False
    for segment in found:
        exp = experiment(segment)
        if exp is not None:
            points += saved_points(exp, run.env)
            needs_stats = needs_stats or normalizes(exp, run.env)
    last = read_json(found[-1] / "segment.json")
    steps = max((point.steps for point in points), default=0)
    if any(point.final and point.steps >= run.budget for point in points):
        return RunState(run, "done", steps, found, None)
    if pid_alive(last.get("pid"), last["log_folder"]):
        return RunState(run, "running", steps, found, None, pid=last["pid"])
    usable = [point for point in points if point.normalization is not None or not needs_stats]
    resume = max(usable, key=lambda point: point.steps) if usable else None
    problem = ""
    if len(usable) < len(points):
        problem = f"{len(points) - len(usable)} saved models without normalization statistics skipped"
    if last.get("returncode", 0) > 0:
        return RunState(run, "failed", steps, found, resume, problem=f"exit code {last['returncode']}")
    return RunState(run, "stopped", steps, found, resume, problem=problem)


def last_returns(state: RunState, count: int = 10) -> float | None:
    """Mean return of the latest ``count`` training episodes of the run's last segment that has any."""
    for segment in reversed(state.segments):
        exp = experiment(segment)
        rows: list[tuple[float, float]] = []  # (wall time, return)
        for path in exp.glob("*.monitor.csv") if exp else []:
            lines = path.read_text().splitlines()
            start = json.loads(lines[0][1:])["t_start"] if lines else 0.0
            rows += [(start + float(line.split(",")[2]), float(line.split(",")[0])) for line in lines[2:]]
        if rows:
            latest = sorted(rows)[-count:]
            return sum(value for _, value in latest) / len(latest)
    return None


# ------------------------------------------------------------------------------------------------------- launching


def zoo_command(
    run: Run, log_folder: Path, conf: Path | None, remaining: int, save_freq: int, resume: Path | None
) -> list[str]:
    """The zoo command of one segment, as a user would type it after ``python``."""
    algo = ALGOS[run.algo]
    command = ["-m", algo.module] + (["train"] if algo.module == "sb3_trpo_kfac" else [])
    command += ["--algo", algo.zoo_name, "--env", run.env, "--seed", str(run.seed), "-n", str(remaining)]
    command += ["-f", str(log_folder), "--num-threads", "1", "--save-freq", str(save_freq), "--verbose", "1"]
    command += ["--eval-freq", str(run.eval_freq)]
    command += ["--hyperparams", *algo.hyperparams] if algo.hyperparams else []
    if run.eval_freq > 0:
        command += ["--eval-episodes", str(run.eval_episodes), "--n-eval-envs", "1"]
    command += ["--conf-file", str(conf)] if conf is not None else []
    return command + (["-i", str(resume)] if resume is not None else [])


def peer_conf(run: Run, root: Path) -> Path | None:
    """
    A peer's hyperparameter file: None for rl-zoo3's own (Atari: its ``atari`` entry); for envs it has another
    version's entry of (the -v5 robots), a copy holding that entry for every env of the queue.
    """
    if ALGOS[run.algo].module == "sb3_trpo_kfac" or "NoFrameskip" in run.env:
        return None
    envs = sorted({other.env for other in QUEUES[run.queue] if other.algo == run.algo})
    return peer_conf_file(ALGOS[run.algo], envs, root / run.queue)


@dataclasses.dataclass(frozen=True)
class Launch:
    run: Run
    segment: Path
    command: list[str]
    resume: SavedPoint | None
    start_steps: int

    def describe(self) -> str:
        """One JSON line (what ``--dry-run`` prints)."""
        resume = None if self.resume is None else str(self.resume.model)
        stats = None if self.resume is None or self.resume.normalization is None else str(self.resume.normalization)
        fields = dict(run=self.run.name, segment=str(self.segment), command=self.command, resume_from=resume)
        fields.update(normalization=stats, start_steps=self.start_steps, budget=self.run.budget)
        return json.dumps(fields)


def first_config(state: RunState) -> Path | None:
    """The hyperparameters rl-zoo3 saved in the run's first segment (our command reads that file as ``--conf-file``)."""
    for segment in state.segments:
        exp = experiment(segment)
        if exp is not None and (exp / state.run.env / "config.yml").exists():
            return exp / state.run.env / "config.yml"
    return None


def plan(state: RunState, root: Path, save_freq: int) -> Launch:
    """The next segment of a run that is pending, stopped or failed."""
    run, resume = state.run, state.resume
    segment = run.folder(root) / f"seg{len(state.segments):02d}"
    start = resume.steps if resume is not None else 0
    model = segment / "resume" / resume.model.name if resume is not None else None
    conf = peer_conf(run, root)
    if resume is not None and ALGOS[run.algo].module == "sb3_trpo_kfac":
        conf = first_config(state)  # the values the run started with, even if the shipped entry changed since
    command = zoo_command(run, segment / "logs", conf, run.budget - start, save_freq, model)
    return Launch(run, segment, [sys.executable, str(SCRIPT), "segment", *command], resume, start)


def launch(job: Launch) -> subprocess.Popen:
    job.segment.mkdir(parents=True)
    if job.resume is not None:  # where -i looks: the model, and ENV/vecnormalize.pkl beside it
        model = Path(job.command[-1])
        model.parent.mkdir()
        shutil.copy2(job.resume.model, model)
        if job.resume.normalization is not None:
            (model.parent / job.run.env).mkdir()
            shutil.copy2(job.resume.normalization, model.parent / job.run.env / "vecnormalize.pkl")
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(job.segment / "stdout.log", "w") as log:
        process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    exp = job.segment / "logs" / ALGOS[job.run.algo].zoo_name / f"{job.run.env}_1"  # a fresh log folder: id 1
    record = dict(command=job.command, pid=process.pid, log_folder=str(job.segment / "logs"), experiment=str(exp))
    record.update(start_steps=job.start_steps, resumed_from=None if job.resume is None else str(job.resume.model))
    record.update(started=time.time())
    (job.segment / "segment.json").write_text(json.dumps(record, indent=1))
    return process


def finish(segment: Path, returncode: int) -> None:
    record = read_json(segment / "segment.json")
    record.update(returncode=returncode, ended=time.time())
    (segment / "segment.json").write_text(json.dumps(record, indent=1))


def prune_checkpoints(segment: Path) -> None:
    """Keep the latest checkpoints of a segment this queue launched (never touch an adopted run's files)."""
    exp = experiment(segment)
    if exp is None or read_json(segment / "segment.json").get("adopted"):
        return
    checkpoints = sorted((point.steps, point.model) for point in saved_points(exp, "") if not point.final)
    for steps, path in checkpoints[:-KEEP_CHECKPOINTS]:
        path.unlink(missing_ok=True)
        (exp / f"rl_model_vecnormalize_{steps}_steps.pkl").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------- driver


def startable(states: list[RunState], parallel: int, retry_failed: bool) -> list[RunState]:
    """The runs to launch now, in queue order, so that at most ``parallel`` run at once."""
    running = sum(state.state == "running" for state in states)
    ready = [s for s in states if s.state in ("pending", "stopped") or (retry_failed and s.state == "failed")]
    return ready[: max(parallel - running, 0)]


def driver_file(queue: str, root: Path) -> Path:
    return root / queue / "driver.json"


def queue_runs(queue: str, only: list[str] | None) -> list[Run]:
    """The queue's runs, or those named in ``only`` in that order (a ValueError names any it does not hold)."""
    if only is None:
        return QUEUES[queue]
    runs = {run.name: run for run in QUEUES[queue]}
    unknown = [name for name in only if name not in runs]
    if unknown:
        raise ValueError(f"--only: queue {queue} has no run {unknown} (its runs: {sorted(runs)})")
    return [runs[name] for name in only]


def drive(
    queue: str, runs: list[Run], root: Path, parallel: int, save_freq: int, retry_failed: bool, poll: float
) -> None:
    """Launch ``runs`` in their order, ``parallel`` at a time, until every one is done or failed."""
    lock = driver_file(queue, root)
    other = read_json(lock).get("pid")
    if other and other != os.getpid() and pid_alive(other, SCRIPT.name):
        raise SystemExit(f"a driver of queue {queue} is already running (pid {other})")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
    children: dict[Path, subprocess.Popen] = {}
    retried: set[str] = set()  # a failed run is retried once per driver, not in a loop
    while True:
        for segment, process in list(children.items()):
            if process.poll() is not None:
                finish(segment, process.returncode)
                del children[segment]
                print(f"segment ended with exit code {process.returncode}: {segment}", flush=True)
        states = [run_state(run, root) for run in runs]
        for state in states:
            if state.state == "running":
                prune_checkpoints(state.segments[-1])
        states = [state for state in states if not (state.state == "failed" and state.run.name in retried)]
        launches = startable(states, parallel, retry_failed)
        for state in launches:
            if state.state == "failed":
                retried.add(state.run.name)
            job = plan(state, root, save_freq)
            children[job.segment] = launch(job)
            print(f"started {state.run.name} at {job.start_steps} steps, pid {children[job.segment].pid}", flush=True)
        if not children and not launches and not any(state.state == "running" for state in states):
            break
        time.sleep(poll)
    print(format_status(queue, root), flush=True)


def stop(queue: str, root: Path) -> None:
    """SIGTERM the driver, SIGINT the runs it launched (rl-zoo3 then saves the model, and the run resumes from it)."""
    driver = read_json(driver_file(queue, root)).get("pid")
    if driver and pid_alive(driver, SCRIPT.name):
        os.kill(driver, signal.SIGTERM)
        print(f"stopped the driver (pid {driver})")
    for run in QUEUES[queue]:
        state = run_state(run, root)
        if state.state == "running" and state.pid and not read_json(state.segments[-1] / "segment.json").get("adopted"):
            os.kill(state.pid, signal.SIGINT)
            print(f"interrupted {run.name} (pid {state.pid})")


def adopt(queue: str, root: Path, exp: Path, pid: int | None) -> None:
    """Make a zoo run started by hand (rl-zoo3's experiment folder) the first segment of the queue's matching run."""
    exp = exp.resolve()
    options = yaml.load((exp / exp.name.rsplit("_", 1)[0] / "args.yml").read_text(), Loader=yaml.UnsafeLoader)
    args = dict(options)  # rl-zoo3 saves the command line's options as an OrderedDict
    command = [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part] if pid else []
    if pid and args["log_folder"] not in " ".join(command):
        raise SystemExit(f"pid {pid} is not the zoo command writing {args['log_folder']}")
    ours = "sb3_trpo_kfac" in command
    matches = [
        run
        for run in QUEUES[queue]
        if (ALGOS[run.algo].zoo_name, run.env, run.seed) == (args["algo"], args["env"], args["seed"])
        and (ALGOS[run.algo].module == "sb3_trpo_kfac") == ours
    ]
    if len(matches) != 1:
        raise SystemExit(f"queue {queue} has no run {args['algo']} {args['env']} seed {args['seed']}")
    run = matches[0]
    if args["n_timesteps"] != run.budget:
        raise SystemExit(f"{exp} trains {args['n_timesteps']} steps, the queue's {run.name} {run.budget}")
    if segments(run, root):
        raise SystemExit(f"{run.name} has segments already: {run.folder(root)}")
    segment = run.folder(root) / "seg00"
    segment.mkdir(parents=True)
    record = dict(adopted=True, pid=pid, command=command, log_folder=args["log_folder"], experiment=str(exp))
    record.update(start_steps=0, resumed_from=None)
    (segment / "segment.json").write_text(json.dumps(record, indent=1))
    print(f"adopted {exp} as {segment}")


def format_status(queue: str, root: Path) -> str:
    driver = read_json(driver_file(queue, root)).get("pid")
    lines = [f"driver: {'running, pid ' + str(driver) if pid_alive(driver, SCRIPT.name) else 'not running'}"]
    lines.append(f"{'run':40} {'state':8} {'steps':>19} {'seg':>3} {'last 10 ep.':>11}  pid / note")
    for run in QUEUES[queue]:
        state = run_state(run, root)
        latest = last_returns(state)
        steps = f"{state.steps:,}/{run.budget:,}"
        note = str(state.pid) if state.pid else state.problem
        latest_text = "" if latest is None else f"{latest:.1f}"
        lines.append(f"{run.name:40} {state.state:8} {steps:>19} {len(state.segments):>3} {latest_text:>11}  {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- segment mode


def run_segment(argv: list[str]) -> None:
    """``segment -m MODULE ARGS``: run a zoo module as ``python -m`` does, with the two changes of the docstring."""
    import runpy

    import rl_zoo3.exp_manager as exp_manager
    from stable_baselines3.common.callbacks import CheckpointCallback

    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: run_queue.py segment -m MODULE [ARGS...]")
    exp_manager.CheckpointCallback = functools.partial(CheckpointCallback, save_vecnormalize=True)  # type: ignore
    zoo_learn = exp_manager.ExperimentManager.learn

    def learn(self: Any, model: Any) -> None:
        if self.continue_training:
            model._last_obs = None  # saved with the model: the new environments must be reset
            algorithm_learn = type(model).learn

            def learn_on(model: Any, *args: Any, **kwargs: Any) -> Any:
                return algorithm_learn(model, *args, **{**kwargs, "reset_num_timesteps": False})

            # on the class: SB3 saves the model's __dict__, where a patched method would go
            type(model).learn = learn_on
        zoo_learn(self, model)

    exp_manager.ExperimentManager.learn = learn  # type: ignore[method-assign]
    sys.argv = [argv[1], *argv[2:]]
    sys.path[0] = os.getcwd()  # as under ``python -m``: this folder's common.py must not shadow another "common"
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "segment":
        run_segment(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queue", choices=list(QUEUES))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the runs live (outside the repo)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--save-freq", type=int, default=50_000, help="env steps between checkpoints")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between the driver's looks at the runs")
    parser.add_argument("--retry-failed", action="store_true", help="resume runs whose last segment failed")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="print every run's state")
    action.add_argument("--dry-run", action="store_true", help="print the launches the driver would make now")
    action.add_argument("--detach", action="store_true", help="start the driver in the background and return")
    action.add_argument("--stop", action="store_true", help="stop the driver and the runs it started")
    action.add_argument("--adopt", type=Path, metavar="EXPERIMENT", help="a zoo experiment folder started by hand")
    parser.add_argument("--pid", type=int, help="with --adopt: the pid of the zoo command training it")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="drive (or list) only these runs, in this order")
    args = parser.parse_args()
    if args.parallel < 1 or args.save_freq < 1 or args.poll <= 0:
        parser.error("--parallel and --save-freq must be at least 1, --poll positive")
    try:
        runs = queue_runs(args.queue, args.only)
    except ValueError as error:
        parser.error(str(error))
    root = args.root.resolve()
    if args.status:
        print(format_status(args.queue, root))
    elif args.dry_run:
        states = [run_state(run, root) for run in runs]
        for state in startable(states, args.parallel, args.retry_failed):
            print(plan(state, root, args.save_freq).describe())
    elif args.stop:
        stop(args.queue, root)
    elif args.adopt:
        adopt(args.queue, root, args.adopt, args.pid)
    elif args.detach:
        command = [sys.executable, str(SCRIPT), *[arg for arg in sys.argv[1:] if arg != "--detach"]]
        log = root / args.queue / "driver.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"driver of queue {args.queue} started (pid {process.pid}), log {log}")
    else:
        drive(args.queue, runs, root, args.parallel, args.save_freq, args.retry_failed, args.poll)


if __name__ == "__main__":
    main()
