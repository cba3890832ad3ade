"""
Per-seed scores of the learning checks (tests/test_learning.py) under each CPU kernel set and torch thread count, to
choose and verify their thresholds. Runs pytest once per combination, collecting the scores in a JSONL file;
combinations already in the file are skipped (resumable).

    python benchmarks/learning_test_margins.py --capabilities default avx2 native --threads 1 2
"""

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2", "native"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--scores", type=Path, default=ROOT / "benchmarks" / "results" / "learning_test_margins.jsonl")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of the checks)")
    args = parser.parse_args()
    args.scores.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.scores.exists():
        done = {(r["capability"], r["threads"]) for r in map(json.loads, args.scores.read_text().splitlines())}
    for capability in args.capabilities:
        for threads in args.threads:
            if (capability, threads) in done and args.k is None:
                continue
            env = dict(os.environ, SB3_TRPO_KFAC_LEARNING_SCORES=str(args.scores), SB3_TRPO_KFAC_TORCH_THREADS=str(threads))
            env.pop("ATEN_CPU_CAPABILITY", None)
            if capability != "native":
                env["ATEN_CPU_CAPABILITY"] = capability
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_learning.py"]
            if args.k:
                command += ["-k", args.k]
            print(f"# {capability}, {threads} thread(s): {' '.join(command)}", flush=True)
            subprocess.run(command, cwd=ROOT, env=env, check=False)
    table: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for record in map(json.loads, args.scores.read_text().splitlines()):
        check = (record["algo"], record["env"], record["timesteps"])
        table[check][(record["capability"], record["threads"], record["seed"])] = record["score"]
    for (algo, env_id, timesteps), scores in sorted(table.items()):
        print(f"\n{algo} {env_id} {timesteps} steps: best mean of 10 training episodes")
        for capability, threads in sorted({key[:2] for key in scores}):
            seeds = sorted(seed for cap, thr, seed in scores if (cap, thr) == (capability, threads))
            values = ", ".join(f"{scores[(capability, threads, seed)]:.1f}" for seed in seeds)
            print(f"  {capability:8s} {threads} thread(s): seeds {seeds}: {values}")


if __name__ == "__main__":
    main()
