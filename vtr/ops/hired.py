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

Operator: :class:`HiRED` (``pre_llm``, with vision signals captured at the two encoder blocks).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vtr.ops.ats import SCORES, resolve_score
from vtr.ops.base import OpContext, Operator, validate_keep
from vtr.tokens import VisualTokens

__all__ = [
    "FULL_VIEWS",
    "MODES",
    "HiRED",
    "allocate_budgets",
    "select_partitions",
    "stable_topk_mask",
    "total_budget",
]

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

#: Which encoder sequence of a tiled image is the full image: ``"first"`` (LLaVA-NeXT/OneVision base view),
#: ``"last"`` (InternVL thumbnail); ``"auto"`` asks the model's adapter.
FULL_VIEWS = ("auto", "first", "last")


@dataclass
class HiRED(Operator):
    """HiRED before the LLM (spec ``hired.md``): per image, budgets for the full view and its sub-images from
    early-layer attention, then each partition keeps its top tokens by feature-layer attention.

    Partitions are the image's encoder sequences (``VisualTokens.encoder``): LLaVA-NeXT/OneVision's base view
    then its AnyRes tiles, InternVL's crops then the thumbnail (the full image) LAST. Images with one sequence
    (LLaVA-1.5, Qwen2-VL, untiled images) and videos are one partition: ``topk(c_final, floor(beta * U))``. Scores
    are the CLS row of the encoder's attention (``cls_attn``), or on CLS-free encoders (SigLIP, Qwen2-VL) the
    mean attention each unit receives (``mean_received``, a vtr extension), summed per token unit.

    Args:
        keep: a ratio ``beta`` in (0, 1] (budget ``floor((k + 1) * P * beta)`` for ``k`` sub-images of ``P``
            units) or an int (the budget itself). ``keep=1.0`` keeps everything (the official code skips HiRED).
        alpha: full-view share in [0, 1] (and the binarisation fraction ``1 - alpha`` of ``mode="code"``).
        mode: budget allocation, ``"paper"`` (attention mass of the full-view region under each sub-image) or
            ``"code"`` (the official code: counts of top tokens in raster stripes).
        init_layer: encoder block of the allocation scores (default 0).
        final_layer: encoder block of the selection scores (default: the block feeding the features).
        score: ``"auto"``, ``"cls_attn"`` or ``"mean_received"``.
        full_view: ``"auto"`` (the family's convention), ``"first"`` or ``"last"``.

    Newline rows (LLaVA-NeXT/OneVision canvases) stay exactly for the canvas rows that keep a token; with
    ``drop_newlines=True`` the adapter removes them all. Only units on the unpadded canvas compete, so padding
    never takes budget (the spec's ``mask_padding=True``). The budgets and tile layouts of every image are in
    ``report.details["hired"]``.
    """

    stage: ClassVar[str] = "pre_llm"

    keep: int | float = 0.2
    alpha: float = 0.5
    mode: str = "paper"
    init_layer: int = 0
    final_layer: int | None = None
    score: str = "auto"
    full_view: str = "auto"

    def validate(self) -> None:
        self.keep = validate_keep(self.keep, "HiRED.keep")
        self.alpha = _check_fraction("HiRED.alpha", self.alpha)
        if self.mode not in MODES:
            raise ValueError(f"HiRED.mode must be one of {MODES}, got {self.mode!r}")
        _check_int("HiRED.init_layer", self.init_layer)
        if self.final_layer is not None:
            _check_int("HiRED.final_layer", self.final_layer)
        if self.score not in SCORES:
            raise ValueError(f"HiRED.score must be one of {SCORES}, got {self.score!r}")
        if self.full_view not in FULL_VIEWS:
            raise ValueError(f"HiRED.full_view must be one of {FULL_VIEWS}, got {self.full_view!r}")

    def bind(self, adapter) -> HiRED:
        facts, kind = resolve_score("HiRED", self.score, adapter)
        info = facts.info
        depth = info.num_blocks
        layers = []
        for name, value in (("init_layer", self.init_layer), ("final_layer", self.final_layer)):
            layer = info.feature_block if value is None else value
            i = layer + depth if layer < 0 else layer
            if not 0 <= i < depth:
                raise ValueError(f"HiRED.{name}={value}: the {adapter.name} encoder has blocks 0..{depth - 1}")
            layers.append(i)
        full = self.full_view
        if full == "auto":
            # The family states which tile is the full image (InternVL: the thumbnail, last); else the first.
            full = "last" if callable(getattr(adapter, "thumbnail_group", None)) else "first"
        return dataclasses.replace(self, init_layer=layers[0], final_layer=layers[1], score=kind, full_view=full)

    def _names(self) -> tuple[str, str]:
        if self.score == "auto" or self.final_layer is None or self.full_view == "auto":
            raise RuntimeError(
                "HiRED resolves its score, layers and full view in bind(adapter): run it through vtr.wrap"
            )
        return f"{self.score}@{self.init_layer}", f"{self.score}@{self.final_layer}"

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self._names()))

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        if isinstance(self.keep, float) and self.keep == 1.0:
            return tokens  # beta = 1: the official code skips HiRED
        if len(tokens) == 0:
            return tokens
        init, final = self._names()
        if any(n not in tokens.scores for n in (init, final)) or tokens.encoder is None:
            kinds = sorted({im.kind for im in tokens.layout})
            raise ValueError(
                f"HiRED has no vision-encoder scores ({init}, {final}) for this sample's {'/'.join(kinds)} rows: "
                "run it through vtr.wrap on a model whose adapter maps them to encoder units (LLaVA-OneVision's "
                "pooled video frames are not)"
            )
        details = ctx.extras.get("details")
        parts = []
        for i, im in enumerate(tokens.layout):
            pos = (tokens.image == i).nonzero().flatten()
            if len(pos) == 0:
                continue
            unit = tokens.take(pos)
            kept, info = self._image(unit, im, init, final)
            parts.append(unit.take(kept))
            if details is not None:
                details.setdefault("hired", []).append({"sample": ctx.sample, "image": i, **info})
        return VisualTokens.cat(parts).sorted() if parts else tokens

    # ------------------------------------------------------------------ one image
    def _image(self, unit: VisualTokens, im, init: str, final: str) -> tuple[Tensor, dict]:
        """Kept positions (into ``unit``, one image's rows) and what was decided."""
        n_grid = sum(t * h * w for t, h, w in im.grids)
        extra = (unit.index - im.offset) >= n_grid  # rows beyond the grids: newlines
        seq, code = unit.encoder[:, 0], unit.encoder[:, 1]
        from_unit = (code >= 0) & ~extra
        if not bool(from_unit.any()):
            raise ValueError(
                f"HiRED: the rows of this {im.kind} carry no vision-encoder provenance (the adapter does not map them "
                "to encoder units, e.g. LLaVA-OneVision's pooled video frames): it cannot be scored"
            )
        n_seq = int(seq[from_unit].max()) + 1
        tiled = im.kind == "image" and n_seq > 1
        score = unit.scores[final].float()
        if not tiled:
            cand = from_unit.nonzero().flatten()
            budget = min(self.keep, n_grid) if isinstance(self.keep, int) else total_budget(1, n_grid, self.keep)
            kept = cand[_top(score[cand], code[cand], budget)]
            info = {"partitions": 1, "budgets": [budget], "grid": None}
        else:
            full = 0 if self.full_view == "first" else n_seq - 1
            subs = [s for s in range(n_seq) if s != full]
            _, gh, gw = im.grids[0 if self.full_view == "first" else -1]
            p = gh * gw
            grid, how = _tile_layout(unit, seq, code, subs, gw, from_unit)
            attn0 = torch.zeros(p, dtype=torch.float32, device=score.device)
            rows = (from_unit & (seq == full)).nonzero().flatten()
            attn0[code[rows]] = unit.scores[init][rows].float()
            total = self.keep if isinstance(self.keep, int) else total_budget(len(subs) + 1, p, self.keep)
            budgets = allocate_budgets(attn0, grid, total, self.alpha, self.mode)
            picks = []
            for s, n in zip([full, *subs], budgets, strict=True):
                cand = (from_unit & (seq == s)).nonzero().flatten()
                picks.append(cand[_top(score[cand], code[cand], n)])
            kept = torch.cat(picks)
            info = {"partitions": len(subs) + 1, "budgets": budgets, "grid": list(grid), "layout": how}
        kept = torch.unique(torch.cat([kept, unit.protected.nonzero().flatten()]))
        return torch.unique(torch.cat([kept, _newlines(unit, im, extra, kept)])), info


def _top(score: Tensor, code: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest ``score`` (ties to the lowest unit ``code``)."""
    by_code = torch.argsort(code, stable=True)
    order = torch.sort(score[by_code], descending=True, stable=True).indices
    return by_code[order[: max(k, 0)]]


def _tile_layout(
    unit: VisualTokens, seq: Tensor, code: Tensor, subs: list[int], gw: int, from_unit: Tensor
) -> tuple[tuple[int, int], str]:
    """``(n_h, n_w)`` of the sub-images, row-major, and how it was found.

    On a canvas (LLaVA-NeXT/OneVision) every sub-image's units sit at a constant offset from their canvas
    coordinates: the distinct row and column offsets count the tile rows and columns. Where sub-images are
    separate groups (InternVL) their layout is not in the model's inputs (the processor keeps it): the most
    square ``n_h x n_w = k`` with ``n_h <= n_w`` is assumed (InternVL's choice for landscape and square images).
    """
    k = len(subs)
    off_h, off_w = set(), set()
    for s in subs:
        rows = (from_unit & (seq == s)).nonzero().flatten()
        if len(rows):
            c = unit.coords[rows]
            off_h.update((c[:, 1] - code[rows] // gw).tolist())
            off_w.update((c[:, 2] - code[rows] % gw).tolist())
    if len(off_h) * len(off_w) == k and (len(off_h) > 1 or len(off_w) > 1 or k == 1):
        return (len(off_h), len(off_w)), "canvas"
    n_h = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return (n_h, k // n_h), "assumed"


def _newlines(unit: VisualTokens, im, extra: Tensor, kept: Tensor) -> Tensor:
    """Newline rows to keep: the one closing each canvas row that keeps a token (rows beyond the canvas, e.g. an
    untiled image's trailing newline, stay when anything of the image stays)."""
    rows = extra.nonzero().flatten()
    if len(rows) == 0 or len(kept) == 0:
        return rows[:0]
    rows = rows[torch.argsort(unit.index[rows])]
    last = len(im.grids) - 1
    _, gh, _ = im.grids[last]
    in_canvas = kept[(unit.frame[kept] == last) & ~extra[kept]]
    has = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    lines = unit.coords[in_canvas, 1].unique() if len(im.grids) > 1 else in_canvas[:0]
    has[lines[lines < len(rows)]] = True
    if len(rows) > gh or len(im.grids) == 1:
        has[gh if len(im.grids) > 1 else 0 :] = True
    return rows[has]
