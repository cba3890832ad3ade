"""
Large products. With a wide output (NatureCNN's 3137 x 3137 input moment, a 512 x 3137 solve): computed by blocks of rows,
each block's output and the right side staying in cache. In one call MKL ran these shapes (a short inner dimension,
an output of millions of entries) well below its speed on square products; by blocks the result is the same. A block
of 32 rows of a 3137-wide output (400 KB) leaves room in a 1 MiB L2 cache for the right side's panel; 64 rows
did not. A symmetric product (a conv's patch moment) is computed as one triangle and mirrored.
"""

import torch as th

# rows per block of a wide product, and the output size from which products are blocked
ROW_BLOCK = 32
WIDE_OUTPUT = 2**20
# rows per panel of a symmetric product
GRAM_PANEL = 64


def wide_mm(left: th.Tensor, right: th.Tensor, out: th.Tensor, add: th.Tensor | None = None, beta: float = 1.0) -> th.Tensor:
    """``out = left @ right`` (plus ``beta · add``), by blocks of :data:`ROW_BLOCK` rows if ``out`` is wide."""
    step = ROW_BLOCK if out.numel() >= WIDE_OUTPUT else out.shape[0]
    for start in range(0, out.shape[0], step):
        rows = slice(start, start + step)
        if add is None:
            th.mm(left[rows], right, out=out[rows])
        else:
            th.addmm(add[rows], left[rows], right, beta=beta, out=out[rows])
    return out


def symmetric_gram(mat: th.Tensor, out: th.Tensor) -> th.Tensor:
    """
    ``out = mat @ matᵀ`` from the triangle on and above the diagonal, by panels of :data:`GRAM_PANEL` rows, mirrored
    below: about half the products of the full one (a conv's patch moment, whose inner side is long); equal to the
    full product up to rounding.
    """
    dim = mat.shape[0]
    for start in range(0, dim, GRAM_PANEL):
        stop = min(start + GRAM_PANEL, dim)
        th.mm(mat[start:stop], mat[start:].T, out=out[start:stop, start:])
        out[start:stop, :start].copy_(out[:start, start:stop].T)
    return out
