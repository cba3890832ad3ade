"""
The K-FAC solve: direction buffers from gradient buffers, ``V = (A ⊗ G + λI)⁻¹ ∇`` in every block with curvature
(same-shape blocks in one batched solve) and ``V = ∇`` elsewhere, optionally refined by conjugate gradient on the
current factors when they are newer than the decompositions.
"""

import torch as th

from sb3_trpo_kfac.common.kfac.blocks import KFACBlock
from sb3_trpo_kfac.common.kfac.curvature import BlockCurvature
from sb3_trpo_kfac.common.kfac.gradient_rows import rows_scale, with_ones
from sb3_trpo_kfac.common.kfac.layout import GroupBuffers
from sb3_trpo_kfac.common.kfac.statistics import KroneckerFactors


class KroneckerSolver:
    """
    :param refine_iterations: iterations of preconditioned CG on ``(A ⊗ G + λI) V = ∇`` for the current factors, the
        last decompositions being the preconditioner, in solves asked to refine (0: none). CG from zero keeps
        ``⟨V, (A ⊗ G + λI) V⟩ = ⟨V, ∇⟩``, so a trust region computed from ``⟨V, ∇⟩`` stays exact. Blocks with a
        low-rank input factor are not refined (their product would cost what the low rank saves).
    """

    def __init__(self, refine_iterations: int) -> None:
        self.refine_iterations = refine_iterations

    @staticmethod
    def restack(groups: list[GroupBuffers], curvature: dict[KFACBlock, BlockCurvature], damping: float) -> None:
        """Stack each batch's solve factors after a curvature update (None: its blocks are solved one by one)."""
        for group in groups:
            for batch in group.batches:
                curvatures = [curvature[block] for block in batch.blocks]
                ready = all(c.stackable and c.ready for c in curvatures)
                batch.factors = type(curvatures[0]).stack(curvatures, damping) if ready else None

    def solve(
        self,
        groups: list[GroupBuffers],
        curvature: dict[KFACBlock, BlockCurvature],
        factors: dict[KFACBlock, KroneckerFactors],
        damping: float,
        refine: bool,
        rows: dict[KFACBlock, tuple[th.Tensor, th.Tensor]] | None = None,
    ) -> set[KFACBlock]:
        """
        Fill the direction buffers from the gradient buffers (stacked factors from :meth:`restack`).

        :param refine: refine by CG on ``factors`` (the current ones) if ``refine_iterations`` > 0
        :param rows: per block, the rows ``(δ, ā)`` its gradient may be a multiple of (:mod:`.gradient_rows`): solved
            from them where that is checked and cheaper
        :return: the blocks that were solved (the others keep their gradient)
        """
        rows = rows or {}
        refine = refine and self.refine_iterations > 0
        solved: set[KFACBlock] = set()
        for group in groups:
            if group.raw_start < group.gradient.numel():
                group.direction[group.raw_start :].copy_(group.gradient[group.raw_start :])
            for batch in group.batches:
                if batch.factors is not None:
                    kind = type(curvature[batch.blocks[0]])
                    if refine:
                        batch.directions.copy_(
                            self.refine(
                                kind, batch.factors, [factors[b] for b in batch.blocks], batch.gradients, damping
                            )
                        )
                    else:
                        kind.solve_stacked(batch.factors, batch.gradients, out=batch.directions)
                    solved.update(batch.blocks)
                    continue
                for block, gradient, direction in zip(batch.blocks, batch.gradients, batch.directions):
                    rep = curvature[block]
                    if self._solve_rows(block, rep, rows.get(block), gradient, damping, direction) or self._solve_block(
                        rep, factors.get(block), gradient, damping, refine, direction
                    ):
                        solved.add(block)
                    else:
                        direction.copy_(gradient)
        return solved

    @staticmethod
    def _solve_rows(
        block: KFACBlock,
        curvature: BlockCurvature,
        block_rows: tuple[th.Tensor, th.Tensor] | None,
        mat: th.Tensor,
        damping: float,
        out: th.Tensor,
    ) -> bool:
        """One block from its gradient's rows, into ``out``, if they pay off and ``mat`` is checked to be their
        multiple; False otherwise (nothing written). Such blocks are never refined (see the class)."""
        if block_rows is None or not curvature.ready or not curvature.rows_pay_off(block_rows[0].shape[0]):
            return False
        deltas, inputs = block_rows[0], with_ones(block, block_rows[1])  # padded only once the rows are used
        scale = rows_scale(mat, deltas, inputs)
        if scale is None:
            return False
        curvature.solve_rows_into(deltas, inputs, scale, damping, out)
        return True

    def _solve_block(
        self,
        curvature: BlockCurvature,
        factors: KroneckerFactors | None,
        mat: th.Tensor,
        damping: float,
        refine: bool,
        out: th.Tensor,
    ) -> bool:
        """One block of a batch without stacked factors, into ``out``; False if it has no curvature yet."""
        if not curvature.ready:
            return False
        if curvature.stackable and refine and factors is not None:
            out.copy_(
                self.refine(
                    type(curvature), curvature.stack([curvature], damping), [factors], mat.unsqueeze(0), damping
                )[0]
            )
        else:
            curvature.solve_into(mat, damping, out)
        return True

    def refine(
        self,
        kind: type[BlockCurvature],
        stacked: tuple[th.Tensor, ...],
        factors: list[KroneckerFactors],
        mats: th.Tensor,
        damping: float,
    ) -> th.Tensor:
        """
        ``refine_iterations`` of preconditioned CG on ``(A ⊗ G + λI) X = mats`` per block, with the blocks' current
        ``factors`` and the last decompositions (``stacked``, of representation ``kind``) as preconditioner, started
        from zero. Non-finite input stays non-finite (the step then refuses it).
        """
        g, a = th.stack([f.g for f in factors]), th.stack([f.a for f in factors])
        tiny = th.finfo(mats.dtype).tiny
        residual = mats
        preconditioned = kind.solve_stacked(stacked, residual)
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
            preconditioned = kind.solve_stacked(stacked, residual)
            r_dot_z_next = (residual * preconditioned).sum(dim=(1, 2), keepdim=True)
            direction = th.addcmul(preconditioned, r_dot_z_next / r_dot_z.clamp(min=tiny), direction)
            r_dot_z = r_dot_z_next
        return solved
