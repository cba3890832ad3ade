"""Background curvature updates (kfac_async): one update late, deterministic, on a snapshot, failures in the caller."""

import copy
import io
import threading

import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.kfac import KFAC

from .conftest import curvature, decompositions, factors, fit_statistics, mlp, sample_loss, train_steps


@pytest.mark.parametrize("inverse", ["eigen", "inverse"])
def test_async_decomposition_equals_synchronous_one_update_late(inverse):
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_inverse=inverse, kfac_async=True)
    train_steps(model, opt, 1, seed=0)  # the first decomposition is synchronous
    assert not opt.preconditioner.background.pending and opt.counters["curvature_updates"] == 1
    first = decompositions(opt)
    train_steps(model, opt, 1, seed=1)
    # the second step used the first basis and started decomposing a snapshot of the new factors
    assert opt.preconditioner.background.pending and opt.counters["curvature_updates"] == 1
    assert all(th.equal(a, b) for a, b in zip(first, decompositions(opt)))
    snapshot = [t.clone() for layer in (model[0], model[2]) for t in factors(opt, layer)]
    opt.preconditioner.join_decomposition()
    assert opt.counters["curvature_updates"] == 2 and opt.counters["stats_at_curvature"] == 2
    background = decompositions(opt)
    assert not all(th.equal(a, b) for a, b in zip(first, background))
    # a synchronous decomposition of the same factors gives the same result
    opt.update_curvature()
    assert all(
        th.equal(a, b) for a, b in zip(snapshot, (t for layer in (model[0], model[2]) for t in factors(opt, layer)))
    )
    for a, b in zip(background, decompositions(opt)):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_async_snapshot_is_not_affected_by_later_statistics():
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_async=True)
    train_steps(model, opt, 2, seed=0)  # a job on the factors after 2 statistics updates is pending
    snapshot = [tuple(t.clone() for t in factors(opt, layer)) for layer in (model[0], model[2])]
    fit_statistics(model, opt, batches=2)  # in-place updates of the live factors
    opt.preconditioner.join_decomposition()
    for layer, (a, g) in zip((model[0], model[2]), snapshot):
        d_g, _ = th.linalg.eigh(g)
        rep = curvature(opt, layer)
        # Q diag(d) Qᵀ reproduces the snapshot, not the updated factors (eigenvalues clamped at 1e-6 only)
        th.testing.assert_close(rep.a.vectors @ th.diag(rep.a.values) @ rep.a.vectors.T, a, atol=1e-6, rtol=0)
        th.testing.assert_close(rep.g.vectors @ th.diag(rep.g.values) @ rep.g.vectors.T, g, atol=1e-6, rtol=0)
        th.testing.assert_close(rep.g.values, th.where(d_g < 1e-6, 0.0, d_g))
        assert not th.allclose(
            rep.a.vectors @ th.diag(rep.a.values) @ rep.a.vectors.T, factors(opt, layer)[0], atol=1e-6
        )
    assert opt.counters["stats_at_curvature"] == 2 and opt.counters["stats_updates"] == 4


def test_async_is_deterministic_and_state_dict_during_pending_job():
    models = [mlp() for _ in range(3)]
    opts = [KFAC(m, lr=0.1, kfac_update=1, kfac_async=True) for m in models]
    for model, opt in zip(models, opts):
        train_steps(model, opt, 4, seed=0)
    assert all(opt.preconditioner.background.pending for opt in opts)
    # determinism: same data, same result
    assert all(th.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))

    # save while a job is pending: state_dict() joins it; load into an optimizer that has its own pending job
    buffer = io.BytesIO()
    th.save(opts[0].state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(models[0])
    opt_clone = KFAC(clone, lr=0.1, kfac_async=True)
    train_steps(clone, opt_clone, 3, seed=5)
    assert opt_clone.preconditioner.background.pending
    opt_clone.load_state_dict(th.load(buffer, weights_only=False))
    assert not opt_clone.preconditioner.background.pending and opt_clone.counters == opts[0].counters
    with th.no_grad():
        for p, q in zip(models[0].parameters(), clone.parameters()):
            q.copy_(p)

    # continuations: after save, after load, and uninterrupted (no state_dict call) all agree
    for model, opt in ((models[0], opts[0]), (clone, opt_clone), (models[1], opts[1])):
        train_steps(model, opt, 4, seed=1)
    for p, q, r in zip(models[0].parameters(), clone.parameters(), models[1].parameters()):
        assert th.equal(p, q) and th.equal(p, r)


def test_async_decomposition_failure_is_reported_in_the_caller(monkeypatch):
    model = mlp()
    opt = KFAC(model, lr=0.1, kfac_async=True)
    train_steps(model, opt, 1, seed=0)
    basis = curvature(opt, model[0]).a.vectors.clone()

    def broken_eigh(*args, **kwargs):
        raise th.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(th.linalg, "eigh", broken_eigh)
    train_steps(model, opt, 1, seed=1)  # submits the (failing) job
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.preconditioner.join_decomposition()
    assert opt.counters["decomposition_failures"] == 4
    assert th.equal(curvature(opt, model[0]).a.vectors, basis)


def test_async_worker_only_runs_one_batched_eigh_per_factor_size(monkeypatch):
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()  # A: 5x5 twice, G: 4x4 twice
    opt = KFAC(model, lr=0.1, kfac_update=1, kfac_async=True)
    original, calls = th.linalg.eigh, []

    def recording_eigh(mat, *args, **kwargs):
        calls.append((threading.current_thread() is threading.main_thread(), tuple(mat.shape)))
        return original(mat, *args, **kwargs)

    monkeypatch.setattr(th.linalg, "eigh", recording_eigh)
    gen = th.Generator().manual_seed(0)
    for step in range(3):
        with opt.collect():
            out = model(th.randn(16, 4, dtype=th.float64, generator=gen))
        opt.update_statistics(sample_loss(out, th.randn(16, 4, dtype=th.float64, generator=gen)))
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()
        opt.preconditioner.join_decomposition()
        in_main = sorted(shape for main, shape in calls if main)
        in_worker = sorted(shape for main, shape in calls if not main)
        # the first decomposition is synchronous, the next ones run in the worker: one call per factor size
        batched = [(2, 4, 4), (2, 5, 5)]
        assert (in_main, in_worker) == ((batched, []) if step == 0 else ([], batched))
        calls.clear()


def test_async_bad_argument():
    with pytest.raises(TypeError, match="kfac_async"):
        KFAC(mlp(), kfac_async="yes")  # type: ignore[arg-type]
