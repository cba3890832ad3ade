import pytest
import torch as th
from torch import nn

from sb3_trpo_kfac.common.gradient_clipping import clip_grad_norm_

SHAPES = [(16, 4), (16,), (16, 16), (16,), (1, 16), (1,)]


def twin_parameters(grads: list[th.Tensor | None]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Two parameter lists with equal gradients (None: no gradient)."""
    pairs = []
    for grad in grads:
        shape, dtype = ((1,), th.float32) if grad is None else (grad.shape, grad.dtype)
        first, second = nn.Parameter(th.zeros(shape, dtype=dtype)), nn.Parameter(th.zeros(shape, dtype=dtype))
        first.grad, second.grad = (None, None) if grad is None else (grad.clone(), grad.clone())
        pairs.append((first, second))
    return [a for a, _ in pairs], [b for _, b in pairs]


@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_equals_torch_bit_for_bit(dtype):
    # ACKTR's learning runs are chaotic: a different rounding of the scale would change every run of a seed
    generator = th.Generator().manual_seed(0)
    clipped = 0
    for trial in range(300):
        scale = float(th.rand(1, generator=generator)) * 0.3
        grads = [th.randn(shape, generator=generator, dtype=dtype) * scale for shape in SHAPES]
        ours, torchs = twin_parameters(grads)
        # thresholds around the norm, and the norm itself (kept within 1e-6, but scaled by a coefficient below 1)
        norm = float(th.linalg.vector_norm(th.cat([g.flatten() for g in grads])))
        max_norm = [0.5, norm, norm * (1 - 1e-7), norm * (1 + 1e-7)][trial % 4]
        expected = th.nn.utils.clip_grad_norm_(torchs, max_norm)
        assert clip_grad_norm_(ours, max_norm) == float(expected)
        for a, b in zip(ours, torchs, strict=True):
            assert th.equal(a.grad, b.grad), trial
        clipped += float(expected) > max_norm
    assert 50 < clipped < 250  # both branches exercised


def test_parameters_without_gradient_and_none_at_all():
    grads = [th.tensor([3.0, 0.0]), None, th.tensor([-4.0])]
    ours, torchs = twin_parameters(grads)
    assert clip_grad_norm_(ours, 1.0) == float(th.nn.utils.clip_grad_norm_(torchs, 1.0)) == pytest.approx(5.0)
    assert ours[1].grad is None
    assert all(th.equal(a.grad, b.grad) for a, b in zip(ours, torchs) if a.grad is not None)
    assert float(th.linalg.vector_norm(th.cat([ours[0].grad, ours[2].grad]))) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm_([nn.Parameter(th.zeros(2))], 1.0) == 0.0


def test_mixed_dtypes_and_non_finite_gradients_behave_as_in_torch():
    ours, torchs = twin_parameters([th.full((3,), 2.0), th.full((2,), 3.0, dtype=th.float64)])
    assert clip_grad_norm_(ours, 1.0) == pytest.approx(float(th.nn.utils.clip_grad_norm_(torchs, 1.0)))
    assert all(th.equal(a.grad, b.grad) for a, b in zip(ours, torchs))
    ours, torchs = twin_parameters([th.tensor([1.0, float("nan")]), th.tensor([1.0, 2.0])])
    clip_grad_norm_(ours, 1.0), th.nn.utils.clip_grad_norm_(torchs, 1.0)
    assert all(th.isnan(p.grad).all() for p in ours + torchs)  # a NaN norm spreads to every gradient
