"""
Wall time per environment step of ACKTR vs SB3's A2C with the same n_envs / n_steps, in one process
(one torch thread, CPU), on two cases:

- MLP: CartPole-v1, 8 envs x 5 steps, default MlpPolicy;
- CNN: NatureCNN on 84x84x4 frames (SB3's FakeImageEnv), 16 envs x 5 steps;

and a third, "entries": CartPole-v1 with each algorithm's shipped zoo entry, read from the files the zoo commands
read, as benchmarks/acktr_sample_efficiency.py runs them (A2C: rl-zoo3's a2c.yml, 8 envs x 5 steps; ACKTR: our
acktr.yml, 8 envs x 10 steps and extra critic steps), timed per environment step over the same number of steps.

"defaults": what ``ACKTR(policy, env)`` costs against ``A2C(policy, env)``, constructor defaults on both sides, on the
MLP case and on the CNN case with 8 envs: with the same n_steps (5, A2C's) and with each at its own default n_steps
(ACKTR 20, A2C 5), timed over the same environment steps; on the CNN case also n_steps 5 with ``kfac_async=True``
(the decompositions in a background thread, one update late: not a default).

"atari": PongNoFrameskip-v4 (AtariWrapper, 4 stacked frames) with both shipped ``atari`` entries, each as its zoo
command runs it (ours: acktr.yml, 32 envs x 20 steps; rl-zoo3's a2c.yml: 16 envs x 5 steps, RMSpropTFLike), timed
over the same environment steps: ``--block-atari`` ACKTR updates per round (whole cycles of its cadence). Needs
``pip install -e '.[atari]'``.

    python benchmarks/acktr_cost.py [--rounds-mlp 100] [--rounds-cnn 30] [--block-mlp 8] [--block-cnn 10]
    python benchmarks/acktr_cost.py --cases entries
    python benchmarks/acktr_cost.py --cases defaults atari [--rounds-defaults 10] [--rounds-atari 5]
    python benchmarks/acktr_cost.py --dry-run     # the settings of every model it would time, as JSON

After a warm-up, the models are timed in turn (``time_in_turn`` of benchmarks/common.py), ``--block-*`` updates
each, for ``--rounds-*`` rounds: short interleaved blocks spread any drift of the machine (frequency, neighbours)
over all of them; a block covers whole cycles of the amortized settings. Printed: the ratio of total times and the
median of the per-round ratios, the figure to read on a shared machine (on ours, neighbouring blocks of the same
model differed by up to 2x, and a few slow blocks move the total). ACKTR runs with each setting in ``ACKTR_KWARGS``:

- mlp "fresh": eigendecompositions and statistics at every update (SB2's cadence, ACKTR's defaults until
  2026-11-30);
- mlp "fresh async": the same with ``kfac_async=True``: the eigendecompositions run in a background thread
  overlapped with the next rollout (each update uses the previous update's basis);
- mlp "every 4" / "every 8": statistics every 4 / 8 updates, each decomposed at once (the updates in between
  reuse them); "every 8 async refine" (the shipped CartPole-v1 cadence): the decompositions in the background,
  one update late, and that update refined by one CG iteration on the current factors (``kfac_refine=1``);
- mlp "statistics only": statistics every update, no decomposition after the first (the floor of fresh
  statistics); "fixed": neither (the K-FAC step alone, the floor of every cadence);
- cnn: statistics every 10 updates, factored-damping inverses every 10, rank-128 input factor for the
  3136 -> 512 layer; with and without ``kfac_async``.

``--only`` restricts the ACKTR rows (e.g. ``--only "fresh async"``). The async rows need a second core: the
main thread runs with one torch thread, the decomposition worker beside it.
"""

import argparse
import functools
import json
from typing import Any

import torch as th

# benchmarks/common.py (run as a script, a benchmark has its folder on sys.path)
from common import OURS, RL_ZOO3, ZooEntry, time_in_turn, zoo_entry
from stable_baselines3 import A2C
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv

from sb3_trpo_kfac.acktr import ACKTR

ATARI_ENV = "PongNoFrameskip-v4"

ACKTR_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "fresh": dict(kfac_stats_interval=1, kfac_update=1, kfac_async=False),
        "fresh async": dict(kfac_stats_interval=1, kfac_update=1, kfac_async=True),
        "every 4": dict(kfac_stats_interval=4, kfac_update=4, kfac_async=False),
        "every 8": dict(kfac_stats_interval=8, kfac_update=8, kfac_async=False),
        "every 8 async refine": dict(kfac_stats_interval=8, kfac_update=8, kfac_async=True, kfac_refine=1),
        # the floor of fresh statistics: no decomposition after the first one
        "statistics only": dict(kfac_stats_interval=1, kfac_update=10**9, kfac_async=False),
        # the floor of any cadence: statistics and basis of the first update kept (the K-FAC step alone)
        "fixed": dict(kfac_stats_interval=10**9, kfac_update=10**9, kfac_async=False),
    },
    "cnn": {
        "amortized": dict(kfac_update=10, kfac_stats_interval=10, kfac_inverse="inverse", kfac_low_rank=128, kfac_async=False),
        "amortized async": dict(
            kfac_update=10, kfac_stats_interval=10, kfac_inverse="inverse", kfac_low_rank=128, kfac_async=True
        ),
    },
}


def make_env(case: str, seed: int, n_envs: int | None = None):
    if case == "mlp":
        return make_vec_env("CartPole-v1", n_envs=n_envs or 8, seed=seed)
    return make_vec_env(
        lambda: FakeImageEnv(screen_height=84, screen_width=84, n_channels=4), n_envs=n_envs or 16, seed=seed
    )


def learn_updates(model: BaseAlgorithm, updates: int) -> None:
    """Run ``updates`` more rollouts + updates."""
    model.learn(updates * model.n_steps * model.n_envs, reset_num_timesteps=False)  # type: ignore[attr-defined]


def time_models(models: dict[str, BaseAlgorithm], updates: dict[str, int], rounds: int) -> dict[str, list[float]]:
    """After a warm-up, the seconds of ``updates[name]`` updates of each model, timed in turn, per round."""
    runs = {name: functools.partial(learn_updates, model, updates[name]) for name, model in models.items()}
    # warm-up: allocations, first decompositions, and whole cycles of the amortized settings
    warm_up = {
        name: functools.partial(learn_updates, model, max(2 * updates[name], 11)) for name, model in models.items()
    }
    return time_in_turn(runs, rounds, warm_up=warm_up)


def print_ratio(label: str, a2c_times: list[float], acktr_times: list[float], steps: int, settings: str) -> None:
    """Time per environment step of both over ``steps`` steps each: ratio of totals and median per-round ratio."""
    per_round = sorted(t / t_a2c for t, t_a2c in zip(acktr_times, a2c_times))
    print(
        f"{label}: A2C {sum(a2c_times) / steps * 1e3:.3f} ms/step, ACKTR {sum(acktr_times) / steps * 1e3:.3f} ms/step, "
        f"ratio {sum(acktr_times) / sum(a2c_times):.3f} (median of {len(per_round)} rounds "
        f"{per_round[len(per_round) // 2]:.3f})  {settings}",
        flush=True,
    )


def time_same_steps(label: str, models: dict[str, BaseAlgorithm], block_updates: int, rounds: int) -> None:
    """
    Time per environment step of every model against "A2C" (the first), each running the environment steps of
    ``block_updates`` updates of the model with the most steps per update, per round.
    """
    steps_per_update = {name: model.n_steps * model.n_envs for name, model in models.items()}  # type: ignore[attr-defined]
    block_steps = block_updates * max(steps_per_update.values())
    if any(block_steps % steps for steps in steps_per_update.values()):
        raise ValueError(f"{label}: the models' steps per update do not divide {block_steps}")
    times = time_models(models, {name: block_steps // steps for name, steps in steps_per_update.items()}, rounds)
    for name, model in models.items():
        if name != "A2C":
            settings = f"n_envs {model.n_envs} x n_steps {model.n_steps}"  # type: ignore[attr-defined]
            print_ratio(f"{label} {name}", times["A2C"], times[name], rounds * block_steps, settings)


def time_defaults(rounds: int, block: int) -> None:
    """The "defaults" case: ``ACKTR(policy, env)`` against ``A2C(policy, env)``, MLP and CNN with 8 envs."""
    for case, policy in (("mlp", "MlpPolicy"), ("cnn", "CnnPolicy")):
        models: dict[str, BaseAlgorithm] = {
            "A2C": A2C(policy, make_env(case, 0, 8), seed=0, device="cpu"),
            "ACKTR n_steps 5": ACKTR(policy, make_env(case, 0, 8), n_steps=5, seed=0, device="cpu"),
            "ACKTR (own n_steps 20)": ACKTR(policy, make_env(case, 0, 8), seed=0, device="cpu"),
        }
        if case == "cnn":  # what the background decompositions would save at n_steps 5 (not a default)
            models["ACKTR n_steps 5, kfac_async"] = ACKTR(
                policy, make_env(case, 0, 8), n_steps=5, kfac_async=True, seed=0, device="cpu"
            )
        time_same_steps(f"defaults {case}", models, block, rounds)


def atari_entries() -> dict[str, ZooEntry]:
    """The two shipped ``atari`` entries on Pong, each as its zoo command runs it."""
    return {
        "A2C": zoo_entry("a2c", ATARI_ENV, RL_ZOO3, entry_name="atari"),
        "ACKTR": zoo_entry("acktr", ATARI_ENV, OURS, entry_name="atari"),
    }


def time_atari(rounds: int, block: int) -> None:
    """The "atari" case: ``block`` ACKTR updates per round, A2C running as many environment steps."""
    classes = {"A2C": A2C, "ACKTR": ACKTR}
    models: dict[str, BaseAlgorithm] = {
        name: classes[name](entry.policy, entry.make_env(0), seed=0, device="cpu", **entry.kwargs)
        for name, entry in atari_entries().items()
    }
    time_same_steps("atari", models, block, rounds)


def entries() -> dict[str, ZooEntry]:
    """The CartPole-v1 entries of the "entries" case, each as its zoo command runs it."""
    return {"A2C": zoo_entry("a2c", "CartPole-v1", RL_ZOO3), "ACKTR": zoo_entry("acktr", "CartPole-v1", OURS)}


def time_entries(rounds: int, block: int) -> None:
    """The "entries" case: ``block`` ACKTR updates per model and round, A2C running as many environment steps."""
    classes = {"A2C": A2C, "ACKTR": ACKTR}
    models: dict[str, BaseAlgorithm] = {
        name: classes[name](entry.policy, entry.make_env(0), seed=0, device="cpu", **entry.kwargs)
        for name, entry in entries().items()
    }
    steps_per_update = {name: model.n_steps * model.n_envs for name, model in models.items()}  # type: ignore[attr-defined]
    block_steps = block * steps_per_update["ACKTR"]
    if block_steps % steps_per_update["A2C"]:
        raise ValueError("--block-mlp: A2C cannot run as many steps as that many ACKTR updates")
    times = time_models(models, {name: block_steps // steps for name, steps in steps_per_update.items()}, rounds)
    settings = ", ".join(f"{name} entry {entry.settings}" for name, entry in entries().items())
    print_ratio("entries", times["A2C"], times["ACKTR"], rounds * block_steps, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds-mlp", type=int, default=100)
    parser.add_argument("--rounds-cnn", type=int, default=30)
    parser.add_argument(
        "--block-mlp", type=int, default=8, help="updates per model and round, MLP case (entries: ACKTR's updates)"
    )
    parser.add_argument("--block-cnn", type=int, default=10, help="updates per model and round, CNN case")
    parser.add_argument("--rounds-defaults", type=int, default=10)
    parser.add_argument(
        "--block-defaults", type=int, default=10, help="defaults case: ACKTR updates at n_steps 20 per round"
    )
    parser.add_argument("--rounds-atari", type=int, default=5)
    parser.add_argument("--block-atari", type=int, default=10, help="atari case: ACKTR updates per round")
    parser.add_argument(
        "--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "entries", "defaults", "atari"]
    )
    parser.add_argument("--only", nargs="+", default=None, help="ACKTR rows to time (default: all of the case)")
    parser.add_argument("--dry-run", action="store_true", help="print the settings of every model to time, run nothing")
    args = parser.parse_args()
    th.set_num_threads(1)

    if args.dry_run:
        for case in args.cases:
            if case in ("entries", "atari"):
                for name, entry in (entries() if case == "entries" else atari_entries()).items():
                    print(entry.describe(case=case, model=name))
                continue
            if case == "defaults":
                print(json.dumps(dict(case=case, models=["A2C()", "ACKTR(n_steps=5)", "ACKTR()"], n_envs=8)))
                continue
            rows = {
                label: kwargs for label, kwargs in ACKTR_KWARGS[case].items() if args.only is None or label in args.only
            }
            for label, kwargs in {"A2C": {}, **rows}.items():
                print(json.dumps(dict(case=case, model=label, kwargs=dict(kwargs, n_steps=5)), sort_keys=True))
        return
    for case in args.cases:
        if case == "entries":
            time_entries(args.rounds_mlp, args.block_mlp)
            continue
        if case == "defaults":
            time_defaults(args.rounds_defaults, args.block_defaults)
            continue
        if case == "atari":
            time_atari(args.rounds_atari, args.block_atari)
            continue
        policy = "MlpPolicy" if case == "mlp" else "CnnPolicy"
        block = args.block_mlp if case == "mlp" else args.block_cnn
        rounds = args.rounds_mlp if case == "mlp" else args.rounds_cnn
        a2c = A2C(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu")
        acktrs = {
            label: ACKTR(policy, make_env(case, 0), n_steps=5, seed=0, device="cpu", **kwargs)
            for label, kwargs in ACKTR_KWARGS[case].items()
            if args.only is None or label in args.only
        }
        models: dict[str, BaseAlgorithm] = {"A2C": a2c, **acktrs}
        times = time_models(models, {name: block for name in models}, rounds)
        steps = rounds * block * a2c.n_steps * a2c.n_envs
        for label in acktrs:
            print_ratio(f"{case} {label}", times["A2C"], times[label], steps, f"ACKTR settings {ACKTR_KWARGS[case][label]}")


if __name__ == "__main__":
    main()
