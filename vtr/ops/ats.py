"""ATS (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022).

Official repository: adaptivetokensampling/ATS. Spec: ``shared/specs/ats.md``.

Functional cores:

* :func:`ats_scores`: significance ``s_j = a_j * ||V_j||`` (CLS attention summed over heads times value norm);
* :func:`inverse_transform_sample`: deterministic inverse-transform sampling of the significance CDF at evenly
  spaced quantiles; the unique picks are the kept tokens, so the count adapts to the score distribution.

Both work in fp32, as the official code does.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["ats_scores", "inverse_transform_sample"]


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
