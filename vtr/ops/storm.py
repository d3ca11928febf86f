"""STORM-style training-free pooling (spec: specs/storm.md): temporal sampling, temporal and spatial pooling.

STORM ("Token-Efficient Long Video Understanding for Multimodal LLMs", arXiv 2503.04130) pools video tokens
after a trained Mamba temporal encoder. vtr ships only the training-free pooling operators; without that
encoder, temporal sampling is plain frame subsampling (never report it as a STORM result).

Functional cores (pure, one video; means in fp32 (float64 stays float64), cast back to the input dtype):

* :func:`temporal_sample` keeps frames ``0, s, 2s, ...``;
* :func:`temporal_pool` averages groups of ``k`` consecutive frames (a shorter last group: no frame dropped);
* :func:`spatial_pool` averages ``p x p`` windows of each frame's grid (partial border windows).

Operators (``pre_llm``, act on every video of a sample, images untouched): :class:`TemporalPool`,
:class:`SpatialPool`, :class:`TemporalSample`. Each works on the frame grids of the current tokens, so they
chain in any order; the ``storm`` recipe chains them pool, pool, sample (the paper's order) and the report
shows each step. Representatives (whose original position a pooled token takes): the first frame of a temporal
group, the top-left cell of a spatial window, the kept frame for sampling.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtr.ops._video import VideoGrid, require_video, video_grids
from vtr.ops.base import OpContext, Operator
from vtr.tokens import VisualTokens

__all__ = [
    "SpatialPool",
    "TemporalPool",
    "TemporalSample",
    "spatial_pool",
    "storm_chain",
    "temporal_pool",
    "temporal_sample",
]


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32 (half inputs are averaged in fp32, float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_scope(op: str, scope) -> None:
    # The operators act on each whole video; "image" is vtr's name for that budget unit (per image/video).
    if scope != "image":
        raise ValueError(f"{op} acts on each whole video: scope must be 'image', got {scope!r}")


def _factor(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------ cores
def temporal_sample(x: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Keep every ``stride``-th frame of ``x`` ``[T, ...]``.

    Returns ``(x[kept], kept)`` with ``kept = [0, s, 2s, ...]`` (``[ceil(T/s)]`` long). ``stride = 1`` is the
    identity; ``stride <= 0`` raises ``ValueError``.
    """
    s = _factor(stride, "stride")
    kept = torch.arange(0, x.shape[0], s, device=x.device)
    return x[kept], kept


def temporal_pool(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average groups of ``k`` consecutive frames of ``x`` ``[T, N, D]``.

    Group ``g`` covers frames ``[g*k, min((g+1)*k, T))``; the last group is shorter when ``k`` does not divide
    ``T`` (no frame is dropped). Returns ``([ceil(T/k), N, D], starts)`` where ``starts`` ``[ceil(T/k)]`` holds
    each group's first frame. ``k = 1`` is the identity; ``k <= 0`` raises ``ValueError``.
    """
    k = _factor(k, "k")
    if x.ndim != 3:
        raise ValueError(f"temporal_pool expects x of shape [T, N, D], got {tuple(x.shape)}")
    t = x.shape[0]
    starts = torch.arange(0, t, k, device=x.device)
    if k == 1 or t == 0:
        return x, starts
    group = torch.arange(t, device=x.device) // k
    sums = torch.zeros(len(starts), *x.shape[1:], dtype=_acc(x), device=x.device)
    sums.index_add_(0, group, x.to(sums.dtype))
    counts = torch.bincount(group, minlength=len(starts)).to(sums.dtype)
    return (sums / counts.view(-1, 1, 1)).to(x.dtype), starts


def spatial_pool(x: Tensor, grid: tuple[int, int], p: int = 2) -> tuple[Tensor, tuple[int, int]]:
    """``p x p`` average pooling with stride ``p`` on each frame's ``H x W`` grid (raster order).

    Args:
        x: ``[T, H*W, D]``.
        grid: ``(H, W)``.
        p: window side; ``p = 1`` is the identity.

    Returns:
        ``([T, H'*W', D], (H', W'))`` with ``H' = ceil(H/p)``, ``W' = ceil(W/p)``. Border windows are partial
        and averaged over their real members. Output cell ``(i, j)``'s representative is input cell ``(p*i, p*j)``.
    """
    p = _factor(p, "p")
    if x.ndim != 3:
        raise ValueError(f"spatial_pool expects x of shape [T, H*W, D], got {tuple(x.shape)}")
    h, w = (int(v) for v in grid)
    if h <= 0 or w <= 0 or h * w != x.shape[1]:
        raise ValueError(f"spatial_pool: grid {tuple(grid)} does not hold the {x.shape[1]} tokens of a frame")
    oh, ow = math.ceil(h / p), math.ceil(w / p)
    if p == 1:
        return x, (h, w)
    t, d = x.shape[0], x.shape[2]
    # Zero-pad to whole windows, sum each window, divide by its number of real cells.
    grid_x = F.pad(x.to(_acc(x)).view(t, h, w, d), (0, 0, 0, ow * p - w, 0, oh * p - h))
    sums = grid_x.view(t, oh, p, ow, p, d).sum(dim=(2, 4))
    rows = torch.clamp(h - torch.arange(oh, device=x.device) * p, max=p)
    cols = torch.clamp(w - torch.arange(ow, device=x.device) * p, max=p)
    counts = (rows.view(oh, 1) * cols.view(1, ow)).to(grid_x.dtype)
    return (sums / counts.view(1, oh, ow, 1)).reshape(t, oh * ow, d).to(x.dtype), (oh, ow)


# ------------------------------------------------------------------------------------------------ operators
@dataclass
class _FramePooling(Operator):
    """Shared shell: apply :meth:`pool` to every video's frame grid; images and other rows pass through.

    Outputs are built with :meth:`VisualTokens.merge` (sizes = summed member sizes, sources tracked sparsely), so
    memory stays O(original tokens) however long the video.
    """

    def is_identity(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def pool(self, x: Tensor, grid: VideoGrid) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        """``x`` ``[T, h*w, D]`` -> (outputs ``[K, D]``, output of each input cell ``[T, h*w]`` (-1: dropped),
        representative of each output as a flat index into ``[T, h*w]`` ``[K]``)."""
        raise NotImplementedError

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        require_video(tokens, self.name)
        if self.is_identity():
            return tokens
        grids = video_grids(tokens, self.name)
        dev = tokens.embeds.device
        assign = torch.full((len(tokens),), -1, dtype=torch.long, device=dev)
        in_video = torch.zeros(len(tokens), dtype=torch.bool, device=dev)
        for g in grids:
            in_video[g.pos.flatten()] = True
        others = (~in_video).nonzero().flatten()
        assign[others] = torch.arange(len(others), device=dev)
        embeds, reps = [tokens.embeds[others]], [others]
        offset = len(others)
        for g in grids:
            flat = g.pos.flatten()
            out, member_of, rep = self.pool(tokens.embeds[g.pos], g)
            member_of = member_of.flatten()
            dropped = member_of < 0
            if bool(tokens.protected[flat[dropped]].any()):
                raise ValueError(f"{self.name} would drop protected tokens: place it before operators that protect")
            assign[flat] = torch.where(dropped, member_of, member_of + offset)
            embeds.append(out)
            reps.append(flat[rep])
            offset += len(out)
        return tokens.merge(assign, torch.cat(embeds), torch.cat(reps)).sorted()


@dataclass
class TemporalPool(_FramePooling):
    """Average every ``k`` consecutive frames of each video (STORM-style temporal pooling, ``pre_llm``).

    A pooled frame takes the position of its group's first frame; ``T mod k`` frames form a shorter last group.
    ``keep`` (a ratio in (0, 1]) is the budget-matched form: it sets ``k = round(1 / keep)`` and replaces ``k``
    (``vtr.wrap(model, "storm", keep=0.25)`` pools groups of 4). Acts on videos only, each as a whole
    (``scope="image"``, the only scope accepted); images pass through.
    """

    k: int = 4
    keep: float | None = None
    scope: str = "image"

    def validate(self) -> None:
        _check_scope(self.name, self.scope)
        _factor(self.k, f"{self.name}.k")
        if self.keep is not None and (
            isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Real) or not 0.0 < float(self.keep) <= 1.0
        ):
            raise ValueError(f"{self.name}.keep must be None or a ratio in (0, 1], got {self.keep!r}")

    @property
    def factor(self) -> int:
        """The group size in force: ``round(1 / keep)`` when ``keep`` is set, else ``k``."""
        return max(1, round(1.0 / float(self.keep))) if self.keep is not None else int(self.k)

    def is_identity(self) -> bool:
        return self.factor == 1

    def pool(self, x: Tensor, grid: VideoGrid) -> tuple[Tensor, Tensor, Tensor]:
        t, n, d = x.shape
        k = self.factor
        y, starts = temporal_pool(x, k)
        cells = torch.arange(n, device=x.device)
        member_of = (torch.arange(t, device=x.device) // k).view(t, 1) * n + cells
        rep = (starts.view(-1, 1) * n + cells).flatten()
        return y.reshape(-1, d), member_of, rep


@dataclass
class SpatialPool(_FramePooling):
    """Average ``p x p`` windows of every video frame's token grid (STORM-style spatial pooling, ``pre_llm``).

    A pooled cell takes the position of its window's top-left cell; border windows are partial (no token
    dropped). On Qwen2-VL the grid is the merged-unit grid of one temporal step; on LLaVA-OneVision the 2x2-pooled
    frame grid. Acts on videos only; images pass through.
    """

    p: int = 2
    scope: str = "image"

    def validate(self) -> None:
        _check_scope(self.name, self.scope)
        _factor(self.p, f"{self.name}.p")

    def is_identity(self) -> bool:
        return self.p == 1

    def pool(self, x: Tensor, grid: VideoGrid) -> tuple[Tensor, Tensor, Tensor]:
        t, n, d = x.shape
        h, w = grid.grid
        p = self.p
        y, (oh, ow) = spatial_pool(x, (h, w), p)
        dev = x.device
        r, c = torch.arange(h, device=dev).view(h, 1), torch.arange(w, device=dev).view(1, w)
        window = ((r // p) * ow + c // p).flatten()  # [h*w] output cell of each input cell
        member_of = torch.arange(t, device=dev).view(t, 1) * (oh * ow) + window
        i, j = torch.arange(oh, device=dev).view(oh, 1), torch.arange(ow, device=dev).view(1, ow)
        top_left = ((p * i) * w + p * j).flatten()
        rep = (torch.arange(t, device=dev).view(t, 1) * n + top_left).flatten()
        return y.reshape(-1, d), member_of, rep


@dataclass
class TemporalSample(_FramePooling):
    """Keep every ``stride``-th frame of each video (test-time temporal sampling, ``pre_llm``).

    Without STORM's trained temporal encoder this is plain frame subsampling. Acts on videos only.
    """

    stride: int = 2
    scope: str = "image"

    def validate(self) -> None:
        _check_scope(self.name, self.scope)
        _factor(self.stride, f"{self.name}.stride")

    def is_identity(self) -> bool:
        return self.stride == 1

    def pool(self, x: Tensor, grid: VideoGrid) -> tuple[Tensor, Tensor, Tensor]:
        t, n, _d = x.shape
        y, kept = temporal_sample(x, self.stride)
        frame = torch.arange(t, device=x.device)
        cells = torch.arange(n, device=x.device)
        slot = torch.where(frame % self.stride == 0, frame // self.stride, -1).view(t, 1)
        member_of = torch.where(slot >= 0, slot * n + cells, -1)
        rep = (kept.view(-1, 1) * n + cells).flatten()
        return y.reshape(-1, y.shape[-1]), member_of, rep


def storm_chain(k: int = 4, p: int = 1, stride: int = 1) -> list[Operator]:
    """The ``storm`` recipe: temporal pooling, spatial pooling, then temporal sampling (ratios multiply)."""
    return [TemporalPool(k=k), SpatialPool(p=p), TemporalSample(stride=stride)]
