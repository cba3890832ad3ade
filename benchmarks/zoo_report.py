"""
The report of a run queue (benchmarks/run_queue.py): training curves, steps and episodes to a threshold, final returns.

    python benchmarks/zoo_report.py pong                  # -> benchmarks/results/pong/
    python benchmarks/zoo_report.py mujoco --root /work/runs --out /tmp/mujoco

Per run, the training episodes of all its segments, stitched into one run: each segment's monitor files (one per
environment) give every episode's return, length and wall time; an episode's step is the segment's first step plus
n_envs × the steps its own environment has taken (the environments step in lockstep), so steps count exactly across
environments and segments. A segment's episodes after the step the next segment resumed from are dropped (that part
of the run was redone). Episodes are ordered by wall time. On Atari the monitor counts frames: steps are frames / 4
(AtariWrapper's frame skip; the reset no-ops and FIRE frames, under 1% of a Pong episode, count as steps).

Per run: the env steps and the number of episodes until the mean return of the last 10 training episodes first reaches
the env's threshold (Pong: human level), the mean of the last 10 episodes, and for finished runs the final return, the
mean over the last 10% of the budget (deterministic evaluations where the queue evaluates, as compare_with_peers.py
does; training episodes otherwise). Writes ``runs.csv``, ``summary.json``, ``summary.md`` and ``learning_curves.png``
into the output folder; a run not finished yet is reported with the steps it reached, marked partial.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/run_queue.py and compare_with_peers.py (run as a script, a benchmark has its folder on sys.path)
from compare_with_peers import ALGOS
from run_queue import DEFAULT_ROOT, QUEUES, Run, experiment, read_json, run_state

WINDOW = 10  # episodes in the "mean of the last episodes"
# Return the mean of the last WINDOW training episodes must reach. Atari: the human level of the ACKTR paper's table.
THRESHOLDS = {
    "PongNoFrameskip-v4": 9.3,
    "BreakoutNoFrameskip-v4": 31.8,
    "LunarLander-v3": 200.0,
    "MountainCar-v0": -110.0,
    "BipedalWalker-v3": 300.0,
    "CartPole-v1": 475.0,
    "Pendulum-v1": -200.0,
}
# Published figures to put beside ours.
# Wu et al. 2017 (arXiv 1708.05144), Table 1: episodes to human level (ACKTR, A2C). Recalled, not confirmed against
# the paper's text (no copy of it was reachable when this was written): check before citing.
PAPER_EPISODES = {
    "PongNoFrameskip-v4": {"acktr": 904, "a2c": 4768},
    "BreakoutNoFrameskip-v4": {"acktr": 4094, "a2c": 14464},
}
PAPER_NOTE = "Wu et al. 2017 (arXiv 1708.05144) Table 1, episodes to human level: recalled, NOT confirmed against the paper"
# Issue 16's anchors: rl-zoo3's benchmark (TRPO, 1M steps, -v3 robots), sb3-contrib's docs (Swimmer), PPO here.
ANCHORS = {
    "Walker2d-v5": "rl-zoo3 TRPO (Walker2d-v3, 1M): 4933",
    "Ant-v5": "rl-zoo3 TRPO (Ant-v3, 1M): 4982",
    "Swimmer-v5": "sb3-contrib docs TRPO: 359",
    "HalfCheetah-v5": "rl-zoo3 TRPO (HalfCheetah-v3, 1M): 1785; PPO here: 5200",
}


def frames_per_step(env: str) -> int:
    return 4 if "NoFrameskip" in env else 1


@dataclasses.dataclass
class Curve:
    """One run's stitched training episodes (ordered by wall time) and evaluations."""

    steps: np.ndarray
    returns: np.ndarray
    eval_steps: np.ndarray
    eval_returns: np.ndarray  # mean return of each evaluation


def read_monitor(path: Path) -> tuple[float, np.ndarray]:
    """A monitor file's start time and its rows (return, length, seconds since the start)."""
    lines = path.read_text().splitlines()
    start = json.loads(lines[0][1:])["t_start"]
    rows = [tuple(float(field) for field in line.split(",")[:3]) for line in lines[2:]]
    return start, np.array(rows, dtype=float).reshape(-1, 3)


def stitch(run: Run, root: Path) -> Curve:
    found = sorted(path.parent for path in run.folder(root).glob("seg*/segment.json"))
    starts = [int(read_json(segment / "segment.json").get("start_steps", 0)) for segment in found]
    episodes: list[np.ndarray] = []  # rows (wall time, step, return)
    evaluations: list[np.ndarray] = []  # rows (step, mean return)
    for index, segment in enumerate(found):
        exp = experiment(segment)
        if exp is None:
            continue
        end = starts[index + 1] if index + 1 < len(found) else np.inf
        monitors = sorted(exp.glob("*.monitor.csv"))
        for path in monitors:
            start_time, rows = read_monitor(path)
            steps = starts[index] + len(monitors) * np.cumsum(rows[:, 1]) / frames_per_step(run.env)
            kept = steps <= end
            episodes.append(np.column_stack([start_time + rows[kept, 2], steps[kept], rows[kept, 0]]))
        if (exp / "evaluations.npz").exists():
            with np.load(exp / "evaluations.npz") as data:
                kept = data["timesteps"] <= end
                evaluations.append(np.column_stack([data["timesteps"][kept], data["results"][kept].mean(1)]))
    rows = np.concatenate(episodes) if episodes else np.zeros((0, 3))
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    evals = np.concatenate(evaluations) if evaluations else np.zeros((0, 2))
    return Curve(rows[:, 1], rows[:, 2], evals[:, 0], evals[:, 1])


def rolling_mean(values: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Mean of each value with the ``window - 1`` before it (shorter at the start)."""
    sums = np.cumsum(values)
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    previous = np.concatenate([np.zeros(window), sums])[: len(values)]
    return (sums - previous) / counts


def to_threshold(curve: Curve, threshold: float) -> tuple[float | None, int | None]:
    """Env steps and episodes until the mean of the last WINDOW episodes (a full window) first reaches ``threshold``."""
    means = rolling_mean(curve.returns)
    reached = np.flatnonzero((means >= threshold) & (np.arange(len(means)) >= WINDOW - 1))
    if not reached.size:
        return None, None
    index = int(reached[0])
    return float(curve.steps[: index + 1].max()), index + 1


def summarize_run(run: Run, root: Path) -> tuple[dict[str, Any], Curve]:
    state = run_state(run, root)
    curve = stitch(run, root)
    threshold = THRESHOLDS.get(run.env)
    steps, episodes = to_threshold(curve, threshold) if threshold is not None else (None, None)
    done = state.state == "done"
    last = curve.steps >= 0.9 * run.budget
    evaluated = curve.eval_steps >= 0.9 * curve.eval_steps.max() if curve.eval_steps.size else np.zeros(0, bool)
    # a running run has trained past its latest checkpoint: its episodes say how far
    reached = max(state.steps, int(curve.steps.max()) if curve.steps.size else 0)
    record = dict(algo=run.algo, env=run.env, seed=run.seed, state=state.state, steps_reached=reached)
    record.update(budget=run.budget, segments=len(state.segments), episodes=int(curve.returns.size))
    record.update(threshold=threshold, steps_to_threshold=steps, episodes_to_threshold=episodes)
    record["last_10_episodes"] = float(curve.returns[-WINDOW:].mean()) if curve.returns.size else None
    record["final_training_return"] = float(curve.returns[last].mean()) if done and last.any() else None
    record["final_evaluation_return"] = float(curve.eval_returns[evaluated].mean()) if done and evaluated.any() else None
    return record, curve


def ratio_text(ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> str:
    """ACKTR's steps to the threshold over A2C's, per common seed and of the medians."""
    by_seed = {record["seed"]: record["steps_to_threshold"] for record in peer}
    parts = []
    for record in ours:
        mine, theirs = record["steps_to_threshold"], by_seed.get(record["seed"])
        if mine is not None and theirs is not None:
            parts.append(f"seed {record['seed']}: {mine / theirs:.2f}")
    mine_all = [r["steps_to_threshold"] for r in ours if r["steps_to_threshold"] is not None]
    theirs_all = [r["steps_to_threshold"] for r in peer if r["steps_to_threshold"] is not None]
    if len(mine_all) == len(ours) and len(theirs_all) == len(peer) and ours and peer:
        parts.append(f"medians: {np.median(mine_all) / np.median(theirs_all):.2f}")
    return "; ".join(parts) if parts else "n/a (not reached by both)"


def number(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(queue: str, records: list[dict[str, Any]]) -> str:
    lines = []
    for env in dict.fromkeys(record["env"] for record in records):
        rows = [record for record in records if record["env"] == env]
        threshold = THRESHOLDS.get(env)
        lines += [f"### {env}", ""]
        if env in ANCHORS:
            lines += [f"Anchor: {ANCHORS[env]}.", ""]
        columns = ["algorithm", "seed", "state", "steps reached", "episodes", f"last {WINDOW} episodes"]
        if threshold is not None:
            columns += [f"steps to {threshold:g}", f"episodes to {threshold:g}"]
        columns += ["final (training, last 10%)", "final (evaluation, last 10%)"]
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for r in rows:
            state = r["state"] if r["state"] == "done" else f"{r['state']} (partial)"
            cells = [ALGOS[r["algo"]].label, str(r["seed"]), state, f"{r['steps_reached']:,} / {r['budget']:,}"]
            cells += [number(r["episodes"]), number(r["last_10_episodes"])]
            if threshold is not None:
                cells += [number(r["steps_to_threshold"], 0), number(r["episodes_to_threshold"])]
            cells += [number(r["final_training_return"]), number(r["final_evaluation_return"])]
            lines.append("| " + " | ".join(cells) + " |")
        for algo in dict.fromkeys(r["algo"] for r in rows):
            key = "final_evaluation_return" if any(r["final_evaluation_return"] is not None for r in rows) else None
            finals = [r[key or "final_training_return"] for r in rows if r["algo"] == algo and r["state"] == "done"]
            if finals:
                what = "evaluation" if key else "training"
                lines.append(
                    f"\n{ALGOS[algo].label}: final {what} return {np.mean(finals):.1f} ± {np.std(finals):.1f} "
                    f"over {len(finals)} finished seed(s)."
                )
        if env in PAPER_EPISODES:
            paper = PAPER_EPISODES[env]
            lines += ["", f"Paper: ACKTR {paper['acktr']:,} episodes, A2C {paper['a2c']:,} ({PAPER_NOTE})."]
        acktr = [r for r in rows if r["algo"] == "acktr"]
        a2c = [r for r in rows if r["algo"] == "a2c"]
        if threshold is not None and acktr and a2c:
            lines += ["", f"ACKTR steps ÷ A2C steps to {threshold:g}: {ratio_text(acktr, a2c)}."]
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    envs = list(dict.fromkeys(record["env"] for record in records))
    figure, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    colors = {algo: f"C{index}" for index, algo in enumerate(ALGOS)}
    for axis, env in zip(axes[0], envs):
        for record, curve in zip(records, curves):
            if record["env"] != env or not curve.returns.size:
                continue
            label = f"{ALGOS[record['algo']].label} s{record['seed']}"
            style = ("-", "--", ":", "-.")[record["seed"] % 4]  # one color per algorithm, one line style per seed
            axis.plot(curve.steps, rolling_mean(curve.returns), color=colors[record["algo"]], ls=style, lw=1, label=label)
        if THRESHOLDS.get(env) is not None:
            axis.axhline(THRESHOLDS[env], color="grey", linestyle=":", linewidth=1)
        axis.set(title=env, xlabel="env steps", ylabel=f"training return (mean of last {WINDOW} episodes)")
        axis.xaxis.set_major_formatter(EngFormatter())
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")
    figure.suptitle(title, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(queue: str, root: Path, out: Path) -> dict[str, Any]:
    pairs = [summarize_run(run, root) for run in QUEUES[queue]]
    records = [record for record, _ in pairs]
    out.mkdir(parents=True, exist_ok=True)
    columns = list(records[0])
    with open(out / "runs.csv", "w") as csv:
        csv.write(",".join(columns) + "\n")
        for record in records:
            csv.write(",".join("" if record[key] is None else str(record[key]) for key in columns) + "\n")
    partial = any(record["state"] != "done" for record in records)
    summary = dict(queue=queue, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), partial=partial)
    summary.update(window=WINDOW, thresholds={env: THRESHOLDS.get(env) for env in {r["env"] for r in records}})
    summary.update(paper_episodes={env: PAPER_EPISODES[env] for env in {r["env"] for r in records} & set(PAPER_EPISODES)})
    summary.update(paper_note=PAPER_NOTE, runs=records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    header = f"Queue `{queue}`, {summary['generated']}" + (" — PARTIAL: runs not finished are marked" if partial else "")
    (out / "summary.md").write_text(header + "\n\n" + markdown(queue, records))
    shown = [(record, curve) for record, curve in pairs if curve.returns.size]
    if shown:
        plot([r for r, _ in shown], [c for _, c in shown], out / "learning_curves.png", header)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queue", choices=list(QUEUES))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where run_queue.py keeps the runs")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/QUEUE")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / args.queue
    report(args.queue, args.root.resolve(), out)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
