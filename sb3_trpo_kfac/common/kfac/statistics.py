"""
K-FAC statistics: running averages of the Kronecker factors ``A = E[ā āᵀ]`` and ``G = E[δ δᵀ]`` of every block.

Only on request: inside :meth:`FactorStatistics.collect`, forward hooks save each covered layer's input and output;
:meth:`FactorStatistics.update` then takes ``δ = ∂ fisher_loss / ∂ (layer output)`` by one ``torch.autograd.grad``
(graph retained, ``.grad`` untouched). Plain forwards (e.g. ``no_grad`` rollouts) are never counted.
"""

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch as th
from torch import nn

from sb3_trpo_kfac.common.distributed import is_data_parallel
from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.distributed import all_reduce_moments
from sb3_trpo_kfac.common.kfac.schedule import KFACCounters

# moments from this many entries (a 1024-wide factor) are kept for reuse after folding
SPARE_MIN_ELEMENTS = 2**20
# one saved call of a block's layer: (the module called, its input, the input's version counter, its output)
SavedCall = tuple[nn.Module, th.Tensor, int, th.Tensor]


def subsample_indices(n: int, k: int, seed: int) -> th.Tensor:
    """``k`` of ``range(n)`` drawn uniformly without replacement by a generator seeded with ``seed``, sorted."""
    return th.randperm(n, generator=th.Generator().manual_seed(seed))[:k].sort().values


@dataclasses.dataclass
class KroneckerFactors:
    """The running Kronecker factors of one block: ``A`` (input side, ``in + 1``) and ``G`` (output side, ``out``)."""

    a: th.Tensor
    g: th.Tensor


class FactorStatistics:
    """
    Collects forwards and keeps the running factors of a set of blocks.

    One convention for every layer kind (KFC, Grosse & Martens 2016, with baselines' scaling): a block's rows are its
    *locations*, ``T`` per sample: the output positions of a Conv2d, the positions ``T`` of a Linear applied to
    ``(N, T, in)`` inputs, and, for a layer called ``k`` times in the forward (or tied layers), the rows of all calls,
    so ``T = rows of all calls / N``. Then ``A = Σ (ā/T)(ā/T)ᵀ / N`` and ``G = T² · mean δ δᵀ`` over samples x
    locations; for a plain ``(N, in)`` Linear (``T = 1``) ``A = mean ā āᵀ`` and ``G = mean δ δᵀ``. A Linear and the
    equivalent 1x1 Conv2d thus get the same factors. Running averages: ``A ← ρ A + (1 − ρ) A_batch``, initialised by
    the first batch.

    With ``max_samples``, ``A_batch`` and ``G_batch`` are the means over ``max_samples`` of the ``N`` samples, drawn
    uniformly without replacement (the same for every layer and call with ``N`` samples): each is then an unbiased
    estimate of the full batch's mean, at ``max_samples / N`` of the cost of the factor products (the backward that
    gives ``δ`` still runs on the whole batch). The draw comes from a generator seeded with the number of statistics
    updates so far: deterministic, independent of torch's global random state, and the same after a reload.

    :param blocks: the blocks
    :param stats_decay: ρ
    :param counters: counts successful and refused updates
    :param max_samples: samples per statistics update (None: all)
    """

    def __init__(
        self, blocks: list[KFACBlock], stats_decay: float, counters: KFACCounters, max_samples: int | None = None
    ) -> None:
        self.blocks = blocks
        self.stats_decay = stats_decay
        self.counters = counters
        self.max_samples = max_samples
        self.factors: dict[KFACBlock, KroneckerFactors] = {}
        self._saved: dict[KFACBlock, list[SavedCall]] = {}
        # batch moments already folded into the running factors, reused for the next update's (see _fold)
        self._spares: list[th.Tensor] = []
        # forward hooks exist only inside collect(): a module with hooks takes a slower call path, which every
        # rollout forward would otherwise pay
        self._hooks: list[th.utils.hooks.RemovableHandle] = []
        self._hooks_enabled = True

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Context in which forward passes of covered layers are saved for :meth:`update`."""
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

    def _make_hook(self, block: KFACBlock) -> Callable[..., th.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple[th.Tensor, ...], output: th.Tensor) -> th.Tensor | None:
            # only forwards that build a graph
            if not (th.is_grad_enabled() and output.requires_grad):
                return None
            x = inputs[0].detach()  # shares the version counter: an in-place change is seen in update()
            # the version counter has no public accessor; it is how autograd itself detects such changes
            self._saved.setdefault(block, []).append((module, x, x._version, output))
            # the model continues with a copy, so that an in-place op after the layer (e.g. ReLU(inplace=True))
            # changes the copy and δ stays the gradient with respect to the layer's own output
            return output.clone()

        return hook

    def remove_hooks(self) -> None:
        """Stop saving forwards in :meth:`collect` for good (only the statistics gathered so far are used)."""
        self._hooks_enabled = False
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def take_saved(self) -> list[tuple[KFACBlock, nn.Module, th.Tensor, th.Tensor]] | None:
        """
        The calls saved by the last :meth:`collect` that have samples, as ``(block, module, input, output)``; None
        (with a warning) if there is none. A layer input modified in place after its forward raises a RuntimeError.
        """
        saved, self._saved = self._saved, {}
        calls = [(block, *call) for block, block_calls in saved.items() for call in block_calls]
        if not calls:
            warnings.warn(
                "KFAC.update_statistics: no forward of a covered layer was saved; call the model inside collect()"
            )
            return None
        for block, _, x, version, _ in calls:
            if x._version != version:
                raise RuntimeError(
                    f"KFAC.update_statistics: the input of {block.name} was modified in place after its forward; "
                    "its statistics would not be those of the forward (use an out-of-place op)"
                )
        with_samples = [(block, module, x, out) for block, module, x, _, out in calls if out.numel() > 0]
        if not with_samples:
            warnings.warn("KFAC.update_statistics: the saved forwards have no samples; the statistics are unchanged")
            return None
        return with_samples

    def update(self, fisher_loss: th.Tensor, calls: list[tuple[KFACBlock, nn.Module, th.Tensor, th.Tensor]]) -> bool:
        """
        Fold the calls into the running factors.

        ``N`` is the leading dimension of the layer input (1 for an unbatched input); every call of a block must see
        the same ``N`` (a ValueError otherwise, before any change). A block none of whose calls has rows keeps its
        factors.

        :param fisher_loss: scalar, *sum* over the N samples of the sampled negative log-likelihood
        :param calls: from :meth:`take_saved`
        :return: whether the factors were updated (False if no call reaches the loss or the statistics are not finite)
        """
        outputs = [out for *_, out in calls]
        # a data-parallel rank without samples still joins the others' reduction below
        deltas = th.autograd.grad(fisher_loss, outputs, retain_graph=True, allow_unused=True) if calls else []
        # per block: [Σ ā āᵀ, Σ δ δᵀ, rows, N] over its calls
        sums: dict[KFACBlock, list[Any]] = {}
        shared: dict[tuple[object, ...], th.Tensor] = {}
        picked: dict[Any, th.Tensor] = {}
        with th.no_grad():
            for (block, module, x, _), delta in zip(calls, deltas):
                if delta is None:
                    continue
                if self.max_samples is not None and block.batched(x) and x.shape[0] > self.max_samples:
                    x, delta = self._subsample(x, delta, picked)
                a_sum, g_sum, rows, n_samples = block.call_moments(module, x, delta, shared, self._spares)
                acc = sums.get(block)
                if acc is None:
                    sums[block] = [a_sum, g_sum, rows, n_samples]
                elif acc[3] != n_samples:
                    raise ValueError(
                        f"KFAC.update_statistics: {block.name} was called on {acc[3]} and on {n_samples} samples in "
                        "one collect(); its calls count as extra locations of the same samples, so their inputs must "
                        "agree on the leading (sample) dimension"
                    )
                else:
                    acc[0], acc[1], acc[2] = acc[0] + a_sum, acc[1] + g_sum, acc[2] + rows
            for acc in sums.values():
                locations = acc[2] // acc[3]  # T per sample
                if locations != 1:  # out of place: blocks fed the same input share one moment tensor
                    acc[0], acc[1] = acc[0] / locations**2, acc[1] * locations
            if is_data_parallel():  # the sums and counts of all ranks' samples
                sums = all_reduce_moments(self.blocks, sums)
            if not sums:
                return False
            moments = [t for a_sum, g_sum, *_ in sums.values() for t in (a_sum, g_sum)]
            # a norm is finite only if every entry is: one fused reduction guards all factors (torch's _foreach
            # kernels are private, but one call for all blocks is what keeps small networks cheap)
            if not bool(th.isfinite(th.stack(th._foreach_norm(moments))).all()):
                self.counters.skipped_stats += 1
                warnings.warn("KFAC.update_statistics: non-finite statistics were ignored")
                return False
            # batch means, in place (a fresh copy of a large factor costs as much as the division): once per tensor,
            # since blocks fed the same input share one moment tensor; one _foreach call
            counts = [float(n_samples) for *_, n_samples in sums.values() for _ in range(2)]
            unique = {id(t): (t, n) for t, n in zip(moments, counts)}
            th._foreach_div_([t for t, _ in unique.values()], [n for _, n in unique.values()])
            self._fold(list(sums), moments[::2], moments[1::2])
        self.counters.stats_updates += 1
        return True

    def _subsample(self, x: th.Tensor, delta: th.Tensor, picked: dict[Any, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        """The rows of ``max_samples`` random samples of a call; ``picked`` keeps the draw per ``N`` and the picked
        inputs, so that blocks fed the same input still share its moment (:meth:`LinearBlock.call_moments`)."""
        n = x.shape[0]
        index = picked.get(n)
        if index is None:
            assert self.max_samples is not None
            seed = self.counters.stats_updates + self.counters.skipped_stats
            index = picked[n] = subsample_indices(n, self.max_samples, seed).to(x.device)
        key = (x.data_ptr(), x._version, tuple(x.shape), x.stride())
        rows = picked.get(key)
        if rows is None:
            rows = picked[key] = x.index_select(0, index)
        return rows, delta.index_select(0, index)

    def _fold(self, blocks: list[KFACBlock], a_means: Sequence[th.Tensor], g_means: Sequence[th.Tensor]) -> None:
        """
        ``F ← ρ F + (1 − ρ) F_batch`` for every factor, fused over all of them; the first batch initialises them.

        Blocks fed the same input (one batch moment, e.g. an actor and a critic head on shared features) share one
        running input factor, folded once, so that it is also decomposed once (:mod:`.decomposition`); equal running
        factors of such blocks (e.g. after a reload) are merged, and a shared one whose blocks' batch moments differ
        is split. Running factors are told apart by their memory, never folded twice.
        """
        folds: dict[int, tuple[th.Tensor, th.Tensor]] = {}  # memory of a running factor -> (it, its batch moment)
        by_batch: dict[int, th.Tensor] = {}  # id of a batch moment -> the running factor it is folded into
        new: list[tuple[KFACBlock, th.Tensor, th.Tensor]] = []
        for block, a_mean, g_mean in zip(blocks, a_means, g_means):
            factors = self.factors.get(block)
            if factors is None:
                new.append((block, a_mean, g_mean))
                continue
            for side, mean in (("a", a_mean), ("g", g_mean)):
                factor = getattr(factors, side)
                other = by_batch.get(id(mean))
                if other is not None and other.data_ptr() != factor.data_ptr() and th.equal(other, factor):
                    factor = other  # the same statistics: shared from now on
                fold = folds.get(factor.data_ptr())
                if fold is not None and fold[1] is not mean:
                    factor = factor.clone()  # shared, but fed differently now: split
                setattr(factors, side, factor)
                folds.setdefault(factor.data_ptr(), (factor, mean))
                by_batch.setdefault(id(mean), factor)
        taken: dict[int, th.Tensor] = {}  # id of a batch moment -> the new running factor made of it
        for block, a_mean, g_mean in new:
            initial = []
            for mean in (a_mean, g_mean):
                if id(mean) not in taken:  # a moment also folded above stays a batch moment: copied
                    taken[id(mean)] = mean.clone() if id(mean) in by_batch else mean
                initial.append(taken[id(mean)])
            self.factors[block] = KroneckerFactors(*initial)
        if folds:  # torch's private _foreach kernels: two calls whatever the block count
            running, batch = zip(*folds.values())
            th._foreach_mul_(list(running), self.stats_decay)
            th._foreach_add_(list(running), list(batch), alpha=1.0 - self.stats_decay)
        # the folded batch moments that own their memory (not views, e.g. of a data-parallel reduction) become the
        # next update's spares; only large ones, whose fresh allocation is what costs
        spares = {id(t): t for _, t in folds.values() if t.numel() >= SPARE_MIN_ELEMENTS and t._base is None}
        self._spares = list(spares.values())
