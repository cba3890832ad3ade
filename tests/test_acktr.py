"""ACKTR: every action space and policy kind, save/load continuation, bad arguments, robustness.

Learning: tests/test_learning.py.
"""


import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)

from sb3_trpo_kfac import ACKTR, KFAC
from sb3_trpo_kfac.common.kfac import Conv2dBlock

TINY = dict(net_arch=dict(pi=[16], vf=[16]))


@pytest.mark.parametrize(
    "env_fn",
    [
        lambda: IdentityEnv(4),
        lambda: IdentityEnvBox(eps=0.5),
        lambda: IdentityEnvMultiDiscrete(3),
        lambda: IdentityEnvMultiBinary(3),
    ],
    ids=["Discrete", "Box", "MultiDiscrete", "MultiBinary"],
)
def test_action_spaces_run(env_fn):
    model = ACKTR("MlpPolicy", env_fn(), n_steps=8, policy_kwargs=TINY, seed=0, device="cpu")
    model.learn(256)
    optimizer = model.policy.optimizer
    assert isinstance(optimizer, KFAC)
    assert optimizer.counters["updates"] == 256 // 8
    # the default cadence: statistics at updates 0, 10, 20, 30
    assert optimizer.counters["stats_updates"] == len(range(0, 256 // 8, model.kfac_stats_interval)) == 4
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    # every Linear of the policy is a K-FAC block with statistics
    assert len(optimizer.blocks) == 4
    assert all(optimizer.preconditioner.curvature[block].ready for block in optimizer.blocks)


@pytest.mark.parametrize("share", [True, False])
def test_cnn_policy_shared_and_separate_extractors(share):
    env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    policy_kwargs = dict(share_features_extractor=share, features_extractor_kwargs=dict(features_dim=16), net_arch=[])
    model = ACKTR("CnnPolicy", env, n_steps=4, policy_kwargs=policy_kwargs, seed=0, device="cpu", kfac_update=2)
    model.learn(16)
    optimizer = model.policy.optimizer
    n_convs = sum(isinstance(block, Conv2dBlock) for block in optimizer.blocks)
    assert n_convs == (3 if share else 6)
    assert all(optimizer.preconditioner.curvature[block].ready for block in optimizer.blocks)


@pytest.mark.parametrize("share", [True, False])
def test_critic_trust_region_with_cnn_extractors(share):
    env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, discrete=True)
    policy_kwargs = dict(share_features_extractor=share, features_extractor_kwargs=dict(features_dim=16), net_arch=[])
    model = ACKTR(
        "CnnPolicy", env, n_steps=4, vf_kfac_clip=0.1, n_critic_updates=3, policy_kwargs=policy_kwargs, seed=0, device="cpu"
    )
    policy = model.policy
    critic = [*policy.value_net.parameters(), *([] if share else policy.vf_features_extractor.parameters())]
    # a shared extractor belongs to the actor's trust region; a separate one to the critic's
    assert {id(p) for p in model.policy.optimizer.param_groups[1]["params"]} == {id(p) for p in critic}
    shared_before = [p.detach().clone() for p in policy.pi_features_extractor.parameters()]
    model.learn(4)
    assert model.policy.optimizer.counters["extra_steps"] == 2
    assert all(th.isfinite(p).all() for p in policy.parameters())
    assert any(not th.equal(p, q) for p, q in zip(shared_before, policy.pi_features_extractor.parameters()))


def test_multi_input_policy():
    # the image key goes through a NatureCNN whose 1025-dim input factor uses the low-rank solve
    policy_kwargs = dict(TINY, features_extractor_kwargs=dict(cnn_output_dim=8))
    env = SimpleMultiObsEnv(random_start=False)
    model = ACKTR(
        "MultiInputPolicy", env, n_steps=8, kfac_update=2, kfac_low_rank=16, policy_kwargs=policy_kwargs, seed=0, device="cpu"
    )
    model.learn(48)
    optimizer = model.policy.optimizer
    assert len(optimizer.blocks) == 8
    linear = next(block for block in optimizer.blocks if block.name.endswith("img.linear.0"))
    assert optimizer.preconditioner.curvature[linear].a.vectors.shape == (1025, 16)
    assert np.isfinite(model.logger.name_to_value["train/kfac_nu"])


def test_gsde_and_learning_rate_schedule():
    def schedule(progress_remaining: float) -> float:
        return 0.1 * progress_remaining

    env = IdentityEnvBox(eps=0.5)
    model = ACKTR("MlpPolicy", env, n_steps=8, use_sde=True, learning_rate=schedule, policy_kwargs=TINY, seed=0, device="cpu")
    model.learn(128)
    # the learning-rate schedule reaches the K-FAC optimizer (used in its step and trust region)
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(schedule(model._current_progress_remaining))
    assert model.policy.optimizer.param_groups[0]["lr"] < 0.1
    assert model.logger.name_to_value["train/learning_rate"] < 0.1


def _state_tensors(model: ACKTR) -> list[th.Tensor]:
    state = model.policy.optimizer.state_dict()["state"]  # momentum buffers, factors and decompositions
    return [t for index in sorted(state) for t in state[index].values()]


@pytest.mark.parametrize(
    "kfac_async, extra_kwargs",
    [(False, {}), (True, {}), (False, dict(vf_kfac_clip=0.01, n_critic_updates=3)), (True, dict(kfac_refine=2))],
)
def test_save_load_learn_matches_uninterrupted(tmp_path, kfac_async, extra_kwargs):
    def make_env():
        return make_vec_env("CartPole-v1", n_envs=2, seed=0)

    kwargs = dict(n_steps=8, kfac_update=3, kfac_async=kfac_async, policy_kwargs=TINY, seed=0, device="cpu")
    kwargs.update(extra_kwargs)
    model = ACKTR("MlpPolicy", make_env(), **kwargs)
    model.learn(160)
    model.save(tmp_path / "acktr")

    loaded = ACKTR.load(tmp_path / "acktr", env=make_env(), device="cpu")
    assert loaded.policy.optimizer.counters == model.policy.optimizer.counters
    assert all(th.equal(a, b) for a, b in zip(_state_tensors(model), _state_tensors(loaded)))
    assert len(_state_tensors(loaded)) > 0
    assert loaded.kfac_async == kfac_async and loaded.policy.optimizer.preconditioner.kfac_async == kfac_async
    assert loaded.policy.optimizer.preconditioner.kfac_refine == extra_kwargs.get("kfac_refine", 0)
    for ours, theirs in zip(loaded.policy.optimizer.param_groups, model.policy.optimizer.param_groups, strict=True):
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
        assert len(ours["params"]) == len(theirs["params"])

    # A fresh optimizer state for contrast: the continuation must depend on the carried K-FAC state.
    fresh = ACKTR.load(tmp_path / "acktr", env=make_env(), device="cpu")
    fresh.policy.optimizer = KFAC(fresh.policy, lr=fresh.learning_rate, kfac_update=3)

    for m in (model, loaded, fresh):
        m.set_random_seed(1)
        m.learn(160)
    for p, q, _r in zip(model.policy.parameters(), loaded.policy.parameters(), fresh.policy.parameters()):
        assert th.equal(p, q)
    assert any(not th.equal(p, r) for p, r in zip(model.policy.parameters(), fresh.policy.parameters()))


def _record_joint_steps(optimizer: KFAC, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """
    Wrap ``optimizer.step`` to record, per step, what it was given (gradients, parameters, momentum buffers, learning
    rates) and what it did (parameters after; factors and decompositions it solved with).
    """
    records = []
    original = optimizer.step

    def recording_step(*args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        record = {
            "grads": {p: p.grad.detach().clone() for p in params},
            "before": {p: p.detach().clone() for p in params},
            "momentum": {p: optimizer.state[p].get("momentum_buffer", th.zeros_like(p)).clone() for p in params},
            "lr": [group["lr"] for group in optimizer.param_groups],
        }
        result = original(*args, **kwargs)
        record["after"] = {p: p.detach().clone() for p in params}
        entries = optimizer.preconditioner.state_entries()
        record["state"] = {b: {k: v.clone() for k, v in state.items()} for b, state in entries}
        records.append(record)
        return result

    monkeypatch.setattr(optimizer, "step", recording_step)
    return records


def _group_layout(optimizer: KFAC, index: int) -> tuple[list, list[th.nn.Parameter]]:
    """The blocks of a parameter group and its parameters outside blocks (raw gradient: identity curvature)."""
    blocks = [block for block in optimizer.blocks if optimizer.preconditioner.block_groups[block] == index]
    covered = {id(p) for block in blocks for p in block.params}
    return blocks, [p for p in optimizer.param_groups[index]["params"] if id(p) not in covered]


def _block_matrix(block, tensors: dict) -> th.Tensor:
    """``W̄ = [W, b]`` of a block from per-parameter tensors, float64."""
    parts = [tensors[block.weight].reshape(block.weight.shape[0], -1)]
    if block.bias is not None:
        parts.append(tensors[block.bias].reshape(-1, 1))
    return th.cat(parts, dim=1).double()


def _dense_update_check(optimizer: KFAC, record: dict, index: int, refine_iterations: int = 0) -> float:
    """
    Check one group's applied update against the dense float64 K-FAC Fisher ``F̂ = blockdiag(G ⊗ A + λI, I)`` built
    from the optimizer's factors: ``Δθ = −lr (1 − m) (m buf + ν V)`` with ``V = F̂⁻¹ ∇`` (or, with refinement, the
    iterate of preconditioned CG from zero whose preconditioner is the block's decomposition) and
    ``ν = min(1, sqrt(κ / (lr² Vᵀ∇)))``; and the trust region on the applied direction: ``lr² (νV)ᵀ F̂ (νV) =
    min(κ, lr² Vᵀ∇)``.

    :return: ``lr² (νV)ᵀ F̂ (νV)`` measured on the applied update
    """
    group = optimizer.param_groups[index]
    lr, momentum, kfac_clip = record["lr"][index], group["momentum"], group["kfac_clip"]
    damping = optimizer.preconditioner.kfac_damping
    blocks, raw = _group_layout(optimizer, index)
    fishers, directions, grads = [], [], []
    for block in blocks:
        state = record["state"][block]
        a, g = state["A"].double(), state["G"].double()
        fisher = th.kron(g, a) + damping * th.eye(a.shape[0] * g.shape[0], dtype=th.float64)
        grad = _block_matrix(block, record["grads"]).flatten()
        if refine_iterations == 0:
            direction = th.linalg.solve(fisher, grad)
        else:  # the decomposition's solve: Q (Λ_G ⊗ Λ_A + λ)⁻¹ Qᵀ, Q = Q_G ⊗ Q_A
            basis = th.kron(state["QG"].double(), state["QA"].double())
            scale = 1.0 / (th.kron(state["dG"].double(), state["dA"].double()) + damping)
            direction, residual = th.zeros_like(grad), grad
            z = basis @ (scale * (basis.T @ residual))
            search, r_dot_z = z, residual @ z
            for _ in range(refine_iterations):
                product = fisher @ search
                alpha = r_dot_z / (search @ product)
                direction = direction + alpha * search
                residual = residual - alpha * product
                z = basis @ (scale * (basis.T @ residual))
                search, r_dot_z = z + (residual @ z) / r_dot_z * search, residual @ z
        fishers.append(fisher)
        directions.append(direction)
        grads.append(grad)
    for p in raw:
        grads.append(record["grads"][p].double().flatten())
        directions.append(grads[-1])
        fishers.append(th.eye(p.numel(), dtype=th.float64))
    fisher, direction, grad = th.block_diag(*fishers), th.cat(directions), th.cat(grads)

    def flat(tensors: dict) -> th.Tensor:
        return th.cat([_block_matrix(b, tensors).flatten() for b in blocks] + [tensors[p].double().flatten() for p in raw])

    applied, buffer = flat(record["after"]) - flat(record["before"]), flat(record["momentum"])
    v_grad = float(direction @ grad)
    nu = min(1.0, (kfac_clip / (lr**2 * v_grad)) ** 0.5)
    expected = -lr * (1 - momentum) * (momentum * buffer + nu * direction)
    # the step is computed in float32: compare in norm (a wrong scale of the direction is off by its factor)
    assert float((applied - expected).norm()) <= 1e-4 * float(expected.norm())
    # the applied direction without momentum, ν V, and its quadratic KL in the dense F̂
    scaled = -applied / (lr * (1 - momentum)) - momentum * buffer
    quadratic = lr**2 * float(scaled @ fisher @ scaled)
    assert quadratic == pytest.approx(min(kfac_clip, lr**2 * v_grad), rel=1e-4)
    return quadratic


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vf_kfac_clip_gives_the_critic_its_own_trust_region(monkeypatch, momentum):
    model = ACKTR(
        "MlpPolicy", IdentityEnvBox(eps=0.5), n_steps=8, kfac_clip=0.001, vf_kfac_clip=0.5, momentum=momentum,
        policy_kwargs=TINY, seed=0, device="cpu",
    )
    policy, optimizer = model.policy, model.policy.optimizer
    actor, critic = optimizer.param_groups
    critic_ids = {id(p) for p in [*policy.value_net.parameters(), *policy.mlp_extractor.value_net.parameters()]}
    assert {id(p) for p in critic["params"]} == critic_ids
    assert len(actor["params"]) + len(critic["params"]) == len(list(policy.parameters()))
    assert (actor["kfac_clip"], critic["kfac_clip"]) == (0.001, 0.5)
    records = _record_joint_steps(optimizer, monkeypatch)
    model.learn(8 * 5)
    assert len(records) == 5
    # every applied update is the dense natural-gradient step, each group inside its own trust region
    quadratics = [[_dense_update_check(optimizer, record, index) for index in (0, 1)] for record in records][-1]
    logged = model.logger.name_to_value
    # the logged quadratic KL is that of the last update's direction ν V, before momentum
    assert logged["train/kfac_quadratic_kl"] == pytest.approx(quadratics[0], rel=1e-4)
    assert logged["train/vf_kfac_quadratic_kl"] == pytest.approx(quadratics[1], rel=1e-4)
    assert logged["train/vf_kfac_nu"] == optimizer.last_nu[1] and logged["train/kfac_nu"] == optimizer.last_nu[0]
    assert optimizer.last_nu[0] < 1.0, "the actor's small radius should bind"
    assert quadratics[0] == pytest.approx(0.001, rel=1e-4)


def test_refined_steps_keep_each_trust_region(monkeypatch):
    model = ACKTR(
        "MlpPolicy", IdentityEnvBox(eps=0.5), n_steps=8, kfac_clip=0.001, vf_kfac_clip=0.5, kfac_update=100,
        kfac_stats_interval=1, kfac_refine=2, policy_kwargs=TINY, seed=0, device="cpu",
    )
    optimizer = model.policy.optimizer
    refined, solver = [], optimizer.preconditioner.solver
    original = solver.refine
    monkeypatch.setattr(solver, "refine", lambda *args: refined.append(1) or original(*args))
    records = _record_joint_steps(optimizer, monkeypatch)
    model.learn(8 * 5)
    assert refined and optimizer.counters["curvature_updates"] == 1  # updates 2-5 solve the newer factors by CG
    # each applied update is the CG iterate on the current factors (preconditioned by the first decomposition),
    # scaled into its group's trust region: CG keeps Vᵀ F̂ V = Vᵀ∇, so the quadratic KL is still min(κ, lr² Vᵀ∇)
    for record in records[1:]:
        for index in (0, 1):
            _dense_update_check(optimizer, record, index, refine_iterations=2)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_extra_critic_steps_fit_the_value_and_leave_the_actor():
    def run(n_critic_updates: int) -> ACKTR:
        env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
        model = ACKTR("MlpPolicy", env, n_steps=16, vf_kfac_clip=0.01, n_critic_updates=n_critic_updates, seed=0, device="cpu")
        return model.learn(16 * 2)  # one update

    def value_loss(model: ACKTR) -> float:
        data = next(model.rollout_buffer.get(batch_size=None))
        with th.no_grad():
            return float(th.nn.functional.mse_loss(data.returns, model.policy.predict_values(data.observations).flatten()))

    single, extra = run(1), run(6)
    assert extra.policy.optimizer.counters["extra_steps"] == 5
    assert extra.logger.name_to_value["train/kfac_nu"] < 1.0, "the joint step's ν, not that of a critic-only step"
    assert extra.policy.optimizer.counters["steps"] == extra.policy.optimizer.counters["updates"] == 1
    critic_ids = {id(p) for p in extra._critic_params}
    for (name, p), q in zip(extra.policy.named_parameters(), single.policy.parameters()):
        assert th.equal(p, q) != (id(p) in critic_ids), name  # only the critic moved further
    assert value_loss(extra) < value_loss(single)


def test_async_decomposition_is_deterministic_and_learns_like_sync_at_first():
    def run(kfac_async: bool, seed: int = 0) -> ACKTR:
        env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
        model = ACKTR(
            "MlpPolicy", env, n_steps=8, kfac_async=kfac_async, kfac_stats_interval=1, kfac_update=1,
            policy_kwargs=TINY, seed=seed, device="cpu",
        )  # fmt: skip
        return model.learn(8 * 2 * 6)

    first, second, sync = run(True), run(True), run(False)
    assert all(th.equal(p, q) for p, q in zip(first.policy.parameters(), second.policy.parameters()))
    # same statistics, but from the second update on the bases are one update older
    assert first.policy.optimizer.counters["stats_updates"] == sync.policy.optimizer.counters["stats_updates"] == 6
    assert any(not th.equal(p, q) for p, q in zip(first.policy.parameters(), sync.policy.parameters()))


def test_no_grad_rollouts_do_not_touch_statistics():
    model = ACKTR("MlpPolicy", IdentityEnv(3), n_steps=8, policy_kwargs=TINY, seed=0, device="cpu")
    model.learn(8)
    optimizer = model.policy.optimizer
    factors = optimizer.preconditioner.statistics.factors
    snapshot = {block.name: factors[block].a.clone() for block in optimizer.blocks}
    obs = np.array([model.observation_space.sample() for _ in range(5)])
    model.predict(obs)  # no_grad rollout-style forward
    model.policy.evaluate_actions(th.as_tensor(obs).float(), th.zeros(5))  # with grad, outside collect()
    assert optimizer.counters["stats_updates"] == 1
    assert all(th.equal(factors[block].a, snapshot[block.name]) for block in optimizer.blocks)
    # the rollout's forwards take the hook-free call path: K-FAC's hooks exist only inside collect()
    assert all(not module._forward_hooks for module in model.policy.modules())


def test_non_finite_loss_never_reaches_parameters():
    model = ACKTR("MlpPolicy", IdentityEnv(3), n_steps=8, policy_kwargs=TINY, seed=0, device="cpu")
    model.learn(16)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.vf_coef = float("nan")  # poisons the loss and every gradient
    model.max_grad_norm = float("inf")
    model.learn(16, reset_num_timesteps=False)
    assert model.policy.optimizer.counters["skipped_steps"] == 2
    assert model.logger.name_to_value["train/kfac_skipped_steps"] == 2
    assert all(th.equal(p, q) for p, q in zip(before, model.policy.parameters()))


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(use_rms_prop=True), ValueError, "use_rms_prop"),
        (dict(policy_kwargs=dict(optimizer_kwargs=dict(eps=1e-4))), ValueError, "optimizer_kwargs"),
        (dict(learning_rate=0.0), ValueError, "learning_rate"),
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(kfac_clip=0.0), ValueError, "kfac_clip"),
        (dict(vf_kfac_clip=-0.1), ValueError, "vf_kfac_clip"),
        (dict(n_critic_updates=0), ValueError, "n_critic_updates"),
        (dict(vf_kfac_clip="0.1"), TypeError, "vf_kfac_clip"),
        (dict(kfac_damping=-1.0), ValueError, "kfac_damping"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(kfac_stats_decay=2.0), ValueError, "kfac_stats_decay"),
        (dict(kfac_update=0), ValueError, "kfac_update"),
        (dict(kfac_stats_interval=2.5), TypeError, "kfac_stats_interval"),
        (dict(kfac_inverse="qr"), ValueError, "kfac_inverse"),
        (dict(vf_fisher_coef=-1.0), ValueError, "vf_fisher_coef"),
        (dict(kfac_cold_iter=-2), ValueError, "kfac_cold_iter"),
        (dict(kfac_async=1), TypeError, "kfac_async"),
        (dict(kfac_refine=-1), ValueError, "kfac_refine"),
        (dict(gamma=1.5), ValueError, "gamma"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        ACKTR("MlpPolicy", IdentityEnv(3), device="cpu", **kwargs)


@pytest.mark.parametrize("vf_kfac_clip", [None, 0.1])
def test_load_with_new_trust_region_settings_trains_with_them(tmp_path, vf_kfac_clip):
    # rl-zoo3's `train -i` loads with the entry's hyperparameters as keywords: the optimizer must use them, not the
    # values saved in its state
    model = ACKTR(
        "MlpPolicy", IdentityEnv(3), n_steps=8, kfac_clip=0.02, vf_kfac_clip=vf_kfac_clip, momentum=0.5,
        policy_kwargs=TINY, seed=0, device="cpu",
    )  # fmt: skip
    model.learn(16)
    model.save(tmp_path / "model")
    new = {"kfac_clip": 0.01, "momentum": 0.8} | ({} if vf_kfac_clip is None else {"vf_kfac_clip": 0.3})
    loaded = ACKTR.load(tmp_path / "model", env=IdentityEnv(3), device="cpu", **new)
    groups = loaded.policy.optimizer.param_groups
    assert [group["kfac_clip"] for group in groups] == [0.01] + ([] if vf_kfac_clip is None else [0.3])
    assert all(group["momentum"] == 0.8 for group in groups)
    kept = ACKTR.load(tmp_path / "model", env=IdentityEnv(3), device="cpu")  # nothing given: the saved values
    assert [g["kfac_clip"] for g in kept.policy.optimizer.param_groups] == [0.02] + ([] if vf_kfac_clip is None else [0.1])
    assert all(g["momentum"] == 0.5 for g in kept.policy.optimizer.param_groups)
