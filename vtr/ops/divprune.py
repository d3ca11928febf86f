"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens (max-min cosine distance).

Functional core: :func:`divprune_select`. Spec: ``shared/specs/divprune.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtr.ops.base import BudgetOperator, OpContext
from vtr.tokens import VisualTokens

__all__ = ["DENSE_MAX_TOKENS", "DivPrune", "divprune_select"]

#: Above this many tokens the M x M distance matrix is never materialised.
DENSE_MAX_TOKENS = 8192
_BLOCK_ROWS = 1024


def divprune_select(x: Tensor, k: int) -> Tensor:
    """Greedy max-min (farthest-point) selection on cosine distance.

    Args:
        x: ``[M, D]`` token features (any float dtype; all distance work is fp32).
        k: number of tokens to keep, ``k >= 1``.

    Returns:
        ``[min(k, M)]`` long tensor of distinct, ascending indices. The seed is the most isolated token
        (largest nearest-neighbour distance); each step adds the token farthest from the selected set;
        ties go to the lowest index. ``k >= M`` returns ``arange(M)``.
    """
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"divprune_select expects a 2-D tensor [M, D], got {getattr(x, 'shape', type(x))}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r} of type {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    m = x.shape[0]
    if k >= m:
        return torch.arange(m, device=x.device)
    u = _normalise(x)
    if m <= DENSE_MAX_TOKENS:
        dist = torch.clamp(1.0 - u @ u.T, min=0.0)
        dist.fill_diagonal_(float("inf"))
        seed = int(torch.argmax(dist.min(dim=1).values))
        dist.fill_diagonal_(0.0)
        return _greedy(lambda s: dist[s], seed, k, m, x.device)
    seed = _seed_blocked(u)
    return _greedy(lambda s: torch.clamp(1.0 - u @ u[s], min=0.0), seed, k, m, x.device)


def _normalise(x: Tensor) -> Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _seed_blocked(u: Tensor) -> int:
    """Most isolated token, computing the distance matrix one row block at a time."""
    m = u.shape[0]
    nn = torch.empty(m, device=u.device)
    for start in range(0, m, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, m)
        block = torch.clamp(1.0 - u[start:stop] @ u.T, min=0.0)
        block[torch.arange(stop - start, device=u.device), torch.arange(start, stop, device=u.device)] = float(
            "inf"
        )
        nn[start:stop] = block.min(dim=1).values
    return int(torch.argmax(nn))


def _greedy(row, seed: int, k: int, m: int, device) -> Tensor:
    selected = torch.empty(k, dtype=torch.long, device=device)
    selected[0] = seed
    mind = row(seed).clone()
    mind[seed] = float("-inf")
    for i in range(1, k):
        # torch.argmax returns the first maximum: ties go to the lowest index.
        s = int(torch.argmax(mind))
        selected[i] = s
        mind = torch.minimum(mind, row(s))
        mind[selected[: i + 1]] = float("-inf")
    return torch.sort(selected).values


@dataclass
class DivPrune(BudgetOperator):
    """Keep the ``keep`` most diverse tokens of each ``scope`` unit (``pre_llm``, no attention needed).

    Args:
        keep: int count or float ratio in (0, 1]; default 0.098 (56 of LLaVA-1.5's 576).
        scope: ``"image"`` (default), ``"frame"`` or ``"sample"``.
    """

    keep: int | float = 0.098
    scope: str = "image"

    def select(self, unit: VisualTokens, k: int, ctx: OpContext) -> Tensor:
        return divprune_select(unit.embeds, k)
