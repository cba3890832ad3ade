"""
Where ACKTR's time per update goes beside A2C's, on NatureCNN with 84x84x4 frames (SB3's FakeImageEnv) or the
CartPole MLP, both at the same n_envs x n_steps (default 8 x 5, the "defaults" row of benchmarks/acktr_cost.py) and
one torch thread: milliseconds per update of each algorithm's whole ``learn`` (rollout + update), and of ACKTR's
K-FAC parts, timed around the preconditioner's methods of this model only:

- statistics: the Fisher backward and the factor moments (every ``kfac_stats_interval`` updates, averaged per update);
- curvature: the eigendecompositions (every ``kfac_update`` updates; with ``kfac_async`` only the part on the main
  thread: starting and joining the background job);
- solve: the Kronecker solves of the gradient (every update).

    python benchmarks/acktr_cost_parts.py [--case cnn] [--n-envs 8] [--n-steps 5] [--rounds 3] [--updates 20]
    python benchmarks/acktr_cost_parts.py --acktr '{"kfac_async": true}' --auto-rank 16

``--auto-rank`` changes the rank ``kfac_low_rank="auto"`` keeps (``sb3_trpo_kfac.common.kfac.state.AUTO_RANK``) for
this process, to see what a lower rank would save; it is not a setting of the package. Rounds alternate the two
models as benchmarks/acktr_cost.py does.
"""

import argparse
import collections
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch as th

# benchmarks/ (run as a script, a benchmark has its folder on sys.path)
from acktr_cost import learn_updates, make_env
from common import time_in_turn
from stable_baselines3 import A2C

import sb3_trpo_kfac.common.kfac.state as kfac_state
from sb3_trpo_kfac.acktr import ACKTR


def timed(totals: collections.Counter, label: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` adding its wall time to ``totals[label]``."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=20, help="updates per model and round")
    parser.add_argument("--acktr", type=json.loads, default={}, help="ACKTR keyword arguments, as JSON")
    parser.add_argument("--auto-rank", type=int, default=None, help='rank of kfac_low_rank="auto" (default: 64)')
    args = parser.parse_args()
    th.set_num_threads(1)
    if args.auto_rank is not None:
        kfac_state.AUTO_RANK = args.auto_rank
    policy = "CnnPolicy" if args.case == "cnn" else "MlpPolicy"
    shape = dict(n_steps=args.n_steps, seed=0, device="cpu")
    a2c = A2C(policy, make_env(args.case, 0, args.n_envs), **shape)
    acktr = ACKTR(policy, make_env(args.case, 0, args.n_envs), **shape, **args.acktr)

    parts: collections.Counter = collections.Counter()
    preconditioner = acktr.policy.optimizer.preconditioner  # type: ignore[attr-defined]
    preconditioner.update_statistics = timed(parts, "statistics", preconditioner.update_statistics)
    preconditioner.update_curvature = timed(parts, "curvature", preconditioner.update_curvature)
    preconditioner.solver.solve = timed(parts, "solve", preconditioner.solver.solve)

    models = {"A2C": a2c, "ACKTR": acktr}
    runs = {name: functools.partial(learn_updates, model, args.updates) for name, model in models.items()}
    # a warm-up of whole cadence cycles; the snapshots taken before the warm-up and before every round leave the
    # timed rounds' parts as the difference from the second
    warm_up = {name: functools.partial(learn_updates, model, 2 * args.updates) for name, model in models.items()}
    snapshots: list[collections.Counter] = []
    before_each = {"ACKTR": lambda: snapshots.append(parts.copy())}
    times = time_in_turn(runs, args.rounds, warm_up=warm_up, before_each=before_each)
    parts.subtract(snapshots[1])
    updates = args.rounds * args.updates
    per_update = {name: 1e3 * sum(seconds) / updates for name, seconds in times.items()}
    print(
        f"{args.case}, {args.n_envs} envs x {args.n_steps} steps, ACKTR {json.dumps(args.acktr)}"
        + (f", auto rank {args.auto_rank}" if args.auto_rank is not None else "")
    )
    print(
        f"ms per update: A2C {per_update['A2C']:.1f}, ACKTR {per_update['ACKTR']:.1f}, "
        f"ratio {per_update['ACKTR'] / per_update['A2C']:.3f}"
    )
    print("ACKTR's parts, ms per update:", {k: round(1e3 * v / updates, 1) for k, v in parts.items()})


if __name__ == "__main__":
    main()
