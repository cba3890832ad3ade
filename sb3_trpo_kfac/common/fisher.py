"""
Fisher-vector products of a policy, in generalized Gauss-Newton form.

For a batch of N states, the policy's action distribution has parameters z_i = z(s_i; θ) (logits, or mean and
log standard deviation). The Fisher of the policy is

    F = (1/N) Σ_i J_iᵀ M_i J_i,    J_i = ∂z_i/∂θ,

with M_i the Fisher of the distribution in its own parameters, known in closed form:

- Categorical with logits z, p = softmax(z):  M u = p ⊙ u − p (pᵀu)
- Bernoulli with logits z, p = σ(z):          M u = p (1 − p) ⊙ u
- Diagonal Gaussian in (μ, log σ):            M_μ u = u / σ²,  M_logσ u = 2 u, no cross terms

MultiCategorical is one Categorical block per action dimension; gSDE's state-dependent Gaussian is the Gaussian
case with log σ depending on the state. The product is exact at the current parameters and needs no second
derivative of the network: J v by the double-vjp trick (a backward through a backward graph that is built once),
Jᵀ u by one backward through the retained forward graph.
"""

import copy
from collections.abc import Callable, Sequence

import torch as th
from stable_baselines3.common.distributions import Distribution, kl_divergence
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal

# M u for one block, per sample: (output, metric) where metric maps a tangent shaped like output to M·tangent.
FisherBlock = tuple[th.Tensor, Callable[[th.Tensor], th.Tensor]]


def _categorical_block(dist: Categorical) -> FisherBlock:
    probs = dist.probs.detach()

    def metric(u: th.Tensor) -> th.Tensor:
        return probs * u - probs * (probs * u).sum(dim=-1, keepdim=True)

    return dist.logits, metric


def _bernoulli_block(dist: Bernoulli) -> FisherBlock:
    weight = (dist.probs * (1.0 - dist.probs)).detach()
    return dist.logits, lambda u: weight * u


def _normal_blocks(dist: Normal) -> list[FisherBlock]:
    inverse_variance = dist.scale.detach() ** -2
    return [(dist.loc, lambda u: inverse_variance * u), (th.log(dist.scale), lambda u: 2.0 * u)]


def fisher_blocks(distribution: Distribution) -> list[FisherBlock]:
    """
    The distribution parameters of an SB3 distribution and the analytic Fisher metric of each.

    :param distribution: an SB3 distribution built with gradients enabled (``policy.get_distribution(obs)``)
    :return: ``(output, metric)`` pairs; outputs have the batch as first dimension
    """
    inner = distribution.distribution
    torch_dists = inner if isinstance(inner, list) else [inner]
    blocks: list[FisherBlock] = []
    for dist in torch_dists:
        if isinstance(dist, Categorical):
            blocks.append(_categorical_block(dist))
        elif isinstance(dist, Bernoulli):
            blocks.append(_bernoulli_block(dist))
        elif isinstance(dist, Normal):
            blocks.extend(_normal_blocks(dist))
        else:
            raise TypeError(f"No analytic Fisher for action distribution {type(dist).__name__}")
    return blocks


def detached_distribution(distribution: Distribution) -> Distribution:
    """
    A copy of an SB3 distribution whose parameters are cut from the graph: the "old" policy of a trust-region step,
    obtained without a second forward pass.
    """

    def detach(dist: th.distributions.Distribution) -> th.distributions.Distribution:
        if isinstance(dist, Categorical):
            return Categorical(logits=dist.logits.detach())
        if isinstance(dist, Bernoulli):
            return Bernoulli(logits=dist.logits.detach())
        if isinstance(dist, Normal):
            return Normal(dist.loc.detach(), dist.scale.detach())
        raise TypeError(f"Cannot detach action distribution {type(dist).__name__}")

    old = copy.copy(distribution)
    inner = distribution.distribution
    old.distribution = [detach(d) for d in inner] if isinstance(inner, list) else detach(inner)  # type: ignore[assignment]
    return old


def mean_kl(old: Distribution, new: Distribution) -> th.Tensor:
    """
    Mean over states of KL(old ‖ new), summed over action dimensions (SB3's ``kl_divergence`` leaves them apart
    for Gaussian, Bernoulli and MultiCategorical actions).
    """
    kl = kl_divergence(old, new)
    return kl.reshape(kl.shape[0], -1).sum(dim=1).mean()


def flat_concat(tensors: Sequence[th.Tensor]) -> th.Tensor:
    return th.cat([t.reshape(-1) for t in tensors])


def split_like(flat: th.Tensor, params: Sequence[th.Tensor]) -> list[th.Tensor]:
    """Cut a flat vector into pieces shaped like ``params``."""
    pieces = th.split(flat, [p.numel() for p in params])
    return [piece.view_as(p) for piece, p in zip(pieces, params, strict=True)]


class GaussNewtonFisher:
    """
    The Fisher-vector product v ↦ (F + damping·I) v of a policy at its current parameters.

    Build it once per update from a distribution computed with gradients; each call then costs one backward
    through a backward graph (J v) and one backward through the forward graph (Jᵀ M J v).

    :param distribution: SB3 distribution over a batch, built with gradients enabled
    :param params: the parameters the product is taken over (flattened in this order)
    :param damping: Tikhonov damping added to the product
    """

    def __init__(self, distribution: Distribution, params: Sequence[nn.Parameter], damping: float = 0.0) -> None:
        blocks = fisher_blocks(distribution)
        self.outputs = [output for output, _ in blocks]
        self.metrics = [metric for _, metric in blocks]
        self.params = list(params)
        self.damping = damping
        self.batch_size = self.outputs[0].shape[0]
        # Jᵀu as a differentiable function of dummy cotangents u: differentiating it by u gives J v.
        self._cotangents = [th.zeros_like(output, requires_grad=True) for output in self.outputs]
        transposed_jacobian = th.autograd.grad(
            self.outputs,
            self.params,
            grad_outputs=self._cotangents,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        # A parameter block that is constant in u (unused by every output) contributes nothing to J v.
        self._linear_blocks = [i for i, jt in enumerate(transposed_jacobian) if jt.requires_grad]
        self._transposed_jacobian = [transposed_jacobian[i] for i in self._linear_blocks]

    def jacobian_vector_product(self, vector: th.Tensor) -> list[th.Tensor]:
        """J v for each distribution output."""
        pieces = split_like(vector, self.params)
        return list(
            th.autograd.grad(
                self._transposed_jacobian,
                self._cotangents,
                grad_outputs=[pieces[i] for i in self._linear_blocks],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        )

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        jvp = self.jacobian_vector_product(vector)
        metric_jvp = [metric(u) / self.batch_size for metric, u in zip(self.metrics, jvp, strict=True)]
        product = th.autograd.grad(
            self.outputs,
            self.params,
            grad_outputs=metric_jvp,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return flat_concat(product) + self.damping * vector
