import pytest
import torch as th

from sb3_trpo_kfac.common.conjugate_gradient import conjugate_gradient


def random_spd(n: int, condition: float, seed: int = 0) -> th.Tensor:
    generator = th.Generator().manual_seed(seed)
    q, _ = th.linalg.qr(th.randn(n, n, dtype=th.float64, generator=generator))
    eigenvalues = th.exp(
        th.linspace(0.0, float(th.log(th.tensor(condition))), n, dtype=th.float64)
    )
    return q @ th.diag(eigenvalues) @ q.T


def test_solves_spd_system() -> None:
    a = random_spd(30, condition=50.0)
    b = th.randn(30, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=200, relative_tol=1e-12)
    expected = th.linalg.solve(a, b)
    assert th.allclose(result.solution, expected, rtol=1e-8, atol=1e-10)
    # A x is accumulated from the products already taken.
    assert th.allclose(result.matrix_solution, a @ result.solution, rtol=1e-8, atol=1e-10)
    assert result.relative_residual < 1e-10
    assert result.iterations <= 60


def test_exact_in_n_steps_and_stops_early() -> None:
    a = random_spd(8, condition=10.0, seed=3)
    b = th.randn(8, dtype=th.float64)
    result = conjugate_gradient(lambda v: a @ v, b, max_iter=8, relative_tol=0.0)
    assert th.allclose(a @ result.solution, b, atol=1e-8)
    assert result.iterations == 8
    converged = conjugate_gradient(lambda v: a @ v, a @ th.ones(8, dtype=th.float64), max_iter=50, relative_tol=1e-10)
    assert converged.iterations <= 9


def test_preconditioner_reduces_iterations() -> None:
    # Badly scaled diagonal plus a small coupling: Jacobi preconditioning should need far fewer steps.
    generator = th.Generator().manual_seed(1)
    scales = th.exp(th.linspace(0.0, 8.0, 40, dtype=th.float64))
    coupling = 0.05 * random_spd(40, condition=2.0, seed=2)
    a = th.diag(scales) + coupling
    b = th.randn(40, dtype=th.float64, generator=generator)
    plain = conjugate_gradient(lambda v: a @ v, b, max_iter=500, relative_tol=1e-8)
    diagonal = th.diagonal(a)
    preconditioned = conjugate_gradient(
        lambda v: a @ v, b, max_iter=500, relative_tol=1e-8, preconditioner=lambda r: r / diagonal
    )
    assert th.allclose(preconditioned.solution, th.linalg.solve(a, b), rtol=1e-6)
    assert preconditioned.iterations < plain.iterations / 2


def test_zero_right_hand_side() -> None:
    result = conjugate_gradient(lambda v: 2.0 * v, th.zeros(5), max_iter=10)
    assert result.iterations == 0
    assert th.count_nonzero(result.solution) == 0


def test_stopping_test_is_relative_to_the_right_hand_side() -> None:
    # Scaling b scales the solution and changes nothing else: a gradient of norm 1.5e-8 gets the same solve as one
    # of norm 1024 (an absolute test on ‖r‖² ends the first at 0 iterations). Powers of two scale exactly.
    a = random_spd(20, condition=100.0, seed=4)
    b = th.randn(20, dtype=th.float64, generator=th.Generator().manual_seed(5))
    b = b / b.norm()
    reference = conjugate_gradient(lambda v: a @ v, b, max_iter=100)
    assert 0 < reference.iterations < 100 and reference.relative_residual <= 1e-5
    for scale in (2.0**-26, 2.0**10):
        scaled = conjugate_gradient(lambda v: a @ v, scale * b, max_iter=100)
        assert scaled.iterations == reference.iterations, scale
        assert th.equal(scaled.solution, scale * reference.solution), scale
        assert scaled.relative_residual == pytest.approx(reference.relative_residual, rel=1e-12)


def test_negative_tolerance_is_rejected() -> None:
    with pytest.raises(ValueError, match="relative_tol"):
        conjugate_gradient(lambda v: v, th.ones(3), max_iter=3, relative_tol=-1.0)
