"""Baselines every method must beat: ``Random`` (seeded subset) and ``Pool`` (2-D average pooling)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vtr.ops.base import BudgetOperator, OpContext
from vtr.tokens import VisualTokens

__all__ = ["Pool", "Random", "pool_grid_shape", "pool_windows", "random_select"]


def random_select(n: int, k: int, seed: int) -> Tensor:
    """``k`` distinct ascending indices out of ``n``, a pure function of ``(n, k, seed)``."""
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


@dataclass
class Random(BudgetOperator):
    """Keep a uniformly random subset of ``keep`` tokens per ``scope`` unit.

    Reproducible: the subset depends only on ``seed`` and the unit size, never on the batch.
    """

    keep: int | float = 0.25
    scope: str = "image"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Random.seed must be an int, got {self.seed!r}")

    def select(self, unit: VisualTokens, k: int, ctx: OpContext) -> Tensor:
        return random_select(len(unit), k, self.seed).to(unit.embeds.device)


def pool_grid_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """Output grid ``(oh, ow)`` with ``oh * ow <= k`` closest to ``k``, keeping the aspect ratio.

    ``oh <= h``, ``ow <= w``, both >= 1. Ties prefer the shape whose aspect ratio is closest to ``h/w``.
    """
    if k >= h * w:
        return h, w
    best: tuple[int, float, int, int] | None = None
    for oh in range(1, h + 1):
        ow = min(w, k // oh)
        if ow < 1:
            break
        aspect_err = abs(math.log((oh / ow) / (h / w)))
        cand = (oh * ow, -aspect_err, oh, ow)
        if best is None or cand[:2] > best[:2]:
            best = cand
    assert best is not None
    return best[2], best[3]


def pool_windows(n: int, out: int) -> list[tuple[int, int]]:
    """Adaptive-pooling windows ``[start, stop)`` splitting ``n`` cells into ``out`` bins."""
    return [((i * n) // out, -((-(i + 1) * n) // out)) for i in range(out)]


@dataclass
class Pool(BudgetOperator):
    """Average-pool each frame/tile grid down to the budget (the "downsample" baseline).

    Each output token is the mean of an adaptive-pooling window of the ORIGINAL grid; it keeps the
    original position of the window cell nearest to the window centre (its representative) and
    ``sizes`` = cells covered. The output count is the largest grid ``oh * ow <= k`` with the
    image's aspect ratio, so it can be slightly below ``k``. Works on unreduced grids only (put it
    first in a chain); rows outside the grids (e.g. newlines) are kept as they are.
    """

    keep: int | float = 0.25
    scope: str = "image"

    def reduce(self, unit: VisualTokens, k: int, ctx: OpContext) -> VisualTokens:
        if not bool((unit.sizes == 1).all()) or unit.owner is not None:
            raise ValueError("Pool works on unreduced token grids: place it before merging operators")
        groups = _grid_groups(unit)
        if not groups:
            raise ValueError("Pool found no complete token grid to pool in this unit")
        n_grid = sum(len(pos) for _, _, pos in groups)
        extra = _extra_rows(unit, groups)
        budget = max(k - len(extra), len(groups))
        assign = torch.full((len(unit),), -1, dtype=torch.long, device=unit.embeds.device)
        reps: list[Tensor] = []
        n_out = 0
        for (h, w), coords, pos in groups:
            share = max(1, (budget * len(pos)) // n_grid)
            cell_out, cell_rep = _pool_assignment(h, w, share)
            pos = pos[torch.argsort(coords[:, 1] * w + coords[:, 2])]  # row-major grid order
            assign[pos] = cell_out.to(pos.device) + n_out
            reps.append(pos[cell_rep.to(pos.device)])
            n_out += len(cell_rep)
        # Rows outside the grids (e.g. newlines) stay as they are.
        assign[extra] = torch.arange(n_out, n_out + len(extra), device=assign.device)
        rep = torch.cat([*reps, extra])
        k_out = n_out + len(extra)
        total = torch.zeros(k_out, unit.embeds.shape[1], device=unit.embeds.device).index_add_(
            0, assign, unit.embeds.float()
        )
        count = torch.bincount(assign, minlength=k_out).clamp_min(1).unsqueeze(1)
        return unit.merge(assign, total / count, rep)


def _pool_assignment(h: int, w: int, k: int) -> tuple[Tensor, Tensor]:
    """Adaptive-pooling windows of an ``h x w`` grid with at most ``k`` outputs.

    Returns ``(cell_out [h*w], rep [K])``: the output window of every row-major cell, and each window's
    representative cell — the one nearest the window centre (lowest index on ties).
    """
    oh, ow = pool_grid_shape(h, w, k)
    cell_out = torch.empty(h * w, dtype=torch.long)
    reps = []
    for i, (r0, r1) in enumerate(pool_windows(h, oh)):
        for j, (c0, c1) in enumerate(pool_windows(w, ow)):
            cells = [r * w + c for r in range(r0, r1) for c in range(c0, c1)]
            cell_out[cells] = i * ow + j
            cy, cx = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
            reps.append(min(cells, key=lambda c: ((c // w - cy) ** 2 + (c % w - cx) ** 2, c)))
    return cell_out, torch.tensor(reps, dtype=torch.long)


def _grid_groups(unit: VisualTokens) -> list[tuple[tuple[int, int], Tensor, Tensor]]:
    """Per (image, frame, t) group: its (h, w) grid, coords and positions, when the grid is complete."""
    out = []
    key = torch.stack([unit.image, unit.frame, unit.coords[:, 0]], dim=1)
    for k in torch.unique(key, dim=0).tolist():
        mask = (key == torch.tensor(k, device=key.device)).all(dim=1)
        pos = mask.nonzero().flatten()
        im = unit.layout[k[0]]
        _t, h, w = im.grids[k[1]] if k[1] < len(im.grids) else (0, 0, 0)
        # Unique coordinates only: rows beyond the grid (newlines) repeat a grid coordinate.
        co = unit.coords[pos]
        first = _first_occurrence(co[:, 1] * max(w, 1) + co[:, 2])
        pos, co = pos[first], co[first]
        if h * w and len(pos) == h * w:
            out.append(((h, w), co, pos))
    return out


def _first_occurrence(keys: Tensor) -> Tensor:
    seen: set[int] = set()
    keep = []
    for i, v in enumerate(keys.tolist()):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long, device=keys.device)


def _extra_rows(unit: VisualTokens, groups) -> Tensor:
    used = torch.zeros(len(unit), dtype=torch.bool, device=unit.embeds.device)
    for _, _, pos in groups:
        used[pos] = True
    return (~used).nonzero().flatten()
