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

When the policy's parameters sit in ``nn.Linear`` layers (plus a few direct parameters such as SB3's ``log_std``),
``LinearLayerFisher`` computes the same product without the autograd engine: a Linear layer s = a Wᵀ + b moves its
output by a dWᵀ + db, so J v = Σ_l (∂z/∂s_l)(a_l dW_lᵀ + db_l), and the per-sample Jacobians ∂z/∂s_l come from one
batched backward per update. Each product is then a few tensor contractions instead of two graph traversals, whose
fixed cost is most of the time of a small network's Fisher product.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


# LinearLayerFisher saves the fixed per-call cost of GaussNewtonFisher's two autograd passes, which dominates on
# small batches, but its per-sample contractions grow with the batch: past these sizes the autograd product is the
# cheaper one (measurements in docs/performance.md, "TRPO update cost").
MAX_DIRECT_PARAMETERS = 256
MAX_JACOBIAN_ELEMENTS = 2**19


@dataclass
class LinearCall:
    """
    One recorded call of an ``nn.Linear`` layer: its input and its output (still in the graph), and the graph node
    that made the output (an in-place operation on the output later replaces ``outputs.grad_fn``).
    """

    module: nn.Linear
    inputs: th.Tensor
    outputs: th.Tensor
    node: th.autograd.graph.Node | None = None


@contextlib.contextmanager
def record_linear_calls(module: nn.Module) -> Iterator[list[LinearCall]]:
    """
    Record every ``nn.Linear`` call inside ``module`` during the context, for ``gauss_newton_fisher``. Nothing is
    recorded (the list stays empty) when ``module`` has a batch-normalization layer: it mixes the samples of a batch,
    which the per-sample Jacobians of ``LinearLayerFisher`` cannot express.
    """
    calls: list[LinearCall] = []
    if any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules()):
        yield calls
        return

    def hook(layer: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> None:
        calls.append(LinearCall(layer, inputs[0], output, output.grad_fn))  # type: ignore[arg-type]

    handles = [layer.register_forward_hook(hook) for layer in module.modules() if isinstance(layer, nn.Linear)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _depends_on(tensor: th.Tensor, nodes: set) -> bool:
    """Whether the autograd graph of ``tensor`` reaches one of ``nodes`` (grad_fn objects)."""
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in nodes:
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _used_outside_calls(
    outputs: Sequence[th.Tensor],
    layers: Sequence[tuple[LinearCall, int | None, int | None]],
    params: Sequence[th.Tensor],
) -> bool:
    """
    Whether the autograd graph of ``outputs`` uses a weight or bias of ``layers`` other than in that layer's
    recorded call (a tied weight such as ``F.linear(h, encoder.weight.T)``): ``LinearLayerFisher`` would miss
    that use. Every edge of the graph into a parameter's gradient accumulator must start at a node made by the
    call of the layer owning it, i.e. a node reached from the call's output without passing through its input.
    """
    owner: dict[int, int] = {}
    for index, (_, weight, bias) in enumerate(layers):
        for position in (weight, bias):
            if position is not None:
                owner[id(params[position])] = index
    made_by: dict[object, int] = {}
    for index, (call, _, _) in enumerate(layers):
        stack = [call.outputs.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node is call.inputs.grad_fn or node in made_by or hasattr(node, "variable"):
                continue
            made_by[node] = index
            stack.extend(next_node for next_node, _ in node.next_functions)
    stack, seen = [output.grad_fn for output in outputs], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            variable = getattr(next_node, "variable", None)  # set on gradient accumulators (leaves) only
            if variable is None:
                stack.append(next_node)
            elif id(variable) in owner and made_by.get(node) != owner[id(variable)]:
                return True
    return False


class LinearLayerFisher:
    """
    The Fisher-vector product v ↦ (F + damping·I) v of ``GaussNewtonFisher``, computed from per-sample Jacobians of
    the distribution parameters z with respect to the outputs s_l of the Linear layers that hold the parameters:

        J v = Σ_l (∂z/∂s_l)(a_l dW_lᵀ + db_l) + (∂z/∂p) dp,    Jᵀ u: δ_l = (∂z/∂s_l)ᵀ u,  dW_l = δ_lᵀ a_l,  db_l = Σ δ_l

    where p are the few parameters outside Linear layers (SB3's ``log_std``). The Jacobians cost a few batched
    backward passes once; each product is then a handful of tensor operations and no autograd call. Assumes the
    samples of the batch do not interact (true of every SB3 policy). Build it with ``gauss_newton_fisher``, which
    checks that the structure applies.

    :param blocks: the distribution's ``fisher_blocks``
    :param params: the parameters the product is taken over (flattened in this order)
    :param layers: for each Linear layer holding some of ``params``: its recorded call and the positions of its
        weight and of its bias in ``params`` (None when not among them)
    :param direct: positions in ``params`` of the parameters outside Linear layers
    :param damping: Tikhonov damping added to the product
    """

    def __init__(
        self,
        blocks: Sequence[FisherBlock],
        params: Sequence[nn.Parameter],
        layers: Sequence[tuple[LinearCall, int | None, int | None]],
        direct: Sequence[int],
        damping: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.damping = damping
        self.batch_size = n = blocks[0][0].shape[0]
        self.layers = [(call.inputs.detach(), weight, bias) for call, weight, bias in layers]
        self.layer_widths = [call.module.out_features for call, _, _ in layers]
        self.direct = list(direct)
        self.direct_params = [self.params[i] for i in self.direct]
        # Blocks the layers move first (a state-independent log σ is moved by log_std alone): only their
        # coordinates need layer Jacobians.
        layer_nodes = {call.outputs.grad_fn for call, _, _ in layers}
        moved = [_depends_on(output, layer_nodes) for output, _ in blocks]
        moved_blocks = [block for block, is_moved in zip(blocks, moved) if is_moved]
        blocks = moved_blocks + [block for block, is_moved in zip(blocks, moved) if not is_moved]
        self.metrics = [metric for _, metric in blocks]
        self.shapes = [output.shape for output, _ in blocks]
        self.output_widths = [output[0].numel() for output, _ in blocks]
        self.n_moved = sum(output[0].numel() for output, _ in moved_blocks)
        outputs = th.cat([output.reshape(n, -1) for output, _ in blocks], dim=1)

        # ∂z/∂s_l for every sample at once: one backward per moved coordinate z_k, batched (vmap) into one call.
        # Layout (coordinate, sample, layer output): the products contract one short axis per sample, which
        # broadcasting does faster than bmm's many tiny matrices.
        basis = th.eye(self.n_moved, dtype=outputs.dtype, device=outputs.device)
        self.jacobian = th.cat(
            th.autograd.grad(
                outputs[:, : self.n_moved],
                [call.outputs for call, _, _ in layers],
                grad_outputs=basis.unsqueeze(1).expand(self.n_moved, n, self.n_moved),
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            ),
            dim=2,
        )
        # ∂z/∂p per sample by the double-vjp trick, batched over the coordinates of p; laid out as
        # (sample · coordinate, p) so that both products are one matrix-vector product.
        self.direct_jacobian = None
        if self.direct:
            cotangent = th.zeros_like(outputs, requires_grad=True)
            transposed = flat_concat(
                th.autograd.grad(
                    outputs, self.direct_params, cotangent, create_graph=True, allow_unused=True, materialize_grads=True
                )
            )
            if transposed.requires_grad:  # else the direct parameters do not move the distribution
                (jacobian,) = th.autograd.grad(
                    transposed,
                    cotangent,
                    grad_outputs=th.eye(transposed.numel(), dtype=outputs.dtype, device=outputs.device),
                    is_grads_batched=True,
                )
                self.direct_jacobian = jacobian.reshape(transposed.numel(), -1).T.contiguous()

    def __call__(self, vector: th.Tensor) -> th.Tensor:
        pieces = split_like(vector, self.params)
        n = self.batch_size
        # J v
        tangents = []
        for (inputs, weight, bias), width in zip(self.layers, self.layer_widths, strict=True):
            if weight is None:
                tangents.append(pieces[bias].expand(n, width))
            elif bias is None:
                tangents.append(inputs @ pieces[weight].T)
            else:
                tangents.append(th.addmm(pieces[bias], inputs, pieces[weight].T))
        layer_jvp = (self.jacobian * th.cat(tangents, dim=1)).sum(dim=2).T
        if self.direct_jacobian is None:
            jvp = layer_jvp.new_zeros(n, sum(self.output_widths))
        else:
            jvp = (self.direct_jacobian @ flat_concat([pieces[i] for i in self.direct])).view(n, -1)
        jvp[:, : self.n_moved] += layer_jvp
        # M J v / N, block by block
        blocks = th.split(jvp, self.output_widths, dim=1)
        metric_jvp = th.cat(
            [metric(block.view(shape)).view(n, -1) for metric, block, shape in zip(self.metrics, blocks, self.shapes)],
            dim=1,
        ).div_(n)
        # Jᵀ (M J v / N); every slot of ``product`` is filled below
        product = [vector] * len(self.params)
        deltas = (self.jacobian * metric_jvp[:, : self.n_moved].T.unsqueeze(2)).sum(dim=0)
        for (inputs, weight, bias), delta in zip(self.layers, th.split(deltas, self.layer_widths, dim=1), strict=True):
            if weight is not None:
                product[weight] = delta.T @ inputs
            if bias is not None:
                product[bias] = delta.sum(dim=0)
        if self.direct:
            direct_product = (
                self.direct_jacobian.T @ metric_jvp.view(-1)
                if self.direct_jacobian is not None
                else vector.new_zeros(sum(p.numel() for p in self.direct_params))
            )
            for i, piece in zip(self.direct, split_like(direct_product, self.direct_params), strict=True):
                product[i] = piece
        return flat_concat(product) + self.damping * vector


def gauss_newton_fisher(
    distribution: Distribution,
    params: Sequence[nn.Parameter],
    damping: float = 0.0,
    linear_calls: Sequence[LinearCall] = (),
) -> "GaussNewtonFisher | LinearLayerFisher":
    """
    The Fisher-vector product of a policy. ``LinearLayerFisher`` when the forward pass that built ``distribution``
    was recorded with ``record_linear_calls`` and every parameter sits in a Linear layer called once on the batch
    (up to ``MAX_DIRECT_PARAMETERS`` others, such as ``log_std``) and used nowhere else in the graph of the
    distribution; else ``GaussNewtonFisher``, e.g. for conv layers or tied weights. Both compute the same product.

    :param distribution: SB3 distribution over a batch, built with gradients enabled
    :param params: the parameters the product is taken over (flattened in this order)
    :param damping: Tikhonov damping added to the product
    :param linear_calls: the Linear calls recorded by ``record_linear_calls`` during the forward pass that built
        ``distribution`` (empty: ``GaussNewtonFisher``)
    """
    blocks = fisher_blocks(distribution)
    batch_size = blocks[0][0].shape[0]
    position = {id(param): i for i, param in enumerate(params)}
    calls_per_layer: dict[int, list[LinearCall]] = {}
    for call in linear_calls:
        calls_per_layer.setdefault(id(call.module), []).append(call)
    layers: list[tuple[LinearCall, int | None, int | None]] = []
    covered: set[int] = set()
    usable = bool(linear_calls)
    for calls in calls_per_layer.values():
        call = calls[0]
        weight = position.get(id(call.module.weight))
        bias = position.get(id(call.module.bias)) if call.module.bias is not None else None
        if weight is None and bias is None:
            continue
        owned = {weight, bias} - {None}
        # One call on the batch, and no parameter shared with another layer.
        usable &= len(calls) == 1 and call.inputs.dim() == 2 and call.inputs.shape[0] == batch_size
        usable &= call.outputs.requires_grad and not owned & covered
        # The output is a W^T + b (no subclass computing another weight) and is still the tensor autograd
        # differentiates (an in-place activation on it would move the Jacobians past the activation).
        usable &= type(call.module).forward is nn.Linear.forward and call.outputs.grad_fn is call.node
        covered |= owned
        layers.append((call, weight, bias))
    direct = [i for i in range(len(params)) if i not in covered]
    n_coordinates = sum(output[0].numel() for output, _ in blocks)
    usable &= bool(layers) and sum(params[i].numel() for i in direct) <= MAX_DIRECT_PARAMETERS
    usable &= (
        batch_size * n_coordinates * sum(call.module.out_features for call, _, _ in layers) <= MAX_JACOBIAN_ELEMENTS
    )
    # Last, as it walks the graph: a covered parameter used outside its layer's call (tied weights).
    if usable and not _used_outside_calls([output for output, _ in blocks], layers, params):
        return LinearLayerFisher(blocks, params, layers, direct, damping)
    return GaussNewtonFisher(distribution, params, damping)
