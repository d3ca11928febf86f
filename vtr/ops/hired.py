"""HiRED (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models in Resource-Constrained Environments", AAAI 2025).

Official repository: hasanar1f/HiRED. Spec: ``shared/specs/hired.md``.

Functional cores:

* :func:`total_budget`: ``floor((k + 1) * P * beta)`` tokens for the full image and its ``k`` sub-images;
* :func:`allocate_budgets`: split the budget between the full image and the sub-images from the early-layer CLS
  attention of the full image (``mode="paper"``: attention mass of the region covering each sub-image;
  ``mode="code"``: the official count of binarised top tokens in raster stripes);
* :func:`stable_topk_mask` / :func:`select_partitions`: per-partition top-k by the final-layer CLS attention,
  ties to the lowest index, kept indices ascending.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MODES", "allocate_budgets", "select_partitions", "stable_topk_mask", "total_budget"]

#: Budget allocation modes: ``"paper"`` (attention mass per spatial region) and ``"code"`` (official).
MODES = ("paper", "code")


def total_budget(partitions: int, tokens: int, beta: float) -> int:
    """HiRED's token budget ``floor(partitions * tokens * beta)`` (as the official ``int(...)``).

    Args:
        partitions: ``k + 1`` (the full image and ``k`` sub-images), ``>= 1``.
        tokens: ``P``, tokens per partition, ``>= 0``.
        beta: kept fraction in ``[0, 1]``.
    """
    partitions = _check_int("partitions", partitions)
    tokens = _check_int("tokens", tokens)
    if partitions < 1 or tokens < 0:
        raise ValueError(f"need partitions >= 1 and tokens >= 0, got partitions={partitions}, tokens={tokens}")
    beta = _check_fraction("beta", beta)
    return int(partitions * tokens * beta)


def allocate_budgets(
    init_attn_full: Tensor, grid: tuple[int, int], total: int, alpha: float = 0.5, mode: str = "paper"
) -> list[int]:
    """Split ``total`` tokens between the full image and its ``k = n_h * n_w`` sub-images (spec section 3).

    ``N_full = min(floor(alpha * total), P)`` and ``N_sub = min(total - N_full, k P)``; sub-image ``i`` gets
    ``min(floor(N_sub * s_i / sum(s)), P)`` with tile scores ``s_i`` (an even ``floor(N_sub / k)`` each when
    ``sum(s) = 0`` or the attention is all zero, in both modes). Flooring and the cap at ``P`` are not
    redistributed (as in the official code), so the sum can be below ``total``.

    * ``mode="paper"``: ``s_i`` is the attention mass of the region of the ``g x g`` full-image grid covering
      sub-tile ``(r, c)``: rows ``[floor(r g / n_h), floor((r + 1) g / n_h))``, columns likewise with ``n_w``.
    * ``mode="code"`` (official): the top ``floor(P (1 - alpha))`` tokens of ``init_attn_full`` are marked (ties
      to the lowest index); the raster vector is cut into ``k`` contiguous chunks of ``P / k`` (horizontal
      stripes) and ``s_i`` counts the marked tokens of chunk ``i``.

    Args:
        init_attn_full: ``[P]`` non-negative CLS attention of the full image at the early layer (summed over
            heads), raster order.
        grid: ``(n_h, n_w)`` sub-tiles, row-major.
        total: token budget, ``>= 0`` (see :func:`total_budget`).
        alpha: full-image share in ``[0, 1]`` (and, in ``"code"``, the binarisation fraction ``1 - alpha``).
        mode: ``"paper"`` (``P`` a square) or ``"code"`` (``k`` divides ``P``).

    Returns:
        ``[N_full, N_1, ..., N_k]``: ints in ``[0, P]``, sub-tiles row-major, ``sum <= total``.

    Raises:
        ValueError naming the bad value; TypeError for non-int ``total`` or grid entries.
    """
    if not isinstance(init_attn_full, Tensor) or init_attn_full.ndim != 1 or not init_attn_full.is_floating_point():
        raise ValueError(f"init_attn_full must be a 1-D float tensor [P], got {_describe(init_attn_full)}")
    attn = init_attn_full.detach()
    if attn.numel() and not bool(torch.isfinite(attn).all()):
        raise ValueError("init_attn_full must be finite, got non-finite values")
    if attn.numel() and bool((attn < 0).any()):
        raise ValueError(f"init_attn_full must be non-negative, got minimum {attn.min().item()}")
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (n_h, n_w), got {grid!r}")
    n_h, n_w = _check_int("grid[0]", grid[0]), _check_int("grid[1]", grid[1])
    if n_h < 1 or n_w < 1:
        raise ValueError(f"grid entries must be >= 1, got {grid!r}")
    total = _check_int("total", total)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    alpha = _check_fraction("alpha", alpha)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p, k = attn.shape[0], n_h * n_w
    if mode == "paper":
        g = math.isqrt(p)
        if g * g != p:
            raise ValueError(f"mode='paper' needs a square token grid (P = g^2), got P={p}")
        scores = _region_mass(attn.double().reshape(g, g), n_h, n_w)
    else:
        if p % k:
            raise ValueError(f"mode='code' needs the {k} sub-tiles to divide P={p} (grid {grid!r})")
        marked = torch.zeros(p, dtype=torch.long, device=attn.device)
        marked[_stable_top(attn, int(p * (1 - alpha)))] = 1
        scores = [int(c) for c in marked.reshape(k, p // k).sum(dim=1)]
    n_full = min(int(alpha * total), p)
    n_sub = min(total - n_full, k * p)
    mass = sum(scores)
    if mass == 0 or not bool((attn > 0).any()):  # no signal (in "code" ties would mark arbitrary tokens)
        subs = [n_sub // k] * k
    elif mode == "code":
        subs = [n_sub * s // mass for s in scores]  # integer counts: the exact floor
    else:
        subs = [math.floor(n_sub * s / mass) for s in scores]
    return [n_full] + [min(n, p) for n in subs]


def stable_topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` highest scores of ``scores [P]`` (ties to the lowest index; ``k >= P`` keeps all)."""
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor [P], got {_describe(scores)}")
    k = _check_int("k", k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    mask[_stable_top(scores, k)] = True
    return mask


def select_partitions(scores: Tensor | Sequence[Tensor], budgets: Sequence[int]) -> list[Tensor]:
    """HiRED selection: the top ``budgets[p]`` tokens of every partition by its final-layer CLS attention.

    Args:
        scores: ``[k + 1, P]`` (or a list of ``[P_p]``) scores, full image first.
        budgets: one int per partition (e.g. :func:`allocate_budgets`).

    Returns:
        one int64 tensor per partition: kept indices, ascending (raster order), ties to the lowest index.
    """
    rows = list(scores.unbind(0)) if isinstance(scores, Tensor) else list(scores)
    if len(rows) != len(budgets):
        raise ValueError(f"got {len(rows)} partitions of scores but {len(budgets)} budgets")
    return [stable_topk_mask(row, b).nonzero()[:, 0] for row, b in zip(rows, budgets, strict=True)]


def _stable_top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ties to the lowest index (descending order)."""
    return torch.sort(scores, descending=True, stable=True).indices[: max(k, 0)]


def _region_mass(attn_grid: Tensor, n_h: int, n_w: int) -> list[float]:
    """Attention mass of the ``g x g`` grid region under each sub-tile, row-major (spec section 3)."""
    g = attn_grid.shape[0]
    out = []
    for r in range(n_h):
        for c in range(n_w):
            rows = slice(r * g // n_h, (r + 1) * g // n_h)
            cols = slice(c * g // n_w, (c + 1) * g // n_w)
            out.append(float(attn_grid[rows, cols].sum()))
    return out


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"


# ---- operator
