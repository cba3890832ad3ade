"""
The benchmark scripts, run as a user runs them (never imported by a test): the zoo commands the side-by-side benchmark
(benchmarks/compare_with_peers.py) builds, the peer hyperparameter file it derives for env versions rl-zoo3 lacks,
the runs it skips and the figures of its report; and that the benchmarks which train zoo entries themselves run the
shipped entries (their ``--dry-run`` output against the files the zoo commands read). The training itself is the
zoo's.
"""

import collections
import importlib.util
import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sb3_trpo_kfac.zoo import hyperparams_path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
COMPARE = BENCHMARKS / "compare_with_peers.py"
ALGOS = ("acktr", "trpo", "sb3-contrib-trpo", "a2c", "ppo")
OURS = {"acktr", "trpo"}
ZOO_NAME = {"acktr": "acktr", "trpo": "trpo", "sb3-contrib-trpo": "trpo", "a2c": "a2c", "ppo": "ppo"}
# rl-zoo3 keeps these keys for itself; the rest of an entry goes to the algorithm's constructor
ZOO_KEYS = ("n_envs", "n_timesteps", "policy", "normalize")


def run_script(script: Path, *args: str) -> str:
    """Run a benchmark script; its stdout."""
    command = [sys.executable, str(script), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def commands(out: Path, *args: str) -> list[list[str]]:
    """The zoo commands ``compare_with_peers.py --dry-run`` lists, parsed."""
    return [shlex.split(line) for line in run_script(COMPARE, "--dry-run", "--out", str(out), *args).splitlines()]


def parse(command: list[str]) -> tuple[str, dict[str, str]]:
    """The entry point (``python -m ...``) of a zoo command and its options."""
    assert command[0] == sys.executable and command[1] == "-m"
    module, rest = command[2], command[3:]
    if module == "sb3_trpo_kfac":
        assert rest[0] == "train"
        rest = rest[1:]
    assert len(rest) % 2 == 0 and all(key.startswith("-") for key in rest[::2]), rest
    return module, dict(zip(rest[::2], rest[1::2], strict=True))


def rl_zoo3_entries(zoo_name: str) -> dict[str, Any]:
    spec = importlib.util.find_spec("rl_zoo3")  # its folder; importing rl_zoo3 takes seconds
    assert spec is not None and spec.origin is not None
    return yaml.safe_load((Path(spec.origin).parent / "hyperparams" / f"{zoo_name}.yml").read_text())


def our_entries(algo: str) -> dict[str, Any]:
    return yaml.safe_load(Path(hyperparams_path(algo)).read_text())


def test_full_mode_runs_each_zoo_command_at_the_documented_budgets(tmp_path):
    found = commands(tmp_path, "--envs", "CartPole-v1", "Pendulum-v1", "--seeds", "3")
    # docs/benchmarks.md: budget, evaluation episodes and frequency per env, the same for every algorithm
    documented = {"CartPole-v1": ("200000", "5000", "10"), "Pendulum-v1": ("100000", "5000", "10")}
    runs = set()
    for command in found:
        module, options = parse(command)
        algo = Path(options["-f"]).parts[-3]
        runs.add((algo, options["--env"]))
        assert module == ("sb3_trpo_kfac" if algo in OURS else "rl_zoo3.train")
        assert options["--algo"] == ZOO_NAME[algo]
        # ours default to the shipped files; rl-zoo3 has every peer's entry for these envs: its own files
        assert "--conf-file" not in options
        assert (options["-n"], options["--eval-freq"], options["--eval-episodes"]) == documented[options["--env"]]
        assert options["--seed"] == "3" and options["--n-eval-envs"] == "1" and options["--num-threads"] == "1"
        assert Path(options["-f"]) == tmp_path / "runs" / algo / options["--env"] / "seed3"
    assert runs == {(algo, env) for algo in ALGOS for env in documented} and len(found) == len(runs)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "commands.txt").exists()  # nothing ran


def test_quick_mode_runs_two_seeds_on_two_envs_at_smaller_budgets(tmp_path):
    full = {parse(command)[1]["--env"]: parse(command)[1]["-n"] for command in commands(tmp_path, "--algos", "a2c")}
    quick = [parse(command)[1] for command in commands(tmp_path, "--quick")]
    assert {(options["--env"], options["--seed"]) for options in quick} == {
        (env, seed) for env in ("CartPole-v1", "Pendulum-v1") for seed in ("0", "1")
    }
    assert len(quick) == 4 * len(ALGOS)
    for options in quick:
        assert int(options["-n"]) < int(full[options["--env"]])
        assert int(options["-n"]) % int(options["--eval-freq"]) == 0  # the last evaluation at the end of the budget


def test_peers_run_the_entry_of_another_version_where_rl_zoo3_lacks_one(tmp_path):
    envs = ["CartPole-v1", "HalfCheetah-v5"]
    found = commands(tmp_path, "--envs", *envs, "--algos", "trpo", "sb3-contrib-trpo", "ppo", "--seeds", "0")
    assert len(found) == 6
    for command in found:
        module, options = parse(command)
        if module == "sb3_trpo_kfac":  # ours have v5 entries in the shipped file
            assert "--conf-file" not in options
            continue
        shipped = rl_zoo3_entries(options["--algo"])
        assert "HalfCheetah-v5" not in shipped  # what the aliasing is for; drop it when rl-zoo3 gains v5 entries
        conf = Path(options["--conf-file"])
        assert conf == tmp_path / "hyperparams" / f"{options['--algo']}.yml"
        copied = yaml.safe_load(conf.read_text())
        assert copied == {"CartPole-v1": shipped["CartPole-v1"], "HalfCheetah-v5": shipped["HalfCheetah-v4"]}


def test_only_unfinished_runs_are_planned(tmp_path):
    def result(algo: str, seed: int, returncode: int) -> None:
        folder = tmp_path / "runs" / algo / "CartPole-v1" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"command": [], "returncode": returncode, "wall_time_s": 3.0}))

    result("trpo", 0, 0)  # finished: skipped
    result("ppo", 0, 1)  # failed: run again
    (tmp_path / "runs" / "ppo" / "CartPole-v1" / "seed1").mkdir(parents=True)  # interrupted: run again
    found = commands(tmp_path, "--envs", "CartPole-v1", "--algos", "trpo", "ppo", "--seeds", "0", "1")
    planned = {(parse(command)[1]["--algo"], parse(command)[1]["--seed"]) for command in found}
    assert planned == {("trpo", "1"), ("ppo", "0"), ("ppo", "1")} and len(found) == 3


def test_report_of_finished_runs(tmp_path):
    # evaluations every 10k steps up to 100k, 3 episodes each
    timesteps = np.arange(1, 11) * 10_000
    spread = np.array([-1.0, 0.0, 1.0])  # the episodes of one evaluation around its mean
    means = {
        "trpo": np.array([100, 200, 300, 400, 480, 470, 490, 500, 490, 500]),  # 475 first reached at 50k
        "a2c": np.full(10, 21.0),  # never reaches 475
        "ppo": np.full(10, 500.0),  # a failed run: never reported
    }
    returns = {algo: mean[:, None] + spread for algo, mean in means.items()}
    for algo, values in returns.items():
        folder = tmp_path / "runs" / algo / "CartPole-v1" / "seed0" / "logs"
        folder.mkdir(parents=True)
        np.savez(folder / "evaluations.npz", timesteps=timesteps, results=values, ep_lengths=np.ones_like(values))
        returncode = 1 if algo == "ppo" else 0
        result = {"command": [], "returncode": returncode, "wall_time_s": 60.0}
        (folder.parent / "result.json").write_text(json.dumps(result))
    run_script(COMPARE, "--report-only", "--out", str(tmp_path), "--envs", "CartPole-v1", "--seeds", "0")
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert lines[0] == "algo,env,seed,final_return,steps_to_threshold,wall_time_s"
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert set(rows) == {"trpo", "a2c"}
    # final return: the mean evaluation return over the last 10% of the run (the 90k and 100k evaluations)
    assert float(rows["trpo"][3]) == 495.0 and float(rows["a2c"][3]) == 21.0
    # steps to 475: the first evaluation whose mean reaches it, even if a later one falls back
    assert float(rows["trpo"][4]) == 50_000 and rows["a2c"][4] == "inf"
    assert float(rows["trpo"][5]) == float(rows["a2c"][5]) == 60.0
    assert (tmp_path / "summary.md").exists() and (tmp_path / "learning_curves.png").exists()


def dry_run_records(script: str, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run_script(BENCHMARKS / script, "--dry-run", *args).splitlines()]


def assert_runs_entry(record: dict[str, Any], entry: dict[str, Any], shipped_by: str) -> None:
    """The benchmark runs ``entry`` of ``shipped_by``'s file as rl-zoo3 would: its keywords, env count and policy."""
    assert record["shipped_by"] == shipped_by and record["settings"] == entry
    assert record["kwargs"] == {key: value for key, value in entry.items() if key not in ZOO_KEYS}
    assert (record["n_envs"], record["policy"]) == (entry["n_envs"], entry["policy"])
    assert record["n_timesteps"] == entry["n_timesteps"] and record["normalize"] is None


def test_sample_efficiency_runs_the_shipped_cartpole_entries():
    records = {r["algo"]: r for r in dry_run_records("acktr_sample_efficiency.py", "--acktr-kwargs", '{"n_steps": 20}')}
    assert set(records) == {"acktr", "a2c"}
    override = {**our_entries("acktr")["CartPole-v1"], "n_steps": 20}
    assert_runs_entry(records["acktr"], override, "sb3_trpo_kfac")
    assert_runs_entry(records["a2c"], rl_zoo3_entries("a2c")["CartPole-v1"], "rl_zoo3")
    # a run stops at its entry's budget, or 250k steps if that is more (docs/performance.md counts past 250k as 250k)
    assert records["acktr"]["budget"] == 250_000 and records["a2c"]["budget"] == 500_000


def test_cost_entries_case_runs_the_shipped_cartpole_entries():
    records = {r["model"]: r for r in dry_run_records("acktr_cost.py", "--cases", "entries")}
    assert set(records) == {"A2C", "ACKTR"}
    assert_runs_entry(records["ACKTR"], our_entries("acktr")["CartPole-v1"], "sb3_trpo_kfac")
    assert_runs_entry(records["A2C"], rl_zoo3_entries("a2c")["CartPole-v1"], "rl_zoo3")


def test_trpo_learning_runs_each_implementations_entry():
    records = dry_run_records("trpo_learning.py", "--envs", "CartPole-v1", "Pendulum-v1")
    assert {(r["implementation"], r["env_id"]) for r in records} == {
        (impl, env) for impl in ("ours", "sb3-contrib") for env in ("CartPole-v1", "Pendulum-v1")
    }
    for record in records:
        if record["implementation"] == "ours":
            assert_runs_entry(record, our_entries("trpo")[record["env_id"]], "sb3_trpo_kfac")
        else:
            assert_runs_entry(record, rl_zoo3_entries("trpo")[record["env_id"]], "rl_zoo3")


# benchmarks/run_queue.py and benchmarks/zoo_report.py: the long runs of issue 16 (planned, never trained here)
QUEUE = BENCHMARKS / "run_queue.py"


def queue_launches(root: Path, queue: str, *args: str) -> list[dict[str, Any]]:
    """What ``run_queue.py QUEUE --dry-run`` would launch now."""
    output = run_script(QUEUE, queue, "--dry-run", "--root", str(root), *args)
    return [json.loads(line) for line in output.splitlines()]


def zoo_options(command: list[str]) -> tuple[str, dict[str, str]]:
    """The zoo module and options of a segment's command (``python run_queue.py segment -m MODULE ...``)."""
    assert command[:3] == [sys.executable, str(QUEUE), "segment"] and command[3] == "-m"
    module, rest = command[4], command[5:]
    rest = rest[1:] if module == "sb3_trpo_kfac" and rest[0] == "train" else rest
    assert len(rest) % 2 == 0 and all(key.startswith("-") for key in rest[::2]), rest
    return module, dict(zip(rest[::2], rest[1::2], strict=True))


def test_queue_runs_each_zoo_command_one_thread_with_checkpoints(tmp_path):
    launches = queue_launches(tmp_path, "pong", "--parallel", "8")
    assert [launch["run"] for launch in launches] == [
        f"{algo}/PongNoFrameskip-v4/seed{seed}"
        for seed, algos in ((0, ("acktr", "a2c", "acktr-async")), (1, ("acktr", "a2c")))
        for algo in algos
    ]
    for launch in launches:
        module, options = zoo_options(launch["command"])
        algo = launch["run"].split("/")[0]
        ours = algo.startswith("acktr")
        assert module == ("sb3_trpo_kfac" if ours else "rl_zoo3.train") and options["--algo"] == ("acktr" if ours else algo)
        # the kfac_async variant: our command, the shipped entry and one override
        assert options.get("--hyperparams") == ("kfac_async:True" if algo == "acktr-async" else None)
        assert (options["-n"], options["--num-threads"], options["--save-freq"]) == ("3000000", "1", "50000")
        assert "--conf-file" not in options and "-i" not in options  # both entries' own "atari" entry; a new run
        assert Path(options["-f"]) == tmp_path / "pong" / launch["run"] / "seg00" / "logs"
        assert launch["resume_from"] is None and launch["start_steps"] == 0
    assert len(queue_launches(tmp_path, "pong")) == 2  # --parallel 2 by default
    assert not (tmp_path / "pong").exists()  # a dry run launches nothing

    mujoco = queue_launches(tmp_path, "mujoco", "--parallel", "40")
    assert len(mujoco) == 3 * (3 + 3 + 1 + 1 + 1)
    kl = queue_launches(tmp_path, "kl", "--parallel", "40")
    assert [launch["run"] for launch in kl] == [f"acktr-kl/HalfCheetah-v5/seed{seed}" for seed in (0, 1, 2)]
    for launch in mujoco + kl:
        module, options = zoo_options(launch["command"])
        assert (options["--eval-freq"], options["--eval-episodes"]) == ("50000", "5")
        # the target_kl variant: our command, the shipped entry and one override
        variant = launch["run"].startswith("acktr-kl/")
        assert (options.get("--hyperparams"), module == "sb3_trpo_kfac") == (
            ("target_kl:0.002", True) if variant else (None, module == "sb3_trpo_kfac")
        )
        if module == "rl_zoo3.train":  # the peers run rl-zoo3's -v4 entries for the -v5 robots
            copied = yaml.safe_load(Path(options["--conf-file"]).read_text())
            shipped = rl_zoo3_entries(options["--algo"])
            assert copied == {env: shipped[env.replace("-v5", "-v4")] for env in ("Ant-v5", "Swimmer-v5", "Walker2d-v5")}


def test_queue_drives_only_the_runs_named_in_their_order(tmp_path):
    named = ["a2c/PongNoFrameskip-v4/seed1", "acktr/PongNoFrameskip-v4/seed0"]
    launches = queue_launches(tmp_path, "pong", "--parallel", "8", "--only", *named)
    assert [launch["run"] for launch in launches] == named
    command = [sys.executable, str(QUEUE), "pong", "--dry-run", "--root", str(tmp_path), "--only", "acktr/Pong/seed9"]
    refused = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--only: queue pong has no run ['acktr/Pong/seed9']" in refused.stderr


def fake_segment(folder: Path, exp_name: str, start_steps: int, pid: int | None = None) -> Path:
    """A segment's record and zoo experiment folder, as run_queue.py and rl-zoo3 leave them."""
    exp = folder / "logs" / exp_name
    exp.mkdir(parents=True)
    record = {"pid": pid, "log_folder": str(folder / "logs"), "experiment": str(exp), "start_steps": start_steps}
    (folder / "segment.json").write_text(json.dumps(record))
    return exp


def write_model(path: Path, steps: int) -> None:
    """A stand-in for an SB3 model zip: the queue reads only its step count."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", json.dumps({"num_timesteps": steps}))


def test_queue_resumes_from_the_latest_checkpoint_saved_with_its_normalization(tmp_path):
    run = tmp_path / "smoke" / "a2c" / "Pendulum-v1" / "seed0"
    exp = fake_segment(run / "seg00", "a2c/Pendulum-v1_1", 0)
    (exp / "Pendulum-v1").mkdir()
    (exp / "Pendulum-v1" / "config.yml").write_text("normalize: true\nn_envs: 8\n")
    for steps in (4000, 6000):
        write_model(exp / f"rl_model_{steps}_steps.zip", steps)
    (exp / "rl_model_8000_steps.zip").write_bytes(b"PK")  # cut short by the kill while it was written: skipped
    (exp / "rl_model_vecnormalize_4000_steps.pkl").write_bytes(b"")  # killed between the 6000 model and its statistics
    done = fake_segment(tmp_path / "smoke" / "a2c" / "CartPole-v1" / "seed0" / "seg00", "a2c/CartPole-v1_1", 0)
    write_model(done / "CartPole-v1.zip", 20_000)  # the final model at the budget: done

    ours = fake_segment(tmp_path / "smoke" / "acktr" / "CartPole-v1" / "seed0" / "seg00", "acktr/CartPole-v1_1", 0)
    (ours / "CartPole-v1").mkdir()
    (ours / "CartPole-v1" / "config.yml").write_text("n_envs: 8\n")
    write_model(ours / "rl_model_2000_steps.zip", 2000)

    launches = {launch["run"]: launch for launch in queue_launches(tmp_path, "smoke", "--parallel", "4")}
    assert set(launches) == {"acktr/CartPole-v1/seed0", "acktr/Pendulum-v1/seed0", "a2c/Pendulum-v1/seed0"}
    # ours resume with the values the run started with (the shipped entry may have changed since)
    _, options = zoo_options(launches["acktr/CartPole-v1/seed0"]["command"])
    assert Path(options["--conf-file"]) == ours / "CartPole-v1" / "config.yml" and options["-n"] == "18000"
    resumed = launches["a2c/Pendulum-v1/seed0"]
    assert resumed["resume_from"] == str(exp / "rl_model_4000_steps.zip")
    assert resumed["normalization"] == str(exp / "rl_model_vecnormalize_4000_steps.pkl")
    _, options = zoo_options(resumed["command"])
    assert (options["-n"], resumed["start_steps"]) == ("8000", 4000)  # the rest of the 12k budget
    # -i reads the statistics from MODEL's folder / ENV / vecnormalize.pkl: launch() copies both there
    assert Path(options["-i"]) == run / "seg01" / "resume" / "rl_model_4000_steps.zip"
    assert Path(options["-f"]) == run / "seg01" / "logs"

    status = run_script(QUEUE, "smoke", "--status", "--root", str(tmp_path))
    assert "a2c/CartPole-v1/seed0" in status and " done " in status.split("a2c/CartPole-v1/seed0")[1].splitlines()[0]


def write_monitor(path: Path, start: float, rows: list[tuple[float, int, float]]) -> None:
    lines = [f'#{{"t_start": {start}, "env_id": "CartPole-v1"}}', "r,l,t"]
    path.write_text("\n".join(lines + [f"{value},{length},{t}" for value, length, t in rows]) + "\n")


def test_report_stitches_the_segments_of_a_run_in_steps_and_time(tmp_path):
    run = tmp_path / "smoke" / "acktr" / "CartPole-v1" / "seed0"
    # segment 0, two envs, episodes of 100 steps (200 env steps of the run each); checkpoint at 1,200, killed later
    first = fake_segment(run / "seg00", "acktr/CartPole-v1_1", 0)
    write_monitor(first / "0.monitor.csv", 1000.0, [(10.0 + i, 100, 10.0 * i + 10) for i in range(8)])
    write_monitor(first / "1.monitor.csv", 1000.0, [(20.0 + i, 100, 10.0 * i + 15) for i in range(8)])
    # segment 1 resumed from 1,200 steps: segment 0's episodes after 1,200 steps were redone, and are dropped
    second = fake_segment(run / "seg01", "acktr/CartPole-v1_1", 1200)
    write_monitor(second / "0.monitor.csv", 5000.0, [(500.0, 100, 20.0 * i + 10) for i in range(6)])
    write_monitor(second / "1.monitor.csv", 5000.0, [(500.0, 100, 20.0 * i + 20) for i in range(6)])
    out = tmp_path / "report"
    run_script(BENCHMARKS / "zoo_report.py", "smoke", "--root", str(tmp_path), "--out", str(out))

    lines = (out / "runs.csv").read_text().splitlines()
    rows = {tuple(row.split(",")[:3]): dict(zip(lines[0].split(","), row.split(","))) for row in lines[1:]}
    record = rows[("acktr", "CartPole-v1", "0")]
    assert record["episodes"] == "24" and record["segments"] == "2" and record["state"] == "stopped"
    # the mean of the last 10 reaches 475 with segment 1's 10th episode (env 1's 5th: 1,200 + 2 x 500 steps)
    assert record["episodes_to_threshold"] == "22" and float(record["steps_to_threshold"]) == 2200.0
    assert float(record["last_10_episodes"]) == 500.0 and record["final_training_return"] == ""  # not done
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True and (out / "learning_curves.png").exists()
    assert "stopped (partial)" in (out / "summary.md").read_text()


def test_queue_adopts_a_zoo_run_started_by_hand(tmp_path):
    exp = tmp_path / "by_hand" / "a2c" / "PongNoFrameskip-v4_1"
    (exp / "PongNoFrameskip-v4").mkdir(parents=True)
    options = [("algo", "a2c"), ("env", "PongNoFrameskip-v4"), ("seed", 1), ("n_timesteps", 3_000_000)]
    options += [("log_folder", str(tmp_path / "by_hand"))]
    (exp / "PongNoFrameskip-v4" / "args.yml").write_text(yaml.dump(collections.OrderedDict(options)))  # as rl-zoo3
    write_model(exp / "rl_model_50000_steps.zip", 50_000)
    run_script(QUEUE, "pong", "--adopt", str(exp), "--root", str(tmp_path))
    record = json.loads((tmp_path / "pong" / "a2c" / "PongNoFrameskip-v4" / "seed1" / "seg00" / "segment.json").read_text())
    assert record["adopted"] and record["experiment"] == str(exp) and record["start_steps"] == 0
    # its process is gone (no --pid): the run resumes from its checkpoint in the queue's own folder
    launches = {launch["run"]: launch for launch in queue_launches(tmp_path, "pong", "--parallel", "8")}
    assert launches["a2c/PongNoFrameskip-v4/seed1"]["resume_from"] == str(exp / "rl_model_50000_steps.zip")
    _, options_given = zoo_options(launches["a2c/PongNoFrameskip-v4/seed1"]["command"])
    assert options_given["-n"] == "2950000"
def test_data_parallel_throughput_runs_both_algorithms_with_one_and_two_ranks_on_the_same_per_rank_batch():
    records = {r["algo"]: r for r in dry_run_records("data_parallel_throughput.py", "--step-ms", "3")}
    assert set(records) == {"trpo", "acktr"}
    for record in records.values():
        assert record["world_sizes"] == [1, 2] and record["step_ms"] == 3.0
        assert record["n_envs_per_rank"] == 4 and record["kwargs"]["n_steps"] == 64
