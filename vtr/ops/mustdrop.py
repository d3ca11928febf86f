"""MustDrop (Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model",
arXiv 2411.10803).

Official repository: liuting20/MustDrop. Spec: ``shared/specs/mustdrop.md``.

Functional cores:

* :func:`window_merge` (stage A1, vision): merge every ``w x w`` window whose tokens are nearly identical;
* :func:`key_set` (stage A2): the protected key tokens, the stable top ``ceil(0.08 n)`` by CLS attention;
* :func:`dual_attention_keep` (stage B, prefill): drop visual tokens that text attends to weakly, both in total
  and individually;
* :func:`scale_layers`, :data:`PRESETS` / :func:`preset_thresholds`: the prefill layers and thresholds;
* :func:`layer_averaged_count`: the paper's token count, averaged over the LLM layers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LAYERS",
    "KEY_RATE",
    "PRESETS",
    "dual_attention_keep",
    "key_set",
    "layer_averaged_count",
    "preset_thresholds",
    "scale_layers",
    "window_merge",
]

#: Prefill pruning layers of the official 32-layer LLaVA-1.5 runs.
DEFAULT_LAYERS = (2, 6, 10, 14)
#: Share of the post-merge units protected as the key set.
KEY_RATE = 0.08
#: ``(global_thr, individual_thr)`` tuned on LLaVA-1.5-7B for 192 / 128 / 64 layer-averaged visual tokens.
PRESETS: dict[str, tuple[float, float]] = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}


def window_merge(
    x: Tensor, grid: tuple[int, int], window: int = 3, threshold: float = 0.8
) -> tuple[Tensor, Tensor, Tensor]:
    """Stage A1: merge the most self-similar non-overlapping ``w x w`` windows into one token each.

    The ``H x W`` grid is tiled into ``floor(H / w) * floor(W / w)`` windows in raster order (border tokens outside
    full windows never merge). A window's similarity is the mean pairwise cosine of its ``w^2`` tokens (self pairs
    excluded; fp32, norms clamped at 1e-12). With ``r_b`` the windows of row ``b`` at or above ``threshold``,
    every row merges its top ``r = min_b r_b`` windows (stable: ties to the lower window), so lengths stay equal:
    call it once per image, with the tiles of that image as the batch. A merged token is the fp32 mean of its
    window (cast back to ``x``'s dtype), anchored at the window's bottom-right token.

    Args:
        x: ``[B, H * W, C]`` float tokens in raster order (MustDrop: block-0 hidden states of the units).
        grid: ``(H, W)``.
        window: ``w >= 2``.
        threshold: merge windows whose similarity is ``>= threshold``.

    Returns:
        ``(x_out, sizes, sources)`` with ``N_out = H W - r (w^2 - 1)``, in the official order: the ``r`` merged
        tokens by descending similarity, then the unmerged tokens by ascending original index.

        * ``x_out``: ``[B, N_out, C]``, ``x``'s dtype;
        * ``sizes``: ``[B, N_out]`` fp32, ``w^2`` or 1;
        * ``sources``: ``[B, N_out, w^2]`` int64 original indices, ascending, padded with -1; the anchor (the
          position a merged token takes) is the last valid entry.

        ``r = 0`` returns ``x`` unchanged, sizes all ones and ``sources[..., 0] = arange(H W)``.

    Raises:
        ValueError: bad shapes, ``window < 2`` or a NaN threshold; TypeError: non-int ``window`` or grid.
    """
    if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [B, H*W, C], got {_describe(x)}")
    if not isinstance(grid, Sequence) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (H, W), got {grid!r}")
    h, w_grid = _check_int("grid[0]", grid[0]), _check_int("grid[1]", grid[1])
    if h < 0 or w_grid < 0 or h * w_grid != x.shape[1]:
        raise ValueError(f"grid {tuple(grid)} has {h * w_grid} cells but x has {x.shape[1]} tokens")
    w = _check_int("window", window)
    if w < 2:
        raise ValueError(f"window must be >= 2, got {w}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    bsz, n, _ = x.shape
    dev = x.device
    win_idx = _window_indices(h, w_grid, w, dev)  # [n_win, w^2], each row ascending, anchor last
    r = 0
    if len(win_idx) and bsz:
        sim = _window_similarity(x, win_idx)  # [B, n_win]
        r = int((sim >= threshold).sum(dim=1).min())
    if r == 0:
        sources = torch.full((bsz, n, w * w), -1, dtype=torch.long, device=dev)
        sources[..., 0] = torch.arange(n, device=dev)
        return x, torch.ones(bsz, n, device=dev), sources
    chosen = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :r]  # [B, r]
    members = win_idx[chosen]  # [B, r, w^2]
    c = x.shape[-1]
    merged = x.float().gather(1, members.reshape(bsz, -1, 1).expand(-1, -1, c)).reshape(bsz, r, w * w, c)
    merged = merged.mean(dim=2).to(x.dtype)
    keep = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    keep.scatter_(1, members.reshape(bsz, -1), False)
    rest = keep.nonzero()[:, 1].reshape(bsz, n - r * w * w)  # ascending per row
    x_out = torch.cat([merged, x.gather(1, rest[..., None].expand(-1, -1, c))], dim=1)
    sizes = torch.cat([torch.full((bsz, r), float(w * w), device=dev), torch.ones(bsz, rest.shape[1], device=dev)], 1)
    singles = torch.full((bsz, rest.shape[1], w * w), -1, dtype=torch.long, device=dev)
    singles[..., 0] = rest
    return x_out, sizes, torch.cat([members, singles], dim=1)


def key_set(scores: Tensor, rate: float = KEY_RATE) -> Tensor:
    """Stage A2: the protected key tokens, the stable top ``ceil(rate * n)`` of ``scores``.

    ``ceil`` of the float product, as in the official code (47 of 576).

    Args:
        scores: ``[n]`` CLS attention (averaged over heads) of the post-merge units, or the CLS-free substitute.
        rate: share in ``(0, 1]``.

    Returns:
        int64 ``[ceil(rate * n)]`` indices into ``scores``, ascending; ties to the lowest index.
    """
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor [n], got {_describe(scores)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be a number in (0, 1], got {rate!r}")
    k = math.ceil(rate * scores.shape[0])
    top = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(top).values


def dual_attention_keep(
    attn_text_to_vis: Tensor, global_thr: float, individual_thr: float, protected: Tensor | Sequence[int]
) -> Tensor:
    """Stage B: the visual tokens kept at a prefill pruning layer.

    With ``g_j = sum_t A[t, j]`` and ``u_j = max_t A[t, j]`` (fp32), token ``j`` is dropped iff
    ``g_j < global_thr * sum_m g_m`` and ``u_j < individual_thr``; protected tokens are always kept.

    Args:
        attn_text_to_vis: ``[T, V]`` attention of the text rows to the visual columns, averaged over heads.
        global_thr: share of the total text attention below which a token is globally weak.
        individual_thr: attention below which no single text token cares about it.
        protected: int64 indices in ``[0, V)`` (the key set; may be empty or 0-d) or a sequence of ints.

    Returns:
        int64 ascending unique indices in ``[0, V)``. ``T = 0`` keeps everything; ``V = 0`` gives an empty result.

    Raises:
        ValueError: bad shapes, non-finite values or thresholds, out-of-range ``protected``.
    """
    attn = attn_text_to_vis
    if not isinstance(attn, Tensor) or attn.ndim != 2 or not attn.is_floating_point():
        raise ValueError(f"attn_text_to_vis must be a float tensor [T, V], got {_describe(attn)}")
    for name, thr in (("global_thr", global_thr), ("individual_thr", individual_thr)):
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not math.isfinite(thr):
            raise ValueError(f"{name} must be a finite number, got {thr!r}")
    if attn.numel() and not bool(torch.isfinite(attn).all()):
        raise ValueError("attn_text_to_vis must be finite")
    t, v = attn.shape
    prot = torch.as_tensor(protected, device=attn.device).reshape(-1)
    if prot.numel() and (prot.is_floating_point() or prot.dtype == torch.bool):
        raise ValueError(f"protected must hold integer indices, got {prot.dtype}")
    prot = prot.long()
    if prot.numel() and (int(prot.min()) < 0 or int(prot.max()) >= v):
        raise ValueError(f"protected indices must lie in [0, {v}), got range [{int(prot.min())}, {int(prot.max())}]")
    if t == 0:
        return torch.arange(v, device=attn.device)
    a = attn.float()
    g = a.sum(dim=0)
    u = a.max(dim=0).values
    drop = (g < global_thr * g.sum()) & (u < individual_thr)
    keep = ~drop
    keep[prot] = True
    return keep.nonzero()[:, 0]


def scale_layers(layers: Sequence[int] = DEFAULT_LAYERS, *, depth: int, reference_depth: int = 32) -> list[int]:
    """Prefill pruning layers scaled to an LLM of ``depth`` layers: ``round(l * depth / reference_depth)``.

    Python rounding (half to even), duplicates removed, ascending: depth 24 -> [2, 4, 8, 10]; 28 -> [2, 5, 9, 12];
    32 -> [2, 6, 10, 14]; 40 -> [2, 8, 12, 18].

    Raises:
        ValueError: ``depth`` or ``reference_depth`` below 1, a negative layer, or a scaled layer ``>= depth``.
    """
    depth = _check_int("depth", depth)
    reference_depth = _check_int("reference_depth", reference_depth)
    if depth < 1 or reference_depth < 1:
        raise ValueError(f"depth and reference_depth must be >= 1, got {depth} and {reference_depth}")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of ints, got {layers!r}")
    ints = [_check_int(f"layers[{i}]", layer) for i, layer in enumerate(layers)]
    if any(layer < 0 for layer in ints):
        raise ValueError(f"layers must be >= 0, got {ints}")
    scaled = sorted({round(layer * depth / reference_depth) for layer in ints})
    if scaled and scaled[-1] >= depth:
        raise ValueError(
            f"layers {ints} scaled to depth {depth} give layer {scaled[-1]}, beyond the last ({depth - 1})"
        )
    return scaled


def preset_thresholds(preset: str | int) -> tuple[float, float]:
    """``(global_thr, individual_thr)`` of a preset ``"192"``, ``"128"`` or ``"64"`` (an int is accepted)."""
    key = str(preset) if isinstance(preset, (str, int)) and not isinstance(preset, bool) else None
    if key not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    return PRESETS[key]


def layer_averaged_count(counts: Sequence[float], layers: Sequence[int], depth: int) -> float:
    """The paper's token count: visual tokens each LLM layer processes in prefill, averaged over the layers.

    Layer ``l`` processes ``V_i`` with ``i`` the number of pruning layers before it (a pruning layer still
    processes its input and prunes after), so 32 layers and ``{2, 6, 10, 14}`` give
    ``(3 V_0 + 4 V_1 + 4 V_2 + 4 V_3 + 17 V_4) / 32``.

    Args:
        counts: ``[V_0, V_1, ..., V_m]``: the LLM-input count, then the count after each pruning layer.
        layers: the ``m`` pruning layers, ascending, unique, in ``[0, depth)``.
        depth: LLM layers.
    """
    depth = _check_int("depth", depth)
    ints = [_check_int(f"layers[{i}]", layer) for i, layer in enumerate(layers)]
    if depth < 1 or ints != sorted(set(ints)) or (ints and (ints[0] < 0 or ints[-1] >= depth)):
        raise ValueError(f"layers must be ascending, unique and in [0, {depth}), got {list(layers)} (depth {depth})")
    if len(counts) != len(ints) + 1:
        raise ValueError(f"need {len(ints) + 1} counts (input + one per pruning layer), got {len(counts)}")
    bounds = [-1, *ints, depth - 1]  # layers (bounds[i], bounds[i + 1]] process V_i
    return sum(float(counts[i]) * (bounds[i + 1] - bounds[i]) for i in range(len(counts))) / depth


def _window_indices(h: int, w_grid: int, w: int, device: torch.device) -> Tensor:
    """``[floor(h / w) * floor(w_grid / w), w^2]`` raster indices of every full window, row-major inside."""
    nh, nw = h // w, w_grid // w
    rows = (torch.arange(nh, device=device) * w)[:, None, None, None] + torch.arange(w, device=device)[:, None]
    cols = (torch.arange(nw, device=device) * w)[None, :, None, None] + torch.arange(w, device=device)[None, :]
    return (rows * w_grid + cols).reshape(nh * nw, w * w)


def _window_similarity(x: Tensor, win_idx: Tensor) -> Tensor:
    """Mean pairwise cosine (self pairs excluded) of each window: ``[B, n_win]`` fp32."""
    bsz, _, c = x.shape
    n_win, m = win_idx.shape
    xw = x.float().gather(1, win_idx.reshape(1, -1, 1).expand(bsz, -1, c)).reshape(bsz, n_win, m, c)
    u = xw / xw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = u @ u.transpose(-1, -2)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=x.device)
    return (gram * off_diagonal).sum(dim=(-1, -2)) / (m * (m - 1))


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"


# ---- operator
