"""
K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens
2016) with the trust-region step-size clipping of ACKTR (Wu et al. 2017).

Every ``nn.Linear`` and ``nn.Conv2d`` of the model is a block whose Fisher is approximated by ``A ⊗ G``: ``A`` the
second moment of the layer input (with a homogeneous 1 for the bias, so the block's parameters are ``W̄ = [W, b]`` of
shape ``out x (in + 1)``) and ``G`` that of the gradient of a *sampled* loss with respect to the layer output
(pre-activation). The statistics are only gathered on request, from a Fisher loss you give, so plain forward passes
(e.g. ``no_grad`` rollouts) are never counted and ``.grad`` is never touched by them. A parameter has exactly one block:
modules that share a weight and its bias (tied weights) are one block; any other use of a block's parameter is refused
at construction. Parameters outside a block (normalisation layers, ``log_std``, embeddings, grouped convolutions) keep
their raw gradient; they are counted in the trust region and scaled with the rest.

The package, in the order of the math:

- :mod:`.blocks`: which parameters form a block, and the rows ``ā``, ``δ`` a layer call contributes;
- :mod:`.statistics`: the collect context, the Fisher loss's backward, running averages, the finiteness guard;
- :mod:`.curvature` (:mod:`.eigen`, :mod:`.inverse`, :mod:`.low_rank`): ``(A ⊗ G + λI)⁻¹`` per block;
- :mod:`.decomposition`: curvature updates, batched by factor size, optionally in a background thread;
- :mod:`.distributed`: data-parallel ranks (``torch.distributed``): statistics of all ranks' samples, decompositions
  replicated or split across ranks;
- :mod:`.layout`, :mod:`.solve`: flat buffers, batched same-shape solves and CG refinement; :mod:`.gradient_rows`:
  a large low-rank layer's gradient solved from its rows ``δᵀā`` at small batches; :mod:`.products`: wide products
  by blocks;
- :mod:`.schedule`: the cadence (curvature refreshes, cold start) and the counters;
- :mod:`.preconditioner`: :class:`KFACPreconditioner`, gradients to trust-region-scaled natural gradients;
- :mod:`.optimizer`: :class:`KFAC`, the preconditioner plus a first-order step rule, as a ``torch.optim.Optimizer``.

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

Each parameter group is its own trust region, with its own ``lr``, ``momentum`` and ``kfac_clip``::

    KFAC(model, params=[{"params": actor.parameters()}, {"params": critic.parameters(), "kfac_clip": 0.1}])

Any first-order optimizer can step on the preconditioned gradient instead of the paper's momentum SGD::

    KFAC(model, lr=1e-3, optimizer_class=th.optim.Adam, optimizer_kwargs=dict(betas=(0.9, 0.99)))
"""

from sb3_trpo_kfac.common.kfac.blocks import Conv2dBlock, KFACBlock, LinearBlock
from sb3_trpo_kfac.common.kfac.curvature import EIGENVALUE_FLOOR, INVERSE_MODES, BlockCurvature
from sb3_trpo_kfac.common.kfac.optimizer import KFAC
from sb3_trpo_kfac.common.kfac.preconditioner import KFACPreconditioner
from sb3_trpo_kfac.common.kfac.schedule import KFACCounters

__all__ = [
    "EIGENVALUE_FLOOR",
    "INVERSE_MODES",
    "KFAC",
    "BlockCurvature",
    "Conv2dBlock",
    "KFACBlock",
    "KFACCounters",
    "KFACPreconditioner",
    "LinearBlock",
]
