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

Operators, one per stage (recipe ``mustdrop`` chains all four, ``mustdrop_vision`` the first two):
:class:`MustDropMerge` (``vision``, after encoder block 0), :class:`MustDropKeys` (``pre_llm``: the key set, from the
last encoder block's attention), :class:`MustDropFilter` (``prefill``, after each pruning layer) and
:class:`MustDropCache` (``decode``: the KV caches from the first pruning layer on). Only original positions.
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
from vtr.ops.base import CacheOperator, LayerOperator, OpContext, Operator, VisionOperator
from vtr.tokens import TowerTokens, VisualTokens

__all__ = [
    "DEFAULT_LAYERS",
    "KEY_RATE",
    "KEY_SCORES",
    "PLACEMENTS",
    "PRESETS",
    "MustDropCache",
    "MustDropFilter",
    "MustDropKeys",
    "MustDropMerge",
    "dual_attention_keep",
    "key_set",
    "layer_averaged_count",
    "preset_thresholds",
    "pruning_layers",
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

#: Where :class:`MustDropMerge` acts: ``"auto"`` (in the encoder where the family can host it, else after the
#: projector), ``"vision"`` (after encoder block ``block``) or ``"pre_llm"`` (on the LLM-input tokens).
PLACEMENTS = ("auto", "vision", "pre_llm")
#: Key-set scores: ``"auto"`` (``cls_attn`` or ``mean_received`` by encoder), explicit, or ``"none"`` (no key set).
KEY_SCORES = (*SCORES, "none")


def _extra_rows(tokens: VisualTokens) -> Tensor:
    """``[N]`` bool: rows beyond their image's grids (LLaVA-NeXT/OneVision newline rows)."""
    n_grid = torch.tensor([sum(t * h * w for t, h, w in im.grids) for im in tokens.layout], dtype=torch.long)
    offset = torch.tensor([im.offset for im in tokens.layout], dtype=torch.long)
    img = tokens.image.cpu()
    return ((tokens.index.cpu() - offset[img]) >= n_grid[img]).to(tokens.index.device)


def _window_assignment(sources: Tensor, order: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(assign [n], rep [K])`` of one merged sequence: outputs re-sorted to raster order of their anchors.

    ``sources`` is the ``[K, w^2]`` map of :func:`window_merge` (padded with -1, anchor last); ``order`` the
    permutation of its outputs by anchor.
    """
    src = sources[order]
    anchor = src.max(dim=1).values  # the bottom-right source (the last valid entry)
    assign = torch.full((n,), -1, dtype=torch.long, device=src.device)
    out = torch.arange(len(src), device=src.device).unsqueeze(1).expand_as(src)
    assign[src[src >= 0]] = out[src >= 0]
    return assign, anchor


@dataclass
class MustDropMerge(VisionOperator):
    """MustDrop stage A1 (spec ``mustdrop.md``): after encoder block 0, every ``window x window`` window of the
    unit grid whose units are nearly identical (mean pairwise cosine ``>= threshold``) becomes one unit, their
    mean, at the position of the window's bottom-right unit (its anchor).

    Units are the family's token unit (a patch; a 2x2 unit on Qwen2-VL and InternVL, whose mean is taken per patch
    slot so the merger/pixel shuffle still sees 4 patches). Each encoder sequence (image, tile, frame) is merged on
    its own: the official batch minimum of merged windows only kept tensor lengths equal, which padding makes
    unnecessary, so a tile's result never depends on the other tiles.

    Args:
        window: window side (>= 2; 3 in the paper).
        threshold: merge windows whose similarity is at least this (0.8).
        block: encoder block after which the merge runs (0).
        placement: ``"auto"`` (inside the encoder where the family can host it, else after the projector),
            ``"vision"`` or ``"pre_llm"`` (on each image/frame's LLM-input tokens: the spec's documented variant for
            LLaVA-OneVision videos, whose frames the model pools 2x2 on full grids after the encoder).
    """

    window: int = 3
    threshold: float = 0.8
    block: int = 0
    placement: str = "auto"

    position_modes: ClassVar[tuple[str, ...]] = ("original",)

    def validate(self) -> None:
        if _check_int("MustDropMerge.window", self.window) < 2:
            raise ValueError(f"MustDropMerge.window must be >= 2, got {self.window}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
            raise ValueError(f"MustDropMerge.threshold must be a finite number (0.8 in the paper), got {t!r}")
        if _check_int("MustDropMerge.block", self.block) < 0:
            raise ValueError(f"MustDropMerge.block must be >= 0 (an encoder block), got {self.block}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"MustDropMerge.placement must be one of {PLACEMENTS}, got {self.placement!r}")

    @property
    def stage(self) -> str:  # type: ignore[override]
        return "pre_llm" if self.placement == "pre_llm" else "vision"

    def bind(self, adapter) -> MustDropMerge:
        if self.placement == "pre_llm":
            return self
        facts = adapter.tower() if "vision" in adapter.supported_stages else None
        reason = None
        if facts is None:
            reason = "it has no vision stage"
        elif facts.refuse is not None:
            reason = facts.refuse
        elif facts.info.unit not in self.units:
            reason = f"it has a {facts.info.unit!r} token unit"
        if reason is not None:
            if self.placement == "vision":
                raise ValueError(
                    f"MustDropMerge cannot act in the {adapter.name} encoder ({reason}): use placement='pre_llm'"
                )
            return dataclasses.replace(self, placement="pre_llm")
        if self.block > facts.info.feature_block:
            raise ValueError(
                f"MustDropMerge.block={self.block}: the {adapter.name} encoder's features come from block "
                f"{facts.info.feature_block}"
            )
        return dataclasses.replace(self, placement="vision")

    def points(self, info) -> list[tuple[int, str]]:
        return [(self.block, "post")]

    def apply_tower(self, tokens: TowerTokens, ctx: OpContext) -> TowerTokens:
        s_count, u_max, _ = tokens.x.shape
        dev = tokens.x.device
        intact = tokens.valid.sum(1) == torch.tensor([h * w for h, w in tokens.grid], device=dev)
        rows = torch.arange(u_max, device=dev).expand(s_count, u_max)
        if not bool(intact.all()) or not bool(torch.where(tokens.valid, tokens.index == rows, True).all()):
            raise ValueError("MustDropMerge needs every unit of the grid (an earlier vision operator changed them)")
        outs = []
        for s in range(s_count):
            h, w = tokens.grid[s]
            x, _, sources = window_merge(tokens.x[s : s + 1, : h * w], (h, w), self.window, self.threshold)
            order = torch.argsort(sources[0].max(dim=1).values)
            assign, anchor = _window_assignment(sources[0], order, u_max)
            outs.append((assign, x[0][order], anchor))
        k = max(len(a) for _, _, a in outs)
        assign = torch.stack([a for a, _, _ in outs])
        x = tokens.x.new_zeros(s_count, k, tokens.x.shape[-1])
        rep = torch.zeros(s_count, k, dtype=torch.long, device=dev)
        valid = torch.zeros(s_count, k, dtype=torch.bool, device=dev)
        for s, (_, xs, anchor) in enumerate(outs):
            x[s, : len(xs)] = xs
            rep[s, : len(anchor)] = anchor
            valid[s, : len(anchor)] = True
        return tokens.merge(assign, x, rep, valid)

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        if self.placement != "pre_llm":
            raise TypeError("this MustDropMerge acts inside the vision encoder: use it through vtr.wrap")
        if len(tokens) == 0:
            return tokens
        extra = _extra_rows(tokens)
        parts = [tokens.take(extra.nonzero().flatten())] if bool(extra.any()) else []
        for i, im in enumerate(tokens.layout):
            start = im.offset
            for g, (t, h, w) in enumerate(im.grids):
                for f in range(t):
                    lo = start + f * h * w
                    pos = ((tokens.image == i) & ~extra & (tokens.index >= lo) & (tokens.index < lo + h * w)).nonzero()
                    pos = pos.flatten()
                    if len(pos) == 0:
                        continue
                    frame = tokens.take(pos[torch.argsort(tokens.index[pos])])
                    if len(frame) != h * w or frame.owner is not None:
                        raise ValueError(
                            f"MustDropMerge (pre_llm) needs the intact token grid of image {i}, group {g}: an earlier "
                            "operator changed it"
                        )
                    x, _, sources = window_merge(frame.embeds[None], (h, w), self.window, self.threshold)
                    order = torch.argsort(sources[0].max(dim=1).values)
                    assign, anchor = _window_assignment(sources[0], order, len(frame))
                    parts.append(frame.merge(assign, x[0][order], anchor))
                start += t * h * w
        return VisualTokens.cat(parts).sorted()


@dataclass
class MustDropKeys(Operator):
    """MustDrop stage A2: the key set, protected from every later stage (the prefill filter, other operators).

    Per encoder sequence (image, tile, frame), the stable top ``ceil(rate * n)`` of its ``n`` remaining units by
    the attention of the LAST encoder block (``layer``): the CLS row, or on CLS-free encoders the mean attention
    each unit receives (summed per token unit). Newline rows are protected too. Runs before the LLM (``pre_llm``)
    because the last block comes after the feature layer on LLaVA (CLS attention of block 23, features of 22).

    Args:
        rate: share of the units kept as keys (0.08).
        score: ``"auto"``, ``"cls_attn"``, ``"mean_received"`` or ``"none"`` (no key set: for rows the encoder
            cannot score, e.g. LLaVA-OneVision videos with ``MustDropMerge(placement="pre_llm")``).
        layer: encoder block of the scores (-1: the last).
    """

    stage: ClassVar[str] = "pre_llm"
    position_modes: ClassVar[tuple[str, ...]] = ("original",)

    rate: float = KEY_RATE
    score: str = "auto"
    layer: int = -1

    def validate(self) -> None:
        r = self.rate
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 < float(r) <= 1.0:
            raise ValueError(f"MustDropKeys.rate must be a number in (0, 1], got {r!r}")
        self.rate = float(r)
        if self.score not in KEY_SCORES:
            raise ValueError(f"MustDropKeys.score must be one of {KEY_SCORES}, got {self.score!r}")
        _check_int("MustDropKeys.layer", self.layer)

    def bind(self, adapter) -> MustDropKeys:
        if self.score == "none":
            return self
        facts, kind = resolve_score("MustDropKeys", self.score, adapter)
        depth = facts.info.num_blocks
        layer = self.layer + depth if self.layer < 0 else self.layer
        if not 0 <= layer < depth:
            raise ValueError(f"MustDropKeys.layer={self.layer}: the {adapter.name} encoder has blocks 0..{depth - 1}")
        return dataclasses.replace(self, score=kind, layer=layer)

    def _signal(self) -> str | None:
        if self.score == "none":
            return None
        if self.score == "auto" or self.layer < 0:
            raise RuntimeError("MustDropKeys resolves its score and layer in bind(adapter): run it through vtr.wrap")
        return f"{self.score}@{self.layer}"

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        name = self._signal()
        return () if name is None else (name,)

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        if len(tokens) == 0:
            return tokens
        extra = _extra_rows(tokens)
        protected = tokens.protected | extra
        name = self._signal()
        if name is not None:
            if name not in tokens.scores or tokens.encoder is None:
                raise ValueError(f"MustDropKeys needs the vision-stage signal {name!r}: run it through vtr.wrap")
            score = tokens.scores[name].float()
            seq, code = tokens.encoder[:, 0], tokens.encoder[:, 1]
            for i, im in enumerate(tokens.layout):
                mine = (tokens.image == i) & ~extra
                if not bool(mine.any()):
                    continue
                if not bool((code[mine] >= 0).all()):
                    raise ValueError(
                        f"MustDropKeys: the rows of this {im.kind} carry no vision-encoder provenance (e.g. "
                        "LLaVA-OneVision's pooled video frames), so they have no key scores: use score='none'"
                    )
                for s in seq[mine].unique().tolist():
                    rows = (mine & (seq == s)).nonzero().flatten()
                    rows = rows[torch.argsort(tokens.index[rows])]
                    protected[rows[key_set(score[rows], self.rate)]] = True
        return dataclasses.replace(tokens, protected=protected)


def pruning_layers(op: str, layers: Sequence[int], scale: bool, reference_depth: int, n_layers: int) -> list[int]:
    """MustDrop's prefill pruning layers for an LLM of ``n_layers``.

    A pruning layer needs a later layer that sees its result. Scaled layers (``round(l * n_layers /
    reference_depth)``) that land on the last layer are left out, which happens only on very shallow LLMs (the
    default ``P`` keeps all four from 9 layers on); explicit layers (``scale=False``) must fit. Raises
    ``ValueError`` naming ``op`` and the layers when none is left or an explicit layer does not fit.
    """
    last = n_layers - 1
    if scale:
        out = [layer for layer in scale_layers(layers, depth=n_layers, reference_depth=reference_depth) if layer < last]
    else:
        out = sorted(set(layers))
    if not out or out[-1] >= last:
        how = f", scaled from a {reference_depth}-layer LLM" if scale else ""
        raise ValueError(
            f"{op}.layers={list(layers)}{how}: a pruning layer needs a later layer to see the pruned set, and the "
            f"language model has layers 0..{last}"
        )
    return out


@dataclass
class _MustDropLayers:
    """Fields shared by the prefill filter and the cache compaction (overrides set both)."""

    layers: tuple[int, ...] = DEFAULT_LAYERS
    scale: bool = True
    reference_depth: int = 32

    def _validate_layers(self, op: str) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
            raise TypeError(f"{op}.layers must be a sequence of LLM layer indices, got {self.layers!r}")
        self.layers = tuple(_check_int(f"{op}.layers[{i}]", v) for i, v in enumerate(self.layers))
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"{op}.layers must be non-empty LLM layer indices >= 0, got {list(self.layers)}")
        if not isinstance(self.scale, bool):
            raise TypeError(f"{op}.scale must be True or False, got {self.scale!r}")
        if _check_int(f"{op}.reference_depth", self.reference_depth) < 1:
            raise ValueError(f"{op}.reference_depth must be >= 1, got {self.reference_depth}")

    def pruning_layers(self, n_layers: int) -> list[int]:
        """The layers ``P`` after which visual tokens are dropped, for an LLM of ``n_layers``."""
        return pruning_layers(type(self).__name__, self.layers, self.scale, self.reference_depth, n_layers)


@dataclass
class MustDropFilter(_MustDropLayers, LayerOperator):
    """MustDrop stage B, dual-attention filtering in prefill: after each layer ``l`` of ``P`` (``{2, 6, 10, 14}``
    on 32 layers, scaled by ``round(l * depth / 32)``), drop the visual tokens that the text rows attend to
    weakly both in total and individually (:func:`dual_attention_keep` on the text rows' attention recomputed
    from layer ``l``'s q/k); key-set and newline rows are never dropped. Layer ``l`` itself sees its whole input.

    Args:
        layers: ``P``, in layers of a ``reference_depth``-layer LLM when ``scale`` (default), else absolute.
        preset: thresholds tuned on LLaVA-1.5-7B for 192 / 128 / 64 layer-averaged tokens (``"192"``, ...).
        global_thr, individual_thr: override the preset's thresholds.
    """

    preset: str = "192"
    global_thr: float | None = None
    individual_thr: float | None = None

    position_modes: ClassVar[tuple[str, ...]] = ("original",)

    def validate(self) -> None:
        self._validate_layers("MustDropFilter")
        preset_thresholds(self.preset)  # raises naming the allowed presets
        self.preset = str(self.preset)
        for name in ("global_thr", "individual_thr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise ValueError(f"MustDropFilter.{name} must be a finite number or None (the preset's), got {v!r}")

    @property
    def thresholds(self) -> tuple[float, float]:
        """``(global_thr, individual_thr)`` in force."""
        g, i = preset_thresholds(self.preset)
        return (
            g if self.global_thr is None else float(self.global_thr),
            i if self.individual_thr is None else float(self.individual_thr),
        )

    def layer_indices(self, n_layers: int) -> list[int]:
        return [layer + 1 for layer in self.pruning_layers(n_layers)]

    def layer_index(self, n_layers: int) -> int:
        return self.layer_indices(n_layers)[0]

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        return tuple(f"text_rows_attn@{layer}" for layer in self.pruning_layers(n_layers))

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        if len(tokens) == 0:
            return tokens
        layer = ctx.extras.get("layer")
        name = None if layer is None else f"text_rows_attn@{layer - 1}"
        if name not in tokens.scores:
            raise ValueError(
                f"MustDropFilter needs the signal {name or 'text_rows_attn@<l>'!r}: run it through vtr.wrap"
            )
        keep = dual_attention_keep(tokens.scores[name].T, *self.thresholds, tokens.protected.nonzero().flatten())
        return tokens if len(keep) == len(tokens) else tokens.take(keep)


@dataclass
class MustDropCache(_MustDropLayers, CacheOperator):
    """MustDrop stage C, after prefill: the KV cache of every layer from the first pruning layer ``min(P)`` on
    keeps the text rows plus the final visual set (what the last layer saw); earlier layers keep theirs.

    Layer 0 always keeps its cache (decode positions are counted from it), which matters only when ``min(P) = 0``
    (LLMs of 8 layers or fewer with the default ``P``). Use the same ``layers`` as :class:`MustDropFilter`.
    """

    position_modes: ClassVar[tuple[str, ...]] = ("original",)

    def validate(self) -> None:
        self._validate_layers("MustDropCache")

    def cache_layers(self, n_layers: int) -> list[int]:
        first = self.pruning_layers(n_layers)[0]
        return list(range(max(first, 1), n_layers))

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        return tokens  # the final set: what the last layer saw
