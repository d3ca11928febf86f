"""Exact torch implementations of the ``vtr.kernels`` operations.

These are the reference semantics: the Triton kernels must return the same picks. They run on any device
and are what the dispatcher uses for non-CUDA tensors. ``maxmin_select_torch`` is THE implementation of
DivPrune's greedy max-min selection (``vtr.ops.divprune.divprune_select`` wraps it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "BLOCK_ROWS",
    "DENSE_MAX_TOKENS",
    "EPS",
    "bipartite_best_match_torch",
    "cosine_similarity_torch",
    "maxmin_greedy_torch",
    "maxmin_prepare_torch",
    "maxmin_select_torch",
    "normalise",
    "unit_rows",
]

#: Norm floor: ``u = x / max(||x||, EPS)`` (a zero row becomes the zero vector).
EPS = 1e-12
#: Above this many tokens the M x M distance matrix is never materialised.
DENSE_MAX_TOKENS = 8192
#: Rows per block when computing nearest-neighbour distances without the full matrix.
BLOCK_ROWS = 1024


def normalise(x: Tensor) -> Tensor:
    """Row-normalise in fp32: ``[..., D] -> [..., D]`` fp32, ``x / max(||x||, EPS)`` along the last dim."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def cosine_similarity_torch(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Pairwise cosine similarity, fp32.

    Args:
        a: ``[M, D]`` or ``[B, M, D]``.
        b: ``[N, D]`` or ``[B, N, D]`` (same rank as ``a``); ``None`` means ``a``.

    Returns:
        ``[M, N]`` or ``[B, M, N]`` fp32.
    """
    ua = normalise(a)
    ub = ua if b is None else normalise(b)
    return ua @ ub.transpose(-1, -2)


def unit_rows(x: Tensor) -> Tensor:
    """``x / ||x||`` along the last dim in the INPUT dtype, without a norm floor: ``[..., D] -> [..., D]``.

    This is ToMe's official normalisation (a zero row becomes NaN, as there); :func:`normalise` is the fp32,
    floored one used by the cosine and max-min kernels.
    """
    return x / x.norm(dim=-1, keepdim=True)


def bipartite_best_match_torch(
    a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Best match in ``b`` for each row of ``a`` by cosine similarity, in the input dtype (ToMe semantics).

    Exactly the official ToMe operations: :func:`unit_rows` on both sides, ``ua @ ub^T`` in the input dtype
    (no promotion), masked entries set to ``-inf``, then ``max`` over the last dim.

    Args:
        a: ``[B, Na, D]``; b: ``[B, Nb, D]`` (same dtype).
        a_mask: ``[B, Na]`` bool, ``False`` rows get value ``-inf`` and index 0 (e.g. ToMe's class token).
        b_mask: ``[B, Nb]`` bool, ``False`` columns are never matched unless every column is masked
            (e.g. ToMe's distill token).

    Returns:
        ``values [B, Na]`` in the input dtype and ``indices [B, Na]`` int64: the first maximum on ties;
        like ``torch.max``, a row containing NaN (a zero vector) gets NaN and the index of its first NaN.
    """
    scores = unit_rows(a) @ unit_rows(b).transpose(-1, -2)
    if b_mask is not None:
        scores = scores.masked_fill(~b_mask[:, None, :], float("-inf"))
    if a_mask is not None:
        scores = scores.masked_fill(~a_mask[:, :, None], float("-inf"))
    # torch.max returns the first maximum (also for all -inf rows: index 0).
    values, indices = scores.max(dim=-1)
    return values, indices


def maxmin_select_torch(
    x: Tensor, k: int, *, dense_max: int = DENSE_MAX_TOKENS, block_rows: int = BLOCK_ROWS
) -> Tensor:
    """Greedy max-min (farthest-point) selection on cosine distance (DivPrune, spec section 3).

    ``x`` and ``k`` must already be validated (2-D, ``1 <= k``); ``k >= M`` returns ``arange(M)``.

    Args:
        x: ``[M, D]`` token features (any float dtype; all distance work is fp32).
        k: number of tokens to keep.
        dense_max: largest ``M`` for which the ``M x M`` distance matrix is materialised.
        block_rows: row block size of the seed computation above ``dense_max``.

    Returns:
        ``[min(k, M)]`` int64, distinct and ascending. The seed is the most isolated token (largest
        nearest-neighbour distance); each step adds the token farthest from the selected set; ties go to
        the lowest index.
    """
    m = x.shape[0]
    if k >= m:
        return torch.arange(m, device=x.device)
    row, seed = maxmin_prepare_torch(x, dense_max=dense_max, block_rows=block_rows)
    return maxmin_greedy_torch(row, seed, k, m, x.device)


def maxmin_prepare_torch(
    x: Tensor, *, dense_max: int = DENSE_MAX_TOKENS, block_rows: int = BLOCK_ROWS
) -> tuple[Callable[[int], Tensor], int]:
    """Similarity phase of :func:`maxmin_select_torch` for ``x [M, D]`` (``M >= 2``).

    Returns:
        ``row``: ``row(s)`` is the fp32 distance row ``D[s, :]`` ``[M]`` (a view of the materialised matrix
        for ``M <= dense_max``, recomputed from the unit vectors above), and ``seed``: the most isolated
        token (first maximum of the nearest-neighbour distance, self excluded).
    """
    m = x.shape[0]
    u = normalise(x)
    if m <= dense_max:
        dist = torch.clamp(1.0 - u @ u.T, min=0.0)
        dist.fill_diagonal_(float("inf"))
        seed = int(torch.argmax(dist.min(dim=1).values))
        return (lambda s: dist[s]), seed
    seed = _seed_blocked(u, block_rows)
    return (lambda s: torch.clamp(1.0 - u @ u[s], min=0.0)), seed


def _seed_blocked(u: Tensor, block_rows: int) -> int:
    """Most isolated row of unit vectors ``u [M, D]``, one ``[block_rows, M]`` distance block at a time."""
    m = u.shape[0]
    nn = torch.empty(m, device=u.device)
    for start in range(0, m, block_rows):
        stop = min(start + block_rows, m)
        block = torch.clamp(1.0 - u[start:stop] @ u.T, min=0.0)
        rows = torch.arange(stop - start, device=u.device)
        block[rows, rows + start] = float("inf")
        nn[start:stop] = block.min(dim=1).values
    return int(torch.argmax(nn))


def maxmin_greedy_torch(row: Callable[[int], Tensor], seed: int, k: int, m: int, device: torch.device) -> Tensor:
    """Greedy phase: grow the selection from ``seed`` to ``k < m`` picks, ``[k]`` int64 ascending.

    ``row(s)`` is the distance row ``D[s, :]`` ``[m]``; ``m_j = min_{s in S} D[s, j]`` is kept incrementally.
    """
    selected = torch.empty(k, dtype=torch.long, device=device)
    selected[0] = seed
    # row(seed) may be a view of the shared matrix; copy before editing. The diagonal entry of row(s) is
    # irrelevant: selected tokens are masked to -inf and min(-inf, .) keeps them there.
    mind = row(seed).clone()
    mind[seed] = float("-inf")
    for i in range(1, k):
        # torch.argmax returns the first maximum: ties go to the lowest index.
        s = int(torch.argmax(mind))
        selected[i] = s
        mind = torch.minimum(mind, row(s))
        mind[s] = float("-inf")
    return torch.sort(selected).values
