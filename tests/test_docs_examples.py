"""
Every ``python`` code block of README.md and docs/*.md runs as written, in a fresh interpreter: the blocks of one
file in order, in one working directory.

``SB3_TRPO_KFAC_DOCS_BUDGET`` scales every ``learn()`` budget of the blocks (``total_timesteps``, and through it
rl-zoo3's ``n_timesteps``): 0.01 unless set, so that the examples run in seconds; ``SB3_TRPO_KFAC_DOCS_BUDGET=1``
runs them as a reader would. A block that loads ``logs/{algo}/{env}_1/...`` is preceded by that zoo run, as its
text says, at the same scale.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sb3_trpo_kfac.zoo import hyperparams_path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUDGET = float(os.environ.get("SB3_TRPO_KFAC_DOCS_BUDGET", "0.01"))
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "SB3_TRPO_KFAC_DOCS_BUDGET": str(BUDGET),
}

PRELUDE = """\
import os

from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

_budget = float(os.environ["SB3_TRPO_KFAC_DOCS_BUDGET"])
_learn = OnPolicyAlgorithm.learn


def _scaled_learn(self, total_timesteps, *args, **kwargs):
    return _learn(self, max(1, round(total_timesteps * _budget)), *args, **kwargs)


OnPolicyAlgorithm.learn = _scaled_learn
# ---- the documented block ----
"""


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def zoo_run(block: str, cwd: Path) -> None:
    """Train what the block loads from the zoo's log folder, through the command, scaled as the blocks are."""
    for algo, env_id in sorted(set(re.findall(r"logs/(trpo|acktr)/([\w.-]+?)_1/", block))):
        if (cwd / "logs" / algo / f"{env_id}_1").is_dir():
            continue
        with open(hyperparams_path(algo)) as file:
            n_timesteps = yaml.safe_load(file)[env_id]["n_timesteps"]
        args = ["--algo", algo, "--env", env_id, "-n", str(max(1, round(n_timesteps * BUDGET))), "--eval-freq", "-1"]
        result = subprocess.run(
            [sys.executable, "-m", "sb3_trpo_kfac", "train", *args, "--num-threads", "1"],
            cwd=cwd, env=ENV, capture_output=True, text=True, check=False, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]


DOCUMENTED = [path for path in DOCUMENTS if python_blocks(path)]


def test_the_examples_are_found():
    assert {ROOT / "README.md", ROOT / "docs" / "zoo.md"} <= set(DOCUMENTED)


@pytest.mark.parametrize("path", DOCUMENTED, ids=[path.name for path in DOCUMENTED])
def test_python_blocks_run(path, tmp_path):
    for index, block in enumerate(python_blocks(path)):
        zoo_run(block, tmp_path)
        script = tmp_path / f"{path.stem}_{index}.py"
        script.write_text(PRELUDE + block)
        result = subprocess.run(
            [sys.executable, script.name],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        assert result.returncode == 0, f"{path.name} block {index}:\n{block}\n{result.stderr[-3000:]}"
