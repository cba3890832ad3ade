"""
K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens
2016) with the trust-region step-size clipping of ACKTR (Wu et al. 2017), as a ``torch.optim.Optimizer``.

Every ``nn.Linear`` and ``nn.Conv2d`` of the model is a block whose Fisher is approximated by ``A ⊗ G``:
``A`` the second moment of the layer input (with a homogeneous 1 for the bias, so the block's parameters are
``W̄ = [W, b]`` of shape ``out x (in + 1)``) and ``G`` that of the gradient of a *sampled* loss with respect to
the layer output (pre-activation). The statistics are only gathered on request, from a Fisher loss you give,
so plain forward passes (e.g. ``no_grad`` rollouts) are never counted and ``.grad`` is never touched by them.

One convention for every layer kind (KFC's, Grosse & Martens 2016, scaled as in OpenAI baselines): the rows a layer
sees for one sample are its ``T`` *locations*: a Conv2d's output positions, the positions of a Linear applied to
``(N, T, in)`` inputs, and the calls of a layer applied several times in one forward. With ``T`` locations per
sample, ``A = Σ (ā/T)(ā/T)ᵀ / N`` and ``G = T² · mean δδᵀ`` over samples x locations (for a plain ``(N, in)``
Linear: ``A = mean ā āᵀ``, ``G = mean δ δᵀ``), so a Linear and the equivalent 1x1 Conv2d get the same step. A
parameter has exactly one block: modules that share a weight and its bias (tied weights) are one block whose calls
are locations as above; a weight or bias used by anything else the model holds is refused at construction.

Supervised use (any ``nn.Module``)::

    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = KFAC(model, lr=0.1, kfac_clip=0.01)
    for x, y in loader:
        with optimizer.collect():  # forward hooks save layer inputs / outputs
            logits = model(x)
        # Fisher loss: sum-reduced negative log-likelihood of targets sampled from the model itself
        sampled = th.distributions.Categorical(logits=logits.detach()).sample()
        optimizer.update_statistics(F.cross_entropy(logits, sampled, reduction="sum"))
        optimizer.zero_grad()
        F.cross_entropy(logits, y).backward()
        optimizer.step()

Parameters outside a block (normalisation layers, ``log_std``, embeddings, grouped convolutions) keep their
raw gradient; they are counted in the trust region and scaled with the rest.

Each parameter group is its own trust region, with its own ``lr``, ``momentum`` and ``kfac_clip``::

    KFAC(model, params=[{"params": actor.parameters()}, {"params": critic.parameters(), "kfac_clip": 0.1}])
"""

import contextlib
import copy
import dataclasses
import math
from concurrent.futures import Future, ThreadPoolExecutor
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.validation import (
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
)

INVERSE_MODES = ("eigen", "inverse")
# Eigenvalues below this are treated as exact zeros (numerical noise of eigh on a PSD matrix).
EIGENVALUE_FLOOR = 1e-6


def _limit_worker_threads() -> None:
    """
    Give the decomposition worker the process's torch thread count. OpenMP's thread count is per thread: a
    fresh thread's LAPACK calls otherwise use a team of ``os.cpu_count()`` threads whatever
    ``torch.set_num_threads`` said (measured: 77 ms instead of 0.4 ms per 64 x 64 ``eigh`` on 2 busy cores).
    Setting the current value again leaves the process-wide setting unchanged and only sets this thread's.
    """
    th.set_num_threads(th.get_num_threads())


def _describe_factor(mat: th.Tensor) -> str:
    """
    Size and condition of a square factor, for a failure message.

    :param mat: the factor
    :return: e.g. ``"501x501, condition number 3.2e+07"`` or ``"64x64, 3 non-finite entries"``
    """
    size = f"{mat.shape[0]}x{mat.shape[1]}"
    n_bad = int((~th.isfinite(mat)).sum())
    if n_bad:
        return f"{size}, {n_bad} non-finite entries"
    try:
        singular = th.linalg.svdvals(mat.detach().to(th.float64))
    except RuntimeError:
        return f"{size}, largest entry {float(mat.abs().max()):.3g}"
    largest, smallest = float(singular[0]), float(singular[-1])
    condition = largest / smallest if smallest > 0 else math.inf
    return f"{size}, condition number {condition:.3g}, largest singular value {largest:.3g}"


class KFACBlock:
    """
    One Kronecker-factored block: the weight (and bias) of an ``nn.Linear`` or ``nn.Conv2d``, treated jointly as the
    matrix ``W̄ = [W.view(out, -1), b]``. Modules that share the weight and the bias (tied weights) are one block:
    each forward of any of them adds locations to its statistics.

    :param name: qualified module name(s) (for messages)
    :param module: the layer
    :param tied: further layers of the same kind that use the same weight and bias
    """

    def __init__(self, name: str, module: nn.Module, tied: Sequence[nn.Module] = ()) -> None:
        self.name = name
        self.module = module
        self.modules = [module, *tied]
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.is_conv = isinstance(module, nn.Conv2d)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape ``out x (in + 1)`` of ``W̄`` (``out x in`` without a bias)."""
        rows = self.weight.shape[0]
        return rows, self.weight.numel() // rows + int(self.bias is not None)

    def from_matrix(self, mat: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Views of a block matrix's weight part (in the weight's shape) and bias column."""
        weight_part = mat if self.bias is None else mat[:, :-1]
        if self.is_conv:
            weight_part = weight_part.view(self.weight.shape)  # a view always (a reshape could copy)
        return weight_part, None if self.bias is None else mat[:, -1]

    @staticmethod
    def patches(module: nn.Module, x: th.Tensor) -> tuple[th.Tensor, int]:
        """
        A convolution's inputs ``x`` (N, C, H, W) as rows ``a`` (one row per sample and output position), without
        the homogeneous 1.

        :param module: the ``nn.Conv2d`` that was applied to ``x`` (tied layers may differ in stride, padding, ...)
        :return: ``(a, T)`` with ``T`` the number of output positions per sample
        """
        conv: nn.Conv2d = module  # type: ignore[assignment]
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        elif padding == "valid":
            padding = (0, 0)
        # columns ordered as weight.view(out, -1): (channel, kernel row, kernel column)
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[-1]

    def input_moment(self, rows: th.Tensor) -> th.Tensor:
        """``Σ ā āᵀ`` over the rows, ``ā = [a, 1]`` if the layer has a bias."""
        if self.bias is not None:
            rows = F.pad(rows, (0, 1), value=1.0)
        return rows.T @ rows


@dataclasses.dataclass
class CurvatureJob:
    """One curvature update: inputs from :meth:`KFAC._prepare_curvature`, results of :meth:`KFAC._compute_curvature`."""

    # per block with statistics: its factors and decompositions (read), its new state entries (written)
    blocks: list[tuple[KFACBlock, dict[str, th.Tensor], dict[str, th.Tensor]]] = dataclasses.field(default_factory=list)
    # eigen mode: same-size full factors as (block, its entries, eigenvalue key, eigenvector key), their stack
    # and the batched eigh of the stack (None if it raised)
    eigen_groups: list[list[tuple[KFACBlock, dict[str, th.Tensor], str, str]]] = dataclasses.field(default_factory=list)
    eigen_stacks: list[th.Tensor] = dataclasses.field(default_factory=list)
    eigen_results: list[tuple[th.Tensor, th.Tensor] | None] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SolveBatch:
    """Same-shape blocks of one parameter group, consecutive in its flat buffers, solved together."""

    blocks: list[KFACBlock]
    gradients: th.Tensor  # (blocks, out, in + 1) view of GroupBuffers.gradient
    directions: th.Tensor  # the same view of GroupBuffers.direction
    # stacked solve factors of the last decomposition (see KFAC._update_factors); None: block by block
    factors: tuple[th.Tensor, ...] | None = None


@dataclasses.dataclass
class GroupBuffers:
    """
    A parameter group's gradients, directions and momentum buffers as three flat tensors of the same layout: the
    block matrices ``W̄`` batch by batch, then the parameters outside blocks. Each parameter has a view into each,
    so a step copies the gradients in with one call and updates the momentum with two, whatever the layer count.
    """

    params: list[nn.Parameter]
    gradient: th.Tensor
    direction: th.Tensor
    momentum: th.Tensor
    gradient_views: list[th.Tensor]
    direction_views: list[th.Tensor]
    momentum_views: list[th.Tensor]
    batches: list[SolveBatch]
    raw_start: int  # flat offset of the parameters outside blocks (their direction is the gradient)


class KFAC(th.optim.Optimizer):
    """
    K-FAC natural-gradient optimizer with ACKTR's trust-region clipping and momentum.

    Update, with ``∇`` the gradient in ``.grad`` (plus ``weight_decay * p``) and ``V`` its preconditioned version
    (``V = (A ⊗ G + damping)⁻¹ ∇`` per block, ``V = ∇`` for parameters outside blocks):
    ``ν = min(1, sqrt(kfac_clip / (lr² Σ⟨V, ∇⟩)))``, ``buf ← momentum * buf + ν V``,
    ``p ← p − lr (1 − momentum) buf`` (the form of OpenAI baselines' ``KfacOptimizer``). The sum, and so ν, is
    taken per parameter group: one group (the default) is one trust region over all parameters; several groups
    (e.g. an actor and a critic) each get their own ν, ``lr``, ``momentum`` and ``kfac_clip``. Each group's
    momentum buffers (``state[p]["momentum_buffer"]``) are views of one flat tensor, built at the first step.

    Statistics: call the model inside :meth:`collect`, then :meth:`update_statistics` with a sum-reduced
    *sampled* negative log-likelihood (the Fisher loss). Running averages of ``A`` and ``G`` are
    eigendecomposed (or inverted) by :meth:`step` every ``kfac_update`` calls, once new statistics exist.
    Steps before any statistics exist use the raw gradient (inside the same trust region).

    Diagnostics of the last step, one entry per parameter group: ``last_nu`` (ν) and ``last_vfv``
    (``lr² Vᵀ∇``, equal to ``lr² Vᵀ F V`` for the solve and its refinement). ``last_nu² · last_vfv`` is the
    quadratic KL of the preconditioned direction ``ν V`` before momentum, at most ``kfac_clip`` (a cold-start step
    has no trust region: ν = 1 and ``lr² ‖clip(∇)‖²``); it does not bound the applied step ``lr (1 − m) buf``,
    whose buffer carries earlier directions.

    :param model: the module whose ``nn.Linear`` / ``nn.Conv2d`` layers get K-FAC blocks
    :param lr: learning rate η (also the scale in the trust region; change it via ``param_groups`` as usual)
    :param momentum: SGD momentum ``m``; the step is ``lr * (1 - m)`` times the momentum buffer
    :param stats_decay: running-average factor ρ of the Kronecker factors (``A ← ρ A + (1 − ρ) A_new``);
        the first batch initialises them
    :param damping: Tikhonov damping λ added to the Kronecker-factored Fisher
    :param kfac_clip: trust-region radius κ on ``lr² Vᵀ F V``
    :param kfac_update: recompute eigendecompositions (or inverses) at the first step with new statistics at least
        this many steps after the last recomputation (every ``kfac_update`` steps when statistics come every step;
        right after the statistics when they come less often)
    :param weight_decay: L2 coefficient added to the gradient (and to the damping of the blocks)
    :param cold_iter: number of initial steps that use plain momentum SGD with gradient-norm clipping
        (statistics are still gathered during them), in the form of the K-FAC step: ``buf ← m buf + clip(∇)``,
        ``p ← p − lr (1 − m) buf``, i.e. ``lr (1 − m) clip(∇)`` from rest, without trust region. OpenAI baselines'
        ``KfacOptimizer`` runs its cold steps with a separate momentum optimizer at ``cold_lr`` (by default the
        learning rate) and no ``(1 − m)`` factor, so at ``m = 0.9`` they are about 10x ours; its continuous-control
        ACKTR passes ``cold_lr = lr (1 − 0.9)``, which matches ours. Default 0: K-FAC from the first step
        (baselines' ``KfacOptimizer`` defaults to 100; its Atari ACKTR uses 10, its continuous-control ACKTR 1)
    :param cold_max_grad_norm: global gradient-norm clip of the cold-start steps
    :param inverse: ``"eigen"`` (default): exact inverse of ``A ⊗ G + λI`` via eigendecompositions;
        ``"inverse"``: cheaper factored damping ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹``, π the *square root* of the
        ratio of the average eigenvalues (trace / dimension) of ``A`` to that of ``G`` (Martens & Grosse 2015)
    :param low_rank: if set, input factors ``A`` of dimension above ``low_rank_min_dim`` keep only their top
        ``low_rank`` eigenpairs (subspace iteration warm-started from the previous basis) and the mean of the
        remaining eigenvalues on the complement: the solve then costs ``O(out · in · low_rank)`` instead of
        ``O(out · in²)`` (e.g. NatureCNN's 3137 x 512 layer). Exact when ``A`` has rank <= ``low_rank``.
    :param low_rank_min_dim: smallest input-factor dimension that uses ``low_rank``
    :param async_decomposition: decompose the factors in a background thread: a step that is due for new
        decompositions starts them on a snapshot (copy) of the current factors in a single worker thread and
        keeps the current basis; the next step waits for them and swaps them in. Each step thus uses a basis
        one decomposition older than with the default synchronous mode (the very first one is synchronous),
        and the decompositions overlap whatever the caller does between steps (in ACKTR, the next rollout).
        The worker only runs the batched ``torch.linalg.eigh`` calls, which release the GIL (low-rank and
        ``"inverse"`` modes run their whole computation there), so this helps with at least two cores. Results are
        deterministic: the swap happens at a fixed point (the next :meth:`step`, :meth:`precondition` or
        :meth:`state_dict`); :meth:`load_state_dict` and :meth:`update_preconditioner` discard a pending job.
    :param refine_iterations: if > 0, a step whose factors got statistics after the last decomposition solves
        ``(A ⊗ G + λI) V = ∇`` for the *current* factors by this many iterations of preconditioned conjugate gradient,
        that decomposition being the preconditioner (started from zero: the first iterate is the decomposition's
        solve, rescaled along the current curvature). With ``kfac_update > 1`` or ``async_decomposition`` the steps
        then follow the statistics although the decompositions lag behind. Each iteration costs one product
        ``G X A`` and one preconditioner solve per block; steps whose decomposition is of the current factors solve
        exactly without it. CG keeps ``⟨V, (A ⊗ G + λI) V⟩ = ⟨V, ∇⟩``, so the trust region stays exact. Blocks with
        a low-rank input factor are not refined (their product would cost what ``low_rank`` saves).
    :param modules: layers to cover (default: every ``nn.Linear`` / ``nn.Conv2d`` in ``model``)
    :param params: parameters to optimize (default: all parameters of ``model`` that require grad), or
        parameter groups (dicts with ``"params"`` and optionally ``"lr"``, ``"momentum"``, ``"kfac_clip"``), one
        trust region each; a layer's weight and bias must share a group, ``weight_decay`` is common to all groups
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.25,
        momentum: float = 0.9,
        stats_decay: float = 0.99,
        damping: float = 0.01,
        kfac_clip: float = 0.001,
        kfac_update: int = 1,
        weight_decay: float = 0.0,
        cold_iter: int = 0,
        cold_max_grad_norm: float = 0.5,
        inverse: str = "eigen",
        low_rank: int | None = None,
        low_rank_min_dim: int = 1024,
        async_decomposition: bool = False,
        refine_iterations: int = 0,
        modules: Iterable[nn.Module] | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        lr = check_float("lr", lr, 0.0)
        # the step is lr * (1 - momentum); statistics with stats_decay 1 would never change
        momentum = check_float("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        weight_decay = check_float("weight_decay", weight_decay, 0.0)
        self.stats_decay = check_float("stats_decay", stats_decay, 0.0, 1.0, high_inclusive=False)
        self.damping = check_float("damping", damping, 0.0, low_inclusive=False)
        self.kfac_update = check_int("kfac_update", kfac_update, 1)
        self.cold_iter = check_int("cold_iter", cold_iter, 0)
        self.cold_max_grad_norm = check_float(  # inf: no clipping
            "cold_max_grad_norm", cold_max_grad_norm, 0.0, low_inclusive=False, allow_inf=True
        )
        self.inverse = check_choice("inverse", inverse, INVERSE_MODES)
        self.low_rank = None if low_rank is None else check_int("low_rank", low_rank, 1)
        self.low_rank_min_dim = check_int("low_rank_min_dim", low_rank_min_dim, 1)
        self.async_decomposition = check_bool("async_decomposition", async_decomposition)
        self.refine_iterations = check_int("refine_iterations", refine_iterations, 0)
        self._executor: ThreadPoolExecutor | None = None
        # (future, job, stats_updates of its snapshot) of the background decomposition in flight
        self._pending: tuple[Future, CurvatureJob, int] | None = None

        self.kfac_clip = check_float("kfac_clip", kfac_clip, 0.0, low_inclusive=False)
        groups = self._parameter_groups(model.parameters() if params is None else params)
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, kfac_clip=self.kfac_clip))

        group_of = {id(p): index for index, group in enumerate(self.param_groups) for p in group["params"]}
        self.blocks = self._make_blocks(model, modules, set(group_of))
        for block in self.blocks:
            if (
                block.bias is not None
                and group_of.get(id(block.bias), group_of[id(block.weight)]) != group_of[id(block.weight)]
            ):
                raise ArgumentError(f"`params`: the weight and bias of {block.name} are in different parameter groups")
        # the trust region (parameter group) each block's ⟨V, ∇⟩ counts in
        self._block_group = {block: group_of[id(block.weight)] for block in self.blocks}
        # per block: its calls saved inside collect(), as (module, input, version of the input, output)
        self._saved: dict[KFACBlock, list[tuple[nn.Module, th.Tensor, int, th.Tensor]]] = {}
        # forward hooks exist only inside collect(): a module with hooks takes a slower call path, which every
        # rollout forward would otherwise pay (CartPole MLP, 8 envs x 5 steps: about 12% of A2C's time per env step)
        self._hooks: list[th.utils.hooks.RemovableHandle] = []
        self._hooks_enabled = True
        self.counters: dict[str, int] = dict(
            steps=0,  # calls of step(), except those with refresh_curvature=False (extra_steps)
            extra_steps=0,  # calls of step(refresh_curvature=False)
            updates=0,  # steps that changed the parameters (extra steps not counted)
            skipped_steps=0,  # steps refused because of a non-finite gradient or trust-region scale
            stats_updates=0,  # successful update_statistics() calls
            skipped_stats=0,  # statistics refused because they were not finite
            curvature_updates=0,  # eigendecompositions / inversions of all factors
            stats_at_curvature=0,  # stats_updates at the last curvature update
            steps_at_curvature=0,  # steps at the last step that started a curvature update
            decomposition_failures=0,  # factors whose decomposition failed (previous one kept)
        )
        # flat buffers per parameter group, built at the first step (and after loading a state); their batches'
        # solve factors are restacked after every curvature update
        self._buffers: list[GroupBuffers] | None = None
        self._factors_stale = True
        # per parameter group, the (dtype, device) its state was built for (see _follow_parameters)
        self._group_kinds = [self._group_kind(group["params"]) for group in self.param_groups]
        # diagnostics of the last step, one entry per parameter group (for logging): trust-region scale ν and
        # lr² Vᵀ F V of the preconditioned direction V (before ν and momentum)
        self.last_nu = [float("nan")] * len(self.param_groups)
        self.last_vfv = [float("nan")] * len(self.param_groups)

    @staticmethod
    def _parameter_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
        """The groups of ``params`` (parameters or dicts), keeping parameters that require grad, each once."""
        items = list(params)
        as_groups = [isinstance(item, dict) for item in items]
        if any(as_groups) and not (all(as_groups) and all("params" in item for item in items)):
            raise TypeError("`params` must be parameters or parameter groups (dicts with a 'params' entry), not a mix")
        groups = [dict(item) for item in items] if any(as_groups) else [{"params": items}]
        seen: set[int] = set()
        for group in groups:
            if "weight_decay" in group:
                raise ValueError("`params`: weight_decay is common to all groups (it enters the blocks' damping)")
            if "lr" in group:
                check_float("params[...]['lr']", group["lr"], 0.0)
            if "kfac_clip" in group:
                check_float("params[...]['kfac_clip']", group["kfac_clip"], 0.0, low_inclusive=False)
            if "momentum" in group:
                check_float("params[...]['momentum']", group["momentum"], 0.0, 1.0, high_inclusive=False)
            tensors = [group["params"]] if isinstance(group["params"], th.Tensor) else list(group["params"])
            unique = list({id(p): p for p in tensors if p.requires_grad}.values())
            if unique:
                KFAC._group_kind(unique)
            if any(id(p) in seen for p in unique):
                raise ValueError("`params`: a parameter appears in more than one group")
            seen.update(id(p) for p in unique)
            group["params"] = unique
        groups = [group for group in groups if group["params"]]
        if not groups:
            raise ValueError("`params`: no parameter requires grad")
        return groups

    # ------------------------------------------------------------------ blocks and hooks
    @staticmethod
    def _make_blocks(model: nn.Module, modules: Iterable[nn.Module] | None, param_ids: set[int]) -> list[KFACBlock]:
        names = {id(module): name for name, module in model.named_modules()}
        if modules is None:
            candidates = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        else:
            candidates = list(modules)
            for module in candidates:
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    raise TypeError(f"`modules`: K-FAC blocks exist for nn.Linear and nn.Conv2d, got {type(module).__name__}")
        # covered modules by weight: modules that share a weight (tied weights) make one block
        by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
        seen: set[int] = set()
        for module in candidates:
            if id(module) in seen or id(module.weight) not in param_ids or not module.weight.requires_grad:
                continue
            seen.add(id(module))
            name = names.get(id(module), type(module).__name__)
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                warnings.warn(f"KFAC: {name} is a grouped convolution (groups={module.groups}); it keeps its raw gradient")
                continue
            if isinstance(module, nn.Conv2d) and module.padding == "same":
                warnings.warn(f"KFAC: {name} uses padding='same'; it keeps its raw gradient")
                continue
            if module.bias is not None and module.bias.requires_grad and id(module.bias) not in param_ids:
                warnings.warn(f"KFAC: the bias of {name} is not optimized; the layer keeps its raw gradient")
                continue
            by_weight.setdefault(id(module.weight), []).append((name, module))

        def trained_bias(layer: nn.Module) -> object:
            return layer.bias if layer.bias is not None and layer.bias.requires_grad else None

        blocks = []
        for uses in by_weight.values():
            (name, first), *others = uses
            for other_name, other in others:
                # the calls of tied modules are extra locations of one block only if W̄ = [W, b] is the same matrix
                if type(other) is not type(first) or trained_bias(other) is not trained_bias(first):
                    raise ValueError(
                        f"`model`: {name} and {other_name} share their weight but not their bias (or are of different "
                        "kinds); K-FAC needs one block per parameter, fed by all its uses (tie the biases too, or leave "
                        "the weight out of `params`)"
                    )
            label = name if not others else ", ".join([name, *(other_name for other_name, _ in others)])
            blocks.append(KFACBlock(label, first, [other for _, other in others]))
        # a block parameter used anywhere else (e.g. an nn.Embedding tied to an output layer, a skipped layer, a
        # bias shared by layers with different weights) would get a gradient its block's statistics do not cover
        owner: dict[int, KFACBlock] = {}
        for new_block in blocks:
            for param in new_block.params:
                known = owner.setdefault(id(param), new_block)
                if known is not new_block:
                    raise ValueError(
                        f"`model`: {known.name} and {new_block.name} share their bias but not their weight; K-FAC needs "
                        "one block per parameter (tie the weights too, or leave the bias out of `params`)"
                    )
        for module_name, user in model.named_modules():
            for attr, tensor in user._parameters.items():
                block = owner.get(id(tensor)) if tensor is not None else None
                if block is None:
                    continue
                role = "weight" if tensor is block.weight else "bias"
                if attr != role or not any(user is m for m in block.modules):
                    use = f"{module_name}.{attr}" if module_name else attr
                    raise ValueError(
                        f"`model`: the {role} of {block.name} is also used as {use}, which K-FAC does not cover; a "
                        "parameter's block must see all its uses (cover that module too, or leave the parameter out "
                        "of `params`)"
                    )
        return blocks

    def _make_hook(self, block: KFACBlock) -> Callable[..., th.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> th.Tensor | None:
            # only forwards that build a graph
            if not (th.is_grad_enabled() and output.requires_grad):
                return None
            x = inputs[0].detach()  # shares the version counter: an in-place change is seen in update_statistics
            self._saved.setdefault(block, []).append((module, x, x._version, output))
            # the model continues with a copy, so that an in-place op after the layer (e.g. ReLU(inplace=True))
            # changes the copy and δ stays the gradient with respect to the layer's own output
            return output.clone()

        return hook

    def remove_hooks(self) -> None:
        """Stop saving forwards in :meth:`collect` for good (the optimizer then only uses the statistics it has)."""
        self._hooks_enabled = False
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @staticmethod
    def _group_kind(params: Iterable[th.Tensor]) -> tuple[th.dtype, th.device]:
        """The one (dtype, device) of a parameter group's parameters (a TypeError if they differ)."""
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:  # a group's gradients, directions and momentum live in one flat tensor of each
            kinds_text = ", ".join(sorted(f"{dtype} on {device}" for dtype, device in kinds))
            raise TypeError(f"`params`: the parameters of a group must share one dtype and device, got {kinds_text}")
        return next(iter(kinds))

    def _follow_parameters(self) -> None:
        """
        Convert the state of the groups whose parameters changed dtype or device (e.g. ``model.double()`` after some
        steps): factors, decompositions and momentum follow the parameters (as ``load_state_dict`` converts them),
        and the flat buffers are rebuilt at the next use.
        """
        kinds = []
        for group in self.param_groups:
            params = group["params"]
            dtype = params[0].dtype
            # every dtype: a mixed group would be cast silently into the flat buffers (a device mismatch raises there)
            if len({p.dtype for p in params}) > 1:
                self._group_kind(params)  # raises, naming the dtypes
            kinds.append((dtype, params[0].device))
        known = self._group_kinds + kinds[len(self._group_kinds) :]  # groups added later start with their own
        if kinds == known:
            self._group_kinds = known
            return
        kinds = [self._group_kind(group["params"]) for group in self.param_groups]
        self._join_pending()  # its decompositions are converted with the rest
        for group, kind, old_kind in zip(self.param_groups, kinds, known):
            if kind == old_kind:
                continue
            for p in group["params"]:
                state = self.state[p]
                for key, value in state.items():
                    if isinstance(value, th.Tensor):
                        target = p.dtype if value.is_floating_point() else value.dtype
                        state[key] = value.to(device=p.device, dtype=target)
        self._group_kinds = kinds
        self._buffers = None

    # ------------------------------------------------------------------ statistics
    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Context in which forward passes of covered layers are saved for :meth:`update_statistics`."""
        self._saved = {}
        if self._hooks or not self._hooks_enabled:  # nested, or hooks removed
            yield
            return
        self._hooks = [
            module.register_forward_hook(self._make_hook(block)) for block in self.blocks for module in block.modules
        ]
        try:
            yield
        finally:
            self._remove_hooks()

    def update_statistics(self, fisher_loss: th.Tensor) -> bool:
        """
        Update the running Kronecker factors from the forwards saved in the last :meth:`collect`.

        ``δ = ∂ fisher_loss / ∂ (layer output)`` by ``torch.autograd.grad`` (graph retained, ``.grad`` untouched).
        One convention for every layer kind (KFC, Grosse & Martens 2016, with baselines' scaling): a block's rows are
        its *locations*, ``T`` per sample: the output positions of a Conv2d, the positions ``T`` of a Linear applied to
        ``(N, T, in)`` inputs, and, for a layer called ``k`` times in the forward (or tied layers), the rows of all
        calls, so ``T = rows of all calls / N``. Then ``A = Σ (ā/T)(ā/T)ᵀ / N`` and ``G = T² · mean δ δᵀ`` over
        samples x locations; for a plain ``(N, in)`` Linear (``T = 1``) ``A = mean ā āᵀ`` and ``G = mean δ δᵀ``. A
        Linear and the equivalent 1x1 Conv2d thus get the same factors.

        ``N`` is the leading dimension of the layer input (1 for an unbatched input); every call of a block must see
        the same ``N`` (a ValueError otherwise, before any change). A block none of whose calls has rows keeps its
        factors; if no call has any, nothing changes. A layer input modified in place after the forward raises a
        RuntimeError (its saved value is no longer the one the layer saw; autograd's backward would refuse it too).

        :param fisher_loss: scalar, *sum* over the N samples of the sampled negative log-likelihood
        :return: whether the statistics were updated (False if nothing was saved, nothing saved has a sample, or the
            statistics were not finite)
        """
        saved, self._saved = self._saved, {}
        calls = [(block, *call) for block, block_calls in saved.items() for call in block_calls]
        if not calls:
            warnings.warn("KFAC.update_statistics: no forward of a covered layer was saved; call the model inside collect()")
            return False
        for block, _, x, version, _ in calls:
            if x._version != version:
                raise RuntimeError(
                    f"KFAC.update_statistics: the input of {block.name} was modified in place after its forward; "
                    "its statistics would not be those of the forward (use an out-of-place op)"
                )
        calls = [call for call in calls if call[-1].numel() > 0]
        if not calls:
            warnings.warn("KFAC.update_statistics: the saved forwards have no samples; the statistics are unchanged")
            return False
        self._follow_parameters()
        deltas = th.autograd.grad(fisher_loss, [out for *_, out in calls], retain_graph=True, allow_unused=True)
        # per block: [Σ ā āᵀ, Σ δ δᵀ, rows, N] over its calls; the same input tensor (e.g. features fed to both the
        # policy and the value network) gives the same input moment, computed once
        sums: dict[KFACBlock, list[Any]] = {}
        moments: dict[tuple[Any, ...], th.Tensor] = {}
        with th.no_grad():
            for (block, module, x, _, out), delta in zip(calls, deltas):
                if delta is None:
                    continue
                if block.is_conv:
                    if x.dim() == 3:  # unbatched
                        x, delta = x.unsqueeze(0), delta.unsqueeze(0)
                    a_sum = block.input_moment(block.patches(module, x)[0])
                    delta = delta.transpose(1, -1).reshape(-1, delta.shape[1])  # (N*T, out), any spatial order
                else:
                    key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), block.bias is not None)
                    a_sum = moments.get(key)
                    if a_sum is None:
                        a_sum = moments[key] = block.input_moment(x.reshape(-1, x.shape[-1]))
                    delta = delta.reshape(-1, delta.shape[-1])
                g_sum = delta.T @ delta
                n_samples = x.shape[0] if x.dim() > 1 else 1
                acc = sums.get(block)
                if acc is None:
                    sums[block] = [a_sum, g_sum, delta.shape[0], n_samples]
                elif acc[3] != n_samples:
                    raise ValueError(
                        f"KFAC.update_statistics: {block.name} was called on {acc[3]} and on {n_samples} samples in one "
                        "collect(); its calls count as extra locations of the same samples, so their inputs must agree "
                        "on the leading (sample) dimension"
                    )
                else:
                    acc[0], acc[1], acc[2] = acc[0] + a_sum, acc[1] + g_sum, acc[2] + delta.shape[0]
            if not sums:
                return False
            for acc in sums.values():
                locations = acc[2] // acc[3]  # T per sample
                if locations != 1:  # out of place: blocks fed the same input share one moment tensor
                    acc[0], acc[1] = acc[0] / locations**2, acc[1] * locations
            # a norm is finite only if every entry is: one fused reduction guards all factors
            norms = th._foreach_norm([t for a_sum, g_sum, *_ in sums.values() for t in (a_sum, g_sum)])
            if not bool(th.isfinite(th.stack(norms)).all()):
                self.counters["skipped_stats"] += 1
                warnings.warn("KFAC.update_statistics: non-finite statistics were ignored")
                return False
            # batch means (out of place: blocks fed the same input share one moment tensor), then
            # A ← ρ A + (1 − ρ) A_batch, fused over all running factors
            means = th._foreach_div(
                [t for a_sum, g_sum, *_ in sums.values() for t in (a_sum, g_sum)],
                [float(n_samples) for *_, n_samples in sums.values() for _ in range(2)],
            )
            running, batch = [], []
            for block, a_mean, g_mean in zip(sums, means[::2], means[1::2]):
                state = self.state[block.weight]
                if "A" not in state:  # the first batch initialises them
                    state["A"], state["G"] = a_mean, g_mean
                else:
                    running += [state["A"], state["G"]]
                    batch += [a_mean, g_mean]
            if running:
                th._foreach_mul_(running, self.stats_decay)
                th._foreach_add_(running, batch, alpha=1.0 - self.stats_decay)
        self.counters["stats_updates"] += 1
        return True

    # ------------------------------------------------------------------ curvature
    def _decompose(
        self, name: str, mat: th.Tensor, previous: tuple[th.Tensor, th.Tensor] | None, failures: list[str] | None
    ) -> tuple[th.Tensor, th.Tensor] | None:
        """
        Eigendecomposition with eigenvalue clamping, a float64 retry, and the previous basis as fallback.

        The factor is decomposed shifted by ``EIGENVALUE_FLOOR * I`` and the shift subtracted from the eigenvalues
        (same eigenvectors). A factor with exactly zero rows and columns -- inputs that were never active, such as
        the one-hot observations of states not visited yet, or dead units -- makes MKL's divide-and-conquer
        ``eigh`` fail to converge in float32 and float64 alike, however benign the rest of the matrix; the shift
        removes the exact zeros and is below the level at which eigenvalues are told from zero.

        Pure (it may run in the decomposition worker): a failure is appended to ``failures`` (if given), and
        counted / warned about by :meth:`_apply_curvature` in the calling thread.
        """
        for dtype in (mat.dtype, th.float64):
            shifted = mat.to(dtype, copy=True)
            shifted.diagonal().add_(EIGENVALUE_FLOOR)
            try:
                evals, evecs = th.linalg.eigh(shifted)
            except RuntimeError:
                continue
            if th.isfinite(evals).all() and th.isfinite(evecs).all():
                evals = evals - EIGENVALUE_FLOOR
                evals = th.where(evals < EIGENVALUE_FLOOR, th.zeros_like(evals), evals)
                return evals.to(mat.dtype), evecs.to(mat.dtype)
        if failures is not None:
            failures.append(
                f"KFAC: eigendecomposition of a factor of {name} failed ({_describe_factor(mat)}); "
                "keeping the previous basis"
            )
        return previous

    def _top_eigen(
        self,
        name: str,
        mat: th.Tensor,
        previous: tuple[th.Tensor, th.Tensor, th.Tensor] | None,
        failures: list[str],
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor] | None:
        """
        Top ``low_rank`` eigenpairs of a PSD factor by subspace iteration (several sweeps from a fixed random
        start, one sweep warm-started from the previous basis afterwards) and the mean remaining eigenvalue.

        :return: ``(eigenvalues, eigenvectors, complement eigenvalue)`` or the previous ones if this failed
        """
        dim, rank = mat.shape[0], self.low_rank
        assert rank is not None
        if previous is None:
            start = th.randn(dim, rank, generator=th.Generator().manual_seed(0), dtype=th.float64)
            basis, sweeps = start.to(mat.device, mat.dtype), 4
        else:
            basis, sweeps = previous[1], 1
        try:
            for _ in range(sweeps):
                basis = th.linalg.qr(mat @ basis).Q
            projected = basis.T @ mat @ basis
            result = self._decompose(name, (projected + projected.T) / 2, None, None)
        except RuntimeError:
            result = None
        if result is None:
            failures.append(f"KFAC: low-rank eigendecomposition of a factor of {name} failed; keeping the previous basis")
            return previous
        evals, rotation = result
        rest = ((mat.trace() - evals.sum()) / (dim - rank)).clamp(min=0.0)
        return evals, basis @ rotation, rest

    def _invert(
        self, name: str, mat: th.Tensor, shift: float, previous: th.Tensor | None, failures: list[str]
    ) -> th.Tensor | None:
        """Inverse of ``mat + shift I`` (Cholesky), with a float64 retry and the previous inverse as fallback."""
        for dtype in (mat.dtype, th.float64):
            shifted = mat.to(dtype) + shift * th.eye(mat.shape[0], dtype=dtype, device=mat.device)
            chol, info = th.linalg.cholesky_ex(shifted)
            if info.item() == 0:
                inv = th.cholesky_inverse(chol)
                if th.isfinite(inv).all():
                    return inv.to(mat.dtype)
        failures.append(f"KFAC: inversion of a factor of {name} failed; keeping the previous inverse")
        return previous

    def _block_damping(self) -> float:
        return self.damping + self.param_groups[0]["weight_decay"]

    def _is_low_rank(self, dim: int) -> bool:
        return self.low_rank is not None and dim > self.low_rank_min_dim and dim > self.low_rank

    # keys of a block's state that the curvature computation reads (factors) or writes (decompositions)
    _CURVATURE_KEYS = ("A", "G", "QA", "dA", "sA", "QG", "dG", "A_inv", "G_inv", "wA", "wA_rest")

    def _prepare_curvature(self, snapshot: bool) -> CurvatureJob:
        """
        The curvature work for the current factors (calling thread). Eigen mode: the full factors, grouped by
        size and stacked for one batched ``eigh`` per size (small networks have many same-size factors, and the
        per-call overhead is then most of the cost); the stacks are copies, so they are also the snapshot a
        background decomposition reads. With ``snapshot`` the factors the other paths read (low-rank, inverse
        mode) are copied too (:meth:`update_statistics` updates them in place); decompositions are only ever
        replaced, never modified in place, so they are passed by reference.
        """
        job = CurvatureJob()
        stacks: dict[tuple[int, th.dtype], list[tuple[KFACBlock, dict[str, th.Tensor], str, str, th.Tensor]]] = {}
        for block in self.blocks:
            state = self.state[block.weight]
            if "A" not in state:
                continue
            entries = {key: state[key] for key in self._CURVATURE_KEYS if key in state}
            low_rank = self._is_low_rank(entries["A"].shape[0])
            if self.inverse == "eigen":
                for key, q_key, d_key in (("A", "QA", "dA"), ("G", "QG", "dG"))[int(low_rank) :]:
                    mat = entries[key]
                    stacks.setdefault((mat.shape[0], mat.dtype), []).append((block, entries, d_key, q_key, mat))
            if snapshot and (low_rank or self.inverse != "eigen"):
                entries["A"] = entries["A"].clone()  # read by _top_eigen / the inverses in the worker
            if snapshot and self.inverse != "eigen":
                entries["G"] = entries["G"].clone()  # (eigen mode: G is in a stack, already a copy)
            job.blocks.append((block, entries, {}))
        for group in stacks.values():
            job.eigen_groups.append([(block, entries, d_key, q_key) for block, entries, d_key, q_key, _ in group])
            job.eigen_stacks.append(th.stack([mat for *_, mat in group]))
        return job

    @th.no_grad()
    def _compute_curvature(self, job: CurvatureJob, damping: float) -> None:
        """
        The decompositions (or inverses) of a prepared job, into ``job``. Reads only the job and the optimizer's
        configuration, so it can run in the background worker. In eigen mode with full-rank factors the work
        here is one ``eigh`` call per factor size, so the worker rarely needs the GIL (each time it may wait for
        the thread doing the rollout to release it); the checks run in :meth:`_apply_curvature`.
        """
        for block, state, out in job.blocks:
            low_rank = self._is_low_rank(state["A"].shape[0])
            if low_rank:
                previous = (state["dA"], state["QA"], state["sA"]) if "sA" in state else None
                result = self._top_eigen(block.name, state["A"], previous, job.failures)
                if result is not None:
                    out["dA"], out["QA"], out["sA"] = result
            if self.inverse == "eigen":
                continue
            dim_a, dim_g = state["A"].shape[0], state["G"].shape[0]
            mean_a, mean_g = state["A"].trace() / dim_a, state["G"].trace() / dim_g
            pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
            root = math.sqrt(damping)
            inv = self._invert(block.name, state["G"], root / pi, state.get("G_inv"), job.failures)
            if inv is not None:
                out["G_inv"] = inv
            if low_rank and "sA" in out:
                # (A + s I)⁻¹ on the kept eigenvectors and on their complement
                out["wA"], out["wA_rest"] = 1.0 / (out["dA"] + pi * root), 1.0 / (out["sA"] + pi * root)
            elif not low_rank:
                inv = self._invert(block.name, state["A"], pi * root, state.get("A_inv"), job.failures)
                if inv is not None:
                    out["A_inv"] = inv
        for stack in job.eigen_stacks:
            try:
                job.eigen_results.append(th.linalg.eigh(stack))
            except RuntimeError:
                job.eigen_results.append(None)

    def _apply_curvature(self, job: CurvatureJob, stats_updates: int) -> None:
        """
        Check a computed job, swap its decompositions into the state (calling thread only). A batched ``eigh``
        that failed or is not finite is redone factor by factor (:meth:`_decompose`: float64 retry, previous
        basis as fallback). ``stats_updates``: the statistics the job reflects.
        """
        outs = {block: out for block, _, out in job.blocks}
        results = job.eigen_results
        with th.no_grad():
            # a norm is finite only if every entry is: one fused reduction checks all batched results
            computed = [t for result in results if result is not None for t in result]
            all_finite = not computed or bool(th.isfinite(th.stack(th._foreach_norm(computed))).all())
            for group, stack, result in zip(job.eigen_groups, job.eigen_stacks, results, strict=True):
                if result is not None and (all_finite or bool(th.isfinite(result[0]).all() and th.isfinite(result[1]).all())):
                    evals = result[0].masked_fill(result[0] < EIGENVALUE_FLOOR, 0.0)
                    pairs: list[tuple[th.Tensor, th.Tensor] | None] = list(zip(evals.unbind(0), result[1].unbind(0)))
                else:
                    pairs = [
                        self._decompose(block.name, mat, (state[d_key], state[q_key]) if q_key in state else None, job.failures)
                        for (block, state, d_key, q_key), mat in zip(group, stack.unbind(0))
                    ]
                for (block, _, d_key, q_key), pair in zip(group, pairs):
                    if pair is not None:
                        outs[block][d_key], outs[block][q_key] = pair
        for block, out in outs.items():
            self.state[block.weight].update(out)
        for message in job.failures:
            self.counters["decomposition_failures"] += 1
            warnings.warn(message)
        self.counters["curvature_updates"] += 1
        self.counters["stats_at_curvature"] = stats_updates
        self._factors_stale = True

    @th.no_grad()
    def update_preconditioner(self) -> None:
        """
        Recompute the eigendecompositions (or inverses) of all running factors now, synchronously. A pending
        background decomposition (``async_decomposition``) is discarded: it would only be older.
        """
        self._discard_pending()
        self._follow_parameters()
        job = self._prepare_curvature(snapshot=False)
        self._compute_curvature(job, self._block_damping())
        self._apply_curvature(job, self.counters["stats_updates"])

    # ------------------------------------------------------------------ background decompositions
    def _submit_curvature(self) -> None:
        """Start decomposing a snapshot of the current factors in the worker thread (``async_decomposition``)."""
        self._discard_pending()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kfac-decomposition", initializer=_limit_worker_threads
            )
        job = self._prepare_curvature(snapshot=True)
        future = self._executor.submit(self._compute_curvature, job, self._block_damping())
        self._pending = (future, job, self.counters["stats_updates"])

    def _join_pending(self) -> None:
        """Wait for the background decomposition, if any, and swap its result in."""
        if self._pending is None:
            return
        future, job, stats_updates = self._pending
        self._pending = None
        future.result()
        self._apply_curvature(job, stats_updates)

    def _discard_pending(self) -> None:
        """Forget the background decomposition, if any (it only reads its own snapshot, so it may finish alone)."""
        if self._pending is not None:
            self._pending[0].cancel()
            self._pending = None

    def _solve_block(self, block: KFACBlock, mat: th.Tensor, refine: bool) -> th.Tensor | None:
        """
        ``(A ⊗ G + λI)⁻¹ vec(mat)`` for one block of a batch without stacked factors (a batch holding a low-rank
        block or one without curvature), or None if the block has no curvature yet.
        """
        if self._has_full_rank_solve(block):
            factors, mats = self._stack_factors([block]), mat.unsqueeze(0)
            return (self._refine([block], factors, mats) if refine else self._solve_batch(factors, mats))[0]
        state = self.state[block.weight]
        if "sA" not in state or not self._is_low_rank(state["A"].shape[0]):
            return None
        q_a = state["QA"]
        if self.inverse == "eigen":
            if "QG" not in state:
                return None
            q_g, damping = state["QG"], self._block_damping()
            rotated = q_g.T @ mat
            # kept eigenvectors of A get λ_G λ_A + λ, their complement λ_G σ + λ
            kept = rotated @ q_a
            rest = (state["dG"] * state["sA"] + damping)[:, None]
            kept = kept / (th.outer(state["dG"], state["dA"]) + damping) - kept / rest
            return q_g @ (kept @ q_a.T + rotated / rest)
        if "G_inv" not in state or "wA" not in state:
            return None
        left = state["G_inv"] @ mat
        return ((left @ q_a) * (state["wA"] - state["wA_rest"])) @ q_a.T + left * state["wA_rest"]

    def precondition(self, params: Sequence[nn.Parameter], vectors: Sequence[th.Tensor]) -> list[th.Tensor]:
        """
        Apply the current K-FAC inverse to vectors given per parameter (e.g. as a CG preconditioner).

        For a covered layer, weight and bias vectors are solved jointly (a missing one counts as zero and is not
        returned); other vectors, and layers without statistics, are returned unchanged. The solve of
        :meth:`step` is used: the current eigenbasis / inverses (computed now if statistics exist but were never
        decomposed), refined as there if statistics came after them; call :meth:`update_preconditioner` to
        refresh them after :meth:`update_statistics`.

        :param params: parameters the vectors belong to
        :param vectors: one tensor per parameter, of the parameter's shape
        :return: the preconditioned vectors, in the same order
        """
        if len(params) != len(vectors):
            raise ValueError(f"`params` and `vectors` differ in length ({len(params)} vs {len(vectors)})")
        self._join_pending()
        self._follow_parameters()
        if self.counters["curvature_updates"] == 0 and self.counters["stats_updates"] > 0:
            self.update_preconditioner()
        buffers = self._group_buffers()
        given = {id(p): v for p, v in zip(params, vectors)}
        with th.no_grad():
            for group in buffers:
                self._stage(group, [given.get(id(p)) for p in group.params])
            solved = self._solve_directions()
        directions = {id(p): view for group in buffers for p, view in zip(group.params, group.direction_views)}
        covered = {id(p) for block in solved for p in block.params}
        # copies: the next solve reuses the buffers
        return [directions[id(p)].clone() if id(p) in covered else v for p, v in zip(params, vectors)]

    # ------------------------------------------------------------------ step
    @th.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, refresh_curvature: bool = True
    ) -> float | None:
        """
        One K-FAC (or cold-start) step from the gradients in ``.grad``.

        A step whose preconditioned gradient or trust-region scale is not finite changes nothing (counted in
        ``counters["skipped_steps"]``).

        :param closure: optional closure re-evaluating the loss (and its gradients)
        :param refresh_curvature: False for a further step on the statistics of the previous one (e.g. ACKTR's
            extra critic steps): it keeps the current eigenbasis (a background decomposition stays in flight) and
            counts neither toward ``kfac_update`` nor toward ``cold_iter`` (``counters["extra_steps"]``)
        :return: the closure's loss, if any
        """
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        self.counters["steps" if refresh_curvature else "extra_steps"] += 1
        self._follow_parameters()
        buffers = self._group_buffers()
        grads = [[p.grad for p in group.params] for group in buffers]
        if all(grad is None for group_grads in grads for grad in group_grads):
            return loss

        if self.async_decomposition and refresh_curvature:
            self._join_pending()  # the decomposition started at the previous step, one update old
        new_stats = self.counters["stats_updates"] > self.counters["stats_at_curvature"]
        first = self.counters["curvature_updates"] == 0
        due = first or self.counters["steps"] - self.counters["steps_at_curvature"] >= self.kfac_update
        if refresh_curvature and new_stats and due:
            self.counters["steps_at_curvature"] = self.counters["steps"]
            if self.async_decomposition and not first:
                # decomposed in the background while the caller does other work (e.g. the next rollout);
                # this step keeps the current basis, the next one swaps the new basis in
                self._submit_curvature()
            else:
                self.update_preconditioner()

        weight_decay = self.param_groups[0]["weight_decay"]
        # per group: the positions of the parameters with a gradient
        present = [[i for i, grad in enumerate(group_grads) if grad is not None] for group_grads in grads]
        for group, group_grads, indices in zip(buffers, grads, present):
            self._stage(group, group_grads)
            if weight_decay > 0 and indices:
                views, params = [group.gradient_views[i] for i in indices], [group.params[i] for i in indices]
                th._foreach_add_(views, params, alpha=weight_decay)
        cold = self.counters["updates"] < self.cold_iter
        if cold:
            norm = th.linalg.vector_norm(th.stack([group.gradient.norm() for group in buffers]))
            clip = min(1.0, self.cold_max_grad_norm / (float(norm) + 1e-6))
            for group in buffers:
                th.mul(group.gradient, clip, out=group.direction)
        else:
            self._solve_directions()
        # quadratic model of the KL of the step: lr² Vᵀ F V = lr² Vᵀ ∇ (V = F⁻¹ ∇ in blocks; F = I for the raw
        # gradients outside blocks and for all of a cold step), one trust region per group
        terms = th.stack([th.dot(g.direction, g.direction if cold else g.gradient) for g in buffers]).tolist()
        self.last_vfv, self.last_nu = [], []
        for param_group, term in zip(self.param_groups, terms):
            vfv = param_group["lr"] ** 2 * term
            self.last_vfv.append(vfv)
            self.last_nu.append(1.0 if cold or not vfv > 0 else min(1.0, math.sqrt(param_group["kfac_clip"] / vfv)))
        if not all(math.isfinite(x) for x in self.last_vfv + self.last_nu):
            self.counters["skipped_steps"] += 1
            return loss

        for param_group, group, indices, nu in zip(self.param_groups, buffers, present, self.last_nu):
            if len(indices) == len(group.params):  # the flat buffers at once
                params, momentum_views = group.params, group.momentum_views
                momentum, directions = [group.momentum], [group.direction]
            else:  # parameters without a gradient keep their momentum buffer and value
                if not indices:
                    continue
                params = [group.params[i] for i in indices]
                momentum = momentum_views = [group.momentum_views[i] for i in indices]
                directions = [group.direction_views[i] for i in indices]
            th._foreach_mul_(momentum, param_group["momentum"])
            th._foreach_add_(momentum, directions, alpha=nu)
            th._foreach_add_(params, momentum_views, alpha=-param_group["lr"] * (1.0 - param_group["momentum"]))
        if refresh_curvature:
            self.counters["updates"] += 1
        return loss

    @staticmethod
    def _stage(group: GroupBuffers, tensors: list[th.Tensor | None]) -> None:
        """Copy per-parameter tensors (None: zeros) into the group's gradient buffer."""
        given = [(view, tensor) for view, tensor in zip(group.gradient_views, tensors) if tensor is not None]
        if len(given) < len(tensors):
            group.gradient.zero_()
        if given:
            th._foreach_copy_([view for view, _ in given], [tensor for _, tensor in given])

    def _solve_directions(self) -> set[KFACBlock]:
        """
        Fill the direction buffers from the gradient buffers: the K-FAC solve in blocks with curvature (same-shape
        blocks together: batched matmuls keep the per-step overhead small for small networks), the gradient
        itself elsewhere.

        :return: the blocks that were solved
        """
        if self._factors_stale:
            self._update_factors()
        # a decomposition of the current factors solves exactly: refine only when statistics came after it
        refine = self.refine_iterations > 0 and self.counters["stats_updates"] > self.counters["stats_at_curvature"]
        solved: set[KFACBlock] = set()
        for group in self._group_buffers():
            if group.raw_start < group.gradient.numel():
                group.direction[group.raw_start :].copy_(group.gradient[group.raw_start :])
            for batch in group.batches:
                if batch.factors is not None:
                    if refine:
                        batch.directions.copy_(self._refine(batch.blocks, batch.factors, batch.gradients))
                    else:
                        self._solve_batch(batch.factors, batch.gradients, out=batch.directions)
                    solved.update(batch.blocks)
                    continue
                for block, gradient, direction in zip(batch.blocks, batch.gradients, batch.directions):
                    result = self._solve_block(block, gradient, refine)
                    direction.copy_(gradient if result is None else result)
                    if result is not None:
                        solved.add(block)
        return solved

    def _solve_batch(self, factors: tuple[th.Tensor, ...], mats: th.Tensor, out: th.Tensor | None = None) -> th.Tensor:
        """The last decomposition's solve of stacked same-shape block matrices (``factors`` from :meth:`_update_factors`)."""
        # th.bmm rather than @: the generic matmul's broadcasting checks cost more than these small products
        if self.inverse == "eigen":
            q_g, q_g_t, q_a, q_a_t, scale = factors
            return th.bmm(th.bmm(q_g, th.bmm(th.bmm(q_g_t, mats), q_a) * scale), q_a_t, out=out)
        g_inv, a_inv = factors
        return th.bmm(th.bmm(g_inv, mats), a_inv, out=out)

    def _refine(self, blocks: list[KFACBlock], factors: tuple[th.Tensor, ...], mats: th.Tensor) -> th.Tensor:
        """
        ``refine_iterations`` of preconditioned CG on ``(A ⊗ G + λI) X = mats`` per block, with the blocks' current
        factors and the last decomposition (``factors``) as preconditioner, started from zero. Non-finite input
        stays non-finite (the step then refuses it).
        """
        states = [self.state[b.weight] for b in blocks]
        g, a = th.stack([st["G"] for st in states]), th.stack([st["A"] for st in states])
        damping, tiny = self._block_damping(), th.finfo(mats.dtype).tiny
        residual = mats
        preconditioned = self._solve_batch(factors, residual)
        direction, solved = preconditioned, th.zeros_like(mats)
        r_dot_z = (residual * preconditioned).sum(dim=(1, 2), keepdim=True)
        for iteration in range(self.refine_iterations):
            product = th.baddbmm(direction, g, th.bmm(direction, a), beta=damping)  # (A ⊗ G + λI) vec(direction)
            # a zero gradient gives 0 / 0: the clamped denominator keeps its step zero and lets a NaN through
            alpha = r_dot_z / (direction * product).sum(dim=(1, 2), keepdim=True).clamp(min=tiny)
            solved = th.addcmul(solved, alpha, direction)
            if iteration + 1 == self.refine_iterations:
                break
            residual = th.addcmul(residual, alpha, product, value=-1.0)
            preconditioned = self._solve_batch(factors, residual)
            r_dot_z_next = (residual * preconditioned).sum(dim=(1, 2), keepdim=True)
            direction = th.addcmul(preconditioned, r_dot_z_next / r_dot_z.clamp(min=tiny), direction)
            r_dot_z = r_dot_z_next
        return solved

    def _has_full_rank_solve(self, block: KFACBlock) -> bool:
        """Whether a block has full-rank factors and their decompositions (or inverses)."""
        state = self.state[block.weight]
        keys = ("QA", "QG") if self.inverse == "eigen" else ("A_inv", "G_inv")
        return not self._is_low_rank(block.matrix_shape[1]) and all(key in state for key in keys)

    def _stack_factors(self, blocks: list[KFACBlock]) -> tuple[th.Tensor, ...]:
        """The solve factors of full-rank same-shape blocks, stacked for :meth:`_solve_batch`."""
        states = [self.state[b.weight] for b in blocks]
        if self.inverse == "inverse":
            return th.stack([st["G_inv"] for st in states]), th.stack([st["A_inv"] for st in states])
        q_g, q_a = th.stack([st["QG"] for st in states]), th.stack([st["QA"] for st in states])
        d_g, d_a = th.stack([st["dG"] for st in states]), th.stack([st["dA"] for st in states])
        scale = (d_g.unsqueeze(2) * d_a.unsqueeze(1) + self._block_damping()).reciprocal_()
        # contiguous transposes: batched matmuls with a transposed operand were 30% slower (64 x 65 blocks)
        return q_g, q_g.mT.contiguous(), q_a, q_a.mT.contiguous(), scale

    def _update_factors(self) -> None:
        """Stack each batch's solve factors after a curvature update (None: its blocks are solved one by one)."""
        for group in self._group_buffers():
            for batch in group.batches:
                ready = all(self._has_full_rank_solve(block) for block in batch.blocks)
                batch.factors = self._stack_factors(batch.blocks) if ready else None
        self._factors_stale = False

    def _group_buffers(self) -> list[GroupBuffers]:
        """The flat buffers of each parameter group (built on first use, and after loading or adding groups)."""
        if self._buffers is None or len(self._buffers) != len(self.param_groups):
            self._buffers = [self._make_group_buffers(i, group["params"]) for i, group in enumerate(self.param_groups)]
            self._factors_stale = True
        return self._buffers

    def _make_group_buffers(self, index: int, params: list[nn.Parameter]) -> GroupBuffers:
        """Lay out a group's flat buffers; momentum buffers it already has (e.g. loaded ones) move into them."""
        shapes: dict[tuple[int, int], list[KFACBlock]] = {}
        for block in self.blocks:
            if self._block_group[block] == index:
                shapes.setdefault(block.matrix_shape, []).append(block)
        in_blocks = {id(p) for blocks in shapes.values() for block in blocks for p in block.params}
        raw = [p for p in params if id(p) not in in_blocks]
        raw_start = sum(len(blocks) * rows * cols for (rows, cols), blocks in shapes.items())
        size = raw_start + sum(p.numel() for p in raw)
        flats = [th.zeros(size, dtype=params[0].dtype, device=params[0].device) for _ in range(3)]
        views: dict[int, list[th.Tensor]] = {}  # per parameter, its view into each flat buffer
        batches, offset = [], 0
        for (rows, cols), blocks in shapes.items():
            end = offset + len(blocks) * rows * cols
            mats = [flat[offset:end].view(len(blocks), rows, cols) for flat in flats]
            for position, block in enumerate(blocks):
                parts = [block.from_matrix(mat[position]) for mat in mats]
                views[id(block.weight)] = [weight for weight, _ in parts]
                if block.bias is not None:
                    views[id(block.bias)] = [bias for _, bias in parts]  # type: ignore[misc]
            batches.append(SolveBatch(blocks, mats[0], mats[1]))
            offset = end
        for p in raw:
            views[id(p)] = [flat[offset : offset + p.numel()].view_as(p) for flat in flats]
            offset += p.numel()
        for p in params:
            state = self.state[p]
            if "momentum_buffer" in state:
                views[id(p)][2].copy_(state["momentum_buffer"])
            state["momentum_buffer"] = views[id(p)][2]
        gradient_views, direction_views, momentum_views = ([views[id(p)][i] for p in params] for i in range(3))
        return GroupBuffers(params, *flats, gradient_views, direction_views, momentum_views, batches, raw_start)

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Per-parameter state (momentum buffers, factors, eigenbases / inverses), param groups and counters."""
        self._join_pending()  # the saved state is then the one the next step would use
        state_dict = super().state_dict()
        state_dict["kfac_counters"] = dict(self.counters)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """
        :param state_dict: as returned by :meth:`state_dict`
        """
        self._discard_pending()  # computed from the factors being replaced
        # a copy: torch's loader keeps the given tensors, which the optimizer they came from may update in place
        state_dict = copy.deepcopy(state_dict)
        counters = state_dict.pop("kfac_counters", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("kfac_clip", self.kfac_clip)  # saved before groups had their own radius
        self._buffers = None  # the loaded momentum buffers move into new flat buffers at the next step
        self._group_kinds = [self._group_kind(group["params"]) for group in self.param_groups]  # torch converted it
        if counters is not None:
            self.counters.update(counters)
