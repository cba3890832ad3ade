"""
K-FAC on one-hot inputs (a Discrete observation space: SB3 one-hot encodes it). The input factor's rows and columns
of the states not visited yet are exactly zero; MKL's divide-and-conquer ``eigh`` fails to converge on such matrices
in float32 and in float64 (seeds below: both, on torch's MKL build), which made ACKTR on Taxi-v4 warn that the
eigendecomposition failed and keep a stale basis. The decomposition is shifted by the eigenvalue floor and
succeeds; a warning is kept for real failures, with the factor's size and condition.
"""

import warnings

import pytest
import torch as th
import yaml
from rl_zoo3.utils import SimpleLinearSchedule
from torch.nn import functional as F

from sb3_trpo_kfac.acktr import ACKTR
from sb3_trpo_kfac.common.kfac import EIGENVALUE_FLOOR
from sb3_trpo_kfac.common.kfac.curvature import Eigen
from sb3_trpo_kfac.common.kfac.decomposition import eigen_or_previous
from sb3_trpo_kfac.zoo import hyperparams_path

N_STATES = 500  # Taxi-v4


def one_hot_factor(seed: int, n_visited: int = 35, n_samples: int = 200) -> th.Tensor:
    """A = mean [x, 1][x, 1]ᵀ over one-hot states x drawn from ``n_visited`` of the 500 (float64)."""
    gen = th.Generator().manual_seed(seed)
    visited = th.randperm(N_STATES, generator=gen)[:n_visited]
    states = visited[th.randint(n_visited, (n_samples,), generator=gen)]
    inputs = th.cat([F.one_hot(states, N_STATES).double(), th.ones(n_samples, 1, dtype=th.float64)], dim=1)
    return inputs.T @ inputs / n_samples


def oracle_eigenvalues(mat: th.Tensor) -> th.Tensor:
    """Eigenvalues from the factor's nonzero rows and columns alone (the zero ones give exact zeros), clamped."""
    support = mat.abs().sum(dim=0) > 0
    evals = th.zeros(mat.shape[0], dtype=th.float64)
    evals[: int(support.sum())] = th.linalg.eigvalsh(mat[support][:, support])
    evals = th.where(evals < EIGENVALUE_FLOOR, th.zeros_like(evals), evals)
    return evals.sort().values


@pytest.mark.parametrize("seed", [47, 48, 52])
@pytest.mark.parametrize(("dtype", "tolerance"), [(th.float32, 1e-5), (th.float64, 1e-12)])
def test_factor_with_zero_rows_decomposes(seed, dtype, tolerance):
    mat = one_hot_factor(seed)
    assert int((mat.abs().sum(dim=0) == 0).sum()) >= N_STATES - 35  # states never drawn
    failures: list[str] = []
    result = eigen_or_previous("layer", mat.to(dtype), None, failures)
    assert failures == [] and result is not None
    evals, evecs = result.values.double(), result.vectors.double()
    assert result.values.dtype == dtype  # returned in the factor's dtype
    th.testing.assert_close(evals.sort().values, oracle_eigenvalues(mat), atol=tolerance, rtol=0)
    th.testing.assert_close(evecs.T @ evecs, th.eye(N_STATES + 1, dtype=th.float64), atol=10 * tolerance, rtol=0)
    # eigenvalues below the floor are dropped: the reconstruction is off by at most that much
    th.testing.assert_close(evecs @ th.diag(evals) @ evecs.T, mat, atol=EIGENVALUE_FLOOR + 10 * tolerance, rtol=0)


def test_real_failures_name_the_factor_size_and_condition(monkeypatch):
    previous = Eigen(th.ones(3), th.eye(3))
    failures: list[str] = []
    bad = th.eye(3)
    bad[0, 1] = bad[1, 0] = float("nan")
    assert eigen_or_previous("net.0", bad, previous, failures) is previous
    assert failures == [
        "KFAC: eigendecomposition of a factor of net.0 failed (3x3, 2 non-finite entries); keeping the previous basis"
    ]

    def broken_eigh(*args, **kwargs):
        raise th.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(th.linalg, "eigh", broken_eigh)
    failures.clear()
    assert eigen_or_previous("net.0", th.diag(th.tensor([2.0, 0.5, 0.001])), previous, failures) is previous
    assert failures == [
        (
            "KFAC: eigendecomposition of a factor of net.0 failed (3x3, condition number 2e+03, largest singular "
            "value 2); keeping the previous basis"
        )
    ]


def test_acktr_default_entry_on_taxi_decomposes_every_factor():
    """ACKTR with the shipped `default` entry (what the command uses for an env without an entry) on Taxi-v4."""
    with open(hyperparams_path("acktr")) as file:
        entry = yaml.safe_load(file)["default"]
    kwargs = {key: value for key, value in entry.items() if key not in ("n_timesteps", "policy")}
    kwargs["learning_rate"] = SimpleLinearSchedule(kwargs["learning_rate"].split("_")[1])
    model = ACKTR(entry["policy"], "Taxi-v4", seed=0, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(400)  # 20 updates: before the fix, two failed decompositions by then (seed 0)
    optimizer = model.policy.optimizer
    assert [str(w.message) for w in caught if "KFAC" in str(w.message)] == []
    assert optimizer.counters["decomposition_failures"] == 0
    assert optimizer.counters["curvature_updates"] == 20
