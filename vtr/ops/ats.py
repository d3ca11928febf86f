"""ATS (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022).

Official repository: adaptivetokensampling/ATS. Spec: ``shared/specs/ats.md``.

Functional cores:

* :func:`ats_scores`: significance ``s_j = a_j * ||V_j||`` (CLS attention summed over heads times value norm);
* :func:`inverse_transform_sample`: deterministic inverse-transform sampling of the significance CDF at evenly
  spaced quantiles; the unique picks are the kept tokens, so the count adapts to the score distribution.

Both work in fp32, as the official code does.

Operator: :class:`ATS` (``vision`` stage), at the mid point of every ATS block (after the attention residual,
before the MLP) on the encoder's token units; :func:`resolve_score` picks the attention signal for an encoder.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtr.ops.base import OpContext, VisionOperator, validate_keep
from vtr.tokens import TowerTokens

__all__ = ["ATS", "SCORES", "ats_scores", "inverse_transform_sample", "resolve_score"]


def ats_scores(cls_attn: Tensor, value_norms: Tensor, valid: Tensor | None = None) -> Tensor:
    """ATS significance scores of the candidate tokens.

    Args:
        cls_attn: ``[..., N]`` attention of the CLS query to each candidate, summed over heads (CLS-free
            encoders: the column-mean substitute).
        value_norms: ``[..., N]`` L2 norm of each candidate's full value vector (heads concatenated).
        valid: optional bool ``[..., N]``; padded tokens (``False``) score 0 and are never kept.

    Returns:
        ``[..., N]`` fp32 ``cls_attn * value_norms``.

    Raises:
        ValueError: shapes differ, or a score input is negative or not finite.
    """
    for name, t in (("cls_attn", cls_attn), ("value_norms", value_norms)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {type(t).__name__}")
    if cls_attn.shape != value_norms.shape:
        shapes = f"{tuple(cls_attn.shape)} and {tuple(value_norms.shape)}"
        raise ValueError(f"cls_attn and value_norms must have the same shape, got {shapes}")
    scores = cls_attn.float() * value_norms.float()
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != scores.shape:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(scores.shape)}, got {_describe(valid)}")
        scores = scores.masked_fill(~valid, 0.0)
    _check_scores(scores)
    return scores


def inverse_transform_sample(scores: Tensor, n_samples: int) -> Tensor:
    """Deterministic inverse-transform sampling (spec ``ats.md`` section 3).

    1. ``s <- s / sum(s)`` (all-zero scores: uniform), fp32.
    2. ``pi = stable_argsort(s)`` ascending; ``c = cumsum(s[pi])``; ``c_hat = (c - c_0) / (c_{N-1} - c_0)``.
    3. ``y_0 = min{c_hat_k > 0}``, ``y_i = y_0 + i (1 - y_0) / (n_samples - 1)`` (``y = [1]`` for one sample).
    4. ``pick_i = argmin_k |y_i - c_hat_k|`` (nearest CDF value, first index on ties).
    5. Return ``sort(pi[unique(pick)])``.

    Consequences: at most ``min(n_samples, N - 1)`` tokens are kept (for ``N >= 2``); the lowest-score token and
    every zero-score token are never kept; the top-score token always is; the result is invariant to scaling.

    Args:
        scores: ``[N]`` non-negative significance scores (any float dtype; the maths is fp32).
        n_samples: number of quantiles, ``>= 1`` (ATS: the patch count at the network input).

    Returns:
        int64 ``[M]``: unique kept indices, ascending ORIGINAL order (the official code returns them in
        ascending-score order). ``N = 0`` gives an empty result, ``N = 1`` gives ``[0]``.

    Raises:
        ValueError: ``scores`` not 1-D float, negative or non-finite scores, ``n_samples < 1``; TypeError:
            ``n_samples`` not an int.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor [N], got {_describe(scores)}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral):
        raise TypeError(f"n_samples must be an int, got {n_samples!r} of type {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    s = scores.detach().float()
    _check_scores(s)
    n = s.shape[0]
    if n <= 1:
        return torch.arange(n, device=s.device)
    total = s.sum()
    s = s / total if bool(total > 0) else torch.full_like(s, 1.0 / n)
    order = torch.argsort(s, stable=True)  # ascending; equal scores by index
    cdf = torch.cumsum(s[order], dim=0)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    y0 = cdf[cdf > 0].min()
    if n_samples == 1:
        ys = torch.ones(1, device=s.device)
    else:
        # y_i = y0 + i (1 - y0) / (S - 1), evaluated with the official expression (a linspace, then the shift):
        # scores with small integer ratios put quantiles exactly half-way between two CDF values, and the
        # rounding of y then decides the nearest one.
        steps = torch.arange(n_samples, device=s.device, dtype=torch.float32)
        grid = torch.linspace(0.0, 1.0, n_samples, device=s.device)
        ys = y0 + (grid * (n_samples - 1) - y0 * steps) / (n_samples - 1)
    picks = _nearest_first(cdf, ys)
    return torch.sort(order[torch.unique(picks)]).values


def _nearest_first(cdf: Tensor, ys: Tensor) -> Tensor:
    """``argmin_k |y - cdf_k|`` for each ``y`` (first index on ties) on a non-decreasing ``cdf``, in
    ``O((N + S) log N)`` memory-light steps instead of the dense ``S x N`` distance matrix."""
    n = cdf.shape[0]
    hi = torch.searchsorted(cdf, ys, side="left").clamp_max(n - 1)  # first k with cdf_k >= y (or the last)
    lo = (hi - 1).clamp_min(0)
    # The first index holding the value below y (the CDF repeats values where scores are zero or negligible).
    lo = torch.searchsorted(cdf, cdf[lo], side="left")
    d_lo, d_hi = (ys - cdf[lo]).abs(), (ys - cdf[hi]).abs()
    return torch.where(d_lo <= d_hi, lo, hi)


def _check_scores(s: Tensor) -> None:
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError(f"scores must be finite, got {s[~torch.isfinite(s)][0].item()}")
    if s.numel() and bool((s < 0).any()):
        raise ValueError(f"scores must be non-negative, got minimum {s.min().item()}")


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"


# ---- operator

#: Attention scores ATS can rank by: ``"auto"`` picks ``cls_attn`` (CLS encoders) or ``mean_received``.
SCORES = ("auto", "cls_attn", "mean_received")


def resolve_score(op: str, score: str, adapter) -> tuple[Any, str]:
    """``(tower facts, signal kind)`` of a vision-signal operator on ``adapter``'s encoder.

    ``score="auto"`` is ``cls_attn`` on encoders with a CLS token and ``mean_received`` (the mean attention each
    token receives, vtr's CLS-free substitute) on the others. Raises ``ValueError`` naming the operator and the
    family when the encoder cannot give vision signals, or when the score does not fit the encoder.
    """
    facts = adapter.tower() if "vision" in adapter.supported_stages else None
    if facts is None:
        raise ValueError(f"{op} needs the vision encoder; the {adapter.name} adapter cannot host vision-stage signals")
    if facts.refuse is not None:
        raise ValueError(f"{op} needs the vision encoder, which the {adapter.name} adapter cannot run: {facts.refuse}")
    has_cls = facts.info.has_cls
    if score == "auto":
        return facts, "cls_attn" if has_cls else "mean_received"
    if score == "cls_attn" and not has_cls:
        raise ValueError(
            f"{op}(score='cls_attn') needs a CLS token; the {adapter.name} encoder has none: use score='mean_received'"
        )
    if score == "mean_received" and has_cls:
        raise ValueError(
            f"{op}(score='mean_received') is vtr's substitute for CLS-free encoders; the {adapter.name} encoder has a "
            "CLS token: use score='cls_attn' (or 'auto')"
        )
    return facts, score


@dataclass
class ATS(VisionOperator):
    """Adaptive Token Sampling inside the vision encoder (spec ``ats.md``).

    At every ATS block the units are scored by ``s_j = a_j * ||V_j||`` (``a``: the CLS row of the block's
    attention, or the mean attention each unit receives on CLS-free encoders; for 2x2-unit encoders the product
    is taken per patch slot and summed per unit), :func:`inverse_transform_sample` picks the kept units, and the
    block's MLP runs on them only (the kept rows' attention outputs are the rows of the full attention, as in the
    official code). Each encoder sequence (image, tile, frame) keeps its own, adaptive count; the runner pads and
    masks. Kept units stay in raster order and keep their positions; CLS is never dropped.

    Args:
        blocks: ATS blocks (negative counts from the end); default ``floor(depth / 4)`` up to the block feeding
            the features (3..11 on a 12-block ViT, 6..22 on LLaVA's CLIP-L). ``()`` disables ATS.
        keep: ``n_samples``: ``None`` (default) = the units of the sequence at the encoder input; an int ``K``
            samples ``K`` quantiles (at most ``K`` kept per block); a ratio ``r`` gives ``K = round(r * units)``.
        score: ``"auto"``, ``"cls_attn"`` (encoders with CLS) or ``"mean_received"`` (CLS-free encoders).
    """

    blocks: tuple[int, ...] | None = None
    keep: int | float | None = None
    score: str = "auto"

    def validate(self) -> None:
        if self.blocks is not None:
            if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, Sequence):
                raise TypeError(f"ATS.blocks must be a sequence of encoder block indices, got {self.blocks!r}")
            for b in self.blocks:
                if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                    raise TypeError(f"ATS.blocks must hold ints, got {b!r} in {self.blocks!r}")
            self.blocks = tuple(int(b) for b in self.blocks)
        if self.keep is not None:
            self.keep = validate_keep(self.keep, "ATS.keep")
        if self.score not in SCORES:
            raise ValueError(f"ATS.score must be one of {SCORES}, got {self.score!r}")

    def bind(self, adapter) -> ATS:
        facts, kind = resolve_score("ATS", self.score, adapter)
        info = facts.info
        depth, last = info.num_blocks, info.feature_block
        if self.blocks is None:
            blocks = tuple(range(depth // 4, last + 1))
        else:
            blocks = tuple(sorted({b + depth if b < 0 else b for b in self.blocks}))
            bad = [b for b in blocks if not 0 <= b <= last]
            if bad:
                raise ValueError(
                    f"ATS blocks {list(self.blocks)}: block {bad[0]} is outside the {adapter.name} encoder's blocks "
                    f"0..{last} that feed the features (depth {depth})"
                )
        pool = getattr(adapter.model, "global_pool", None) if not facts.reexpand else None
        if pool not in (None, "token"):
            # Sequences keep different counts (padding): a head averaging every token would count the padding.
            raise ValueError(
                f"ATS keeps a different number of tokens per image; this {adapter.name} pools all tokens "
                f"(global_pool={pool!r}), which would average the padding: use a class-token model"
            )
        return dataclasses.replace(self, blocks=blocks, score=kind)

    def _kind(self) -> str:
        if self.score == "auto":
            raise RuntimeError("ATS(score='auto') is resolved by bind(adapter): run it through vtr.wrap")
        return self.score

    def points(self, info) -> list[tuple[int, str]]:
        blocks = self.blocks if self.blocks is not None else range(info.num_blocks // 4, info.feature_block + 1)
        return [(b, "mid") for b in blocks]

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        if not self.blocks:
            return ()
        kind = self._kind()
        return tuple(s for b in self.blocks for s in (f"{kind}@{b}", f"value_norm@{b}"))

    def n_samples(self, units: int) -> int:
        """Quantiles sampled for a sequence of ``units`` units at the encoder input."""
        if self.keep is None:
            return max(units, 1)
        if isinstance(self.keep, int):
            return self.keep
        return max(1, round(self.keep * units))

    def apply_tower(self, tokens: TowerTokens, ctx: OpContext) -> TowerTokens:
        b = tokens.block
        kind = self._kind()
        names = (f"{kind}@{b}", f"value_norm@{b}")
        missing = [n for n in names if n not in tokens.scores]
        if missing:
            raise ValueError(f"ATS at block {b} needs the signals {missing}: run it through vtr.wrap")
        # [S, U, k]: product per patch slot, summed per unit; padding scores 0.
        valid = tokens.valid
        slots = valid.unsqueeze(-1).expand_as(tokens.scores[names[0]])
        score = ats_scores(tokens.scores[names[0]], tokens.scores[names[1]], slots).sum(-1)
        picks = []
        for s in range(score.shape[0]):
            rows = valid[s].nonzero().flatten()
            h, w = tokens.grid[s]
            sel = rows[inverse_transform_sample(score[s, rows], self.n_samples(h * w)).to(rows.device)]
            sel = torch.unique(torch.cat([sel, rows[tokens.protected[s, rows]]]))  # protected units always stay
            picks.append(sel[torch.argsort(tokens.index[s, sel])])  # raster order
        k = max((len(p) for p in picks), default=0)
        idx = torch.zeros(len(picks), k, dtype=torch.long, device=valid.device)
        keep = torch.zeros(len(picks), k, dtype=torch.bool, device=valid.device)
        for s, p in enumerate(picks):
            idx[s, : len(p)] = p
            keep[s, : len(p)] = True
        return tokens.take(idx, keep)
