"""Where each visual token sits in pixels: the demo's token-to-pixel mapping (pure functions, no Gradio).

A report names tokens by their ORIGINAL unit index within an image (``ImageRecord.kept``, ``groups``). The
image's :class:`~vtr.tokens.ImageLayout` lists its grids in the order the model packs them: unit ``u`` of
the image lies in grid ``g`` when ``start_g <= u < start_g + t*h*w`` (row-major ``t, h, w`` inside it);
units after the last grid (LLaVA-NeXT/OneVision newline rows) have no cell.

A grid covers a picture exactly when we know which pixels the model turned into it. :func:`grid_views`
returns that picture per grid, per family (the token unit is a patch for LLaVA/SigLIP/CLIP towers, a 2x2
merge unit for Qwen2-VL and a pixel-shuffle unit for InternVL; whatever the unit, a grid of ``h x w`` units
tiles its picture as ``h x w`` equal cells). Where the picture is not exactly known (the LLaVA-NeXT /
OneVision unpadded AnyRes canvas) the view carries no picture and a note saying so: the demo shows counts
for it instead of a guessed drawing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vtr.tokens import ImageLayout

__all__ = ["GridSlice", "GridView", "cell_boxes", "denormalize", "grid_slices", "grid_views", "unit_slots"]


@dataclass(frozen=True)
class GridSlice:
    """One drawable ``h x w`` grid of an image: its units are ``start .. start + h*w - 1``, row-major.

    Attributes:
        group: index of the layout grid (tile, frame or temporal step) it comes from.
        step: temporal index inside that grid (0 unless the grid has ``t > 1``).
        start: first unit index, within the image.
        h, w: grid size in token units.
    """

    group: int
    step: int
    start: int
    h: int
    w: int

    @property
    def stop(self) -> int:
        return self.start + self.h * self.w


@dataclass(frozen=True)
class GridView:
    """What one :class:`GridSlice` covers: ``picture`` (RGB) exactly, or ``None`` with ``note`` saying why."""

    picture: Image.Image | None
    label: str
    note: str = ""


def grid_slices(layout: ImageLayout) -> tuple[list[GridSlice], int]:
    """The drawable grids of one image and the number of extra rows after them (e.g. newline rows).

    Returns:
        ``(slices, extra)``: one slice per ``(grid, t)`` in packing order, and ``n_tokens - sum(t*h*w)``.
    """
    slices: list[GridSlice] = []
    start = 0
    for g, (t, h, w) in enumerate(layout.grids):
        if min(t, h, w) < 0:
            raise ValueError(f"grid {g} of the layout has a negative size {(t, h, w)}")
        for s in range(t):
            slices.append(GridSlice(group=g, step=s, start=start, h=h, w=w))
            start += h * w
    extra = layout.n_tokens - start
    if extra < 0:
        raise ValueError(f"the layout's grids cover {start} units but the image has {layout.n_tokens} rows")
    return slices, extra


def cell_boxes(h: int, w: int, width: int, height: int) -> np.ndarray:
    """Pixel boxes of an ``h x w`` token grid laid over a ``width x height`` picture.

    Returns:
        ``[h*w, 4]`` int64 ``(x0, y0, x1, y1)`` per unit in row-major order, ``x1``/``y1`` exclusive. Edges
        are ``floor(i * size / n)``, so the boxes tile the picture exactly (no gap, no overlap) for any sizes.
    """
    if h < 1 or w < 1:
        raise ValueError(f"a token grid needs h, w >= 1, got {h}x{w}")
    if width < 1 or height < 1:
        raise ValueError(f"a picture needs width, height >= 1, got {width}x{height}")
    xs = np.arange(w + 1, dtype=np.int64) * width // w
    ys = np.arange(h + 1, dtype=np.int64) * height // h
    x0, y0 = np.meshgrid(xs[:-1], ys[:-1])
    x1, y1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([x0.ravel(), y0.ravel(), x1.ravel(), y1.ravel()], axis=1)


def unit_slots(n_units: int, kept: Sequence[int], groups: Sequence[int] | None) -> np.ndarray:
    """For each original unit of an image, the position in ``kept`` of the token covering it (``-1``: dropped).

    ``groups`` is :attr:`vtr.report.ImageRecord.groups` (``None`` when nothing merged: each kept token covers
    only its own unit). Returns ``[n_units]`` int64.
    """
    if groups is not None:
        slots = np.asarray(groups, dtype=np.int64)
        if slots.shape != (n_units,):
            raise ValueError(f"groups has {slots.shape[0]} entries for an image of {n_units} units")
        if len(slots) and (slots.min() < -1 or slots.max() >= len(kept)):
            raise ValueError(f"groups values must lie in [-1, {len(kept)}), got [{slots.min()}, {slots.max()}]")
        return slots
    idx = np.asarray(kept, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_units):
        raise ValueError(f"kept indices must lie in [0, {n_units}), got [{idx.min()}, {idx.max()}]")
    slots = np.full(n_units, -1, dtype=np.int64)
    slots[idx] = np.arange(len(idx))
    return slots


def denormalize(pixels: Any, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """``[3, H, W]`` normalised pixel values (a processor's output) back to an RGB picture."""
    arr = np.asarray(pixels.detach().float().cpu() if hasattr(pixels, "detach") else pixels, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected [3, H, W] pixel values, got shape {arr.shape}")
    arr = arr * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return Image.fromarray((arr.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))


# ----------------------------------------------------------------------------------------------- per family
@dataclass
class ViewInputs:
    """What the views of one image or video are read from (one image or video per prompt).

    Attributes:
        media: the picture given to the processor, or the video frames it took (``[T, H, W, 3]`` uint8).
        inputs: the processor outputs (``pixel_values``, ``pixel_values_videos``, ...).
        processor: the model's processor (normalisation constants, temporal patch size).
    """

    media: Image.Image | np.ndarray
    inputs: Any
    processor: Any


def _norm(proc: Any) -> tuple[Sequence[float], Sequence[float]]:
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(proc).__name__} has no image_mean/image_std to undo its normalisation")
    return mean, std


def _input_view(pixels: Any, proc: Any, label: str) -> GridView:
    return GridView(denormalize(pixels, *_norm(proc)), label)


def _frame(frames: np.ndarray, i: int) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(frames[min(i, len(frames) - 1)]))


def _llava_views(layout: ImageLayout, slices: list[GridSlice], v: ViewInputs) -> list[GridView]:
    # CLIP processors resize and centre-crop: the encoder saw pixel_values[0], not the whole upload.
    return [_input_view(v.inputs["pixel_values"][0], v.processor.image_processor, "model input") for _ in slices]


def _anyres_views(layout: ImageLayout, slices: list[GridSlice], v: ViewInputs) -> list[GridView]:
    if layout.kind == "video":  # OneVision: one pooled grid per frame, each covering the whole frame
        pix = v.inputs["pixel_values_videos"][0]
        proc = v.processor.video_processor
        return [_input_view(pix[s.group], proc, f"frame {s.group}") for s in slices]
    out = []
    for s in slices:
        if s.group == 0:
            out.append(_input_view(v.inputs["pixel_values"][0][0], v.processor.image_processor, "base view"))
        else:
            out.append(
                GridView(
                    None,
                    f"AnyRes canvas {s.h}x{s.w}",
                    "the unpadded AnyRes canvas (tiles stitched, padding cut, maybe resized) is not drawn: "
                    "its tokens are counted but their pixels are not mapped exactly",
                )
            )
    return out


def _qwen_views(layout: ImageLayout, slices: list[GridSlice], v: ViewInputs) -> list[GridView]:
    # The Qwen2-VL processor resizes the WHOLE image (no crop) to the grid, so the upload itself is exact.
    if layout.kind != "video":
        return [GridView(v.media, "image") for _ in slices]
    step = int(getattr(v.processor.video_processor, "temporal_patch_size", 1) or 1)
    frames = v.media
    views = []
    for s in slices:
        first = s.group * step
        last = min(first + step, len(frames)) - 1
        label = f"frame {first}" if last == first else f"frames {first}-{last}"
        views.append(GridView(_frame(frames, first), label))
    return views


def _tile_views(layout: ImageLayout, slices: list[GridSlice], v: ViewInputs) -> list[GridView]:
    # InternVL: one grid per tile in model order, the global thumbnail last (when tiled).
    pix = v.inputs["pixel_values"]
    n = len(layout.grids)
    return [
        _input_view(
            pix[s.group], v.processor.image_processor, "thumbnail" if n > 1 and s.group == n - 1 else f"tile {s.group}"
        )
        for s in slices
    ]


#: Picture kind (the adapter's ``picture`` fact) -> view builder; models that do not describe it get counts only.
VIEWS: dict[str, Callable[[ImageLayout, list[GridSlice], ViewInputs], list[GridView]]] = {
    "crop": _llava_views,
    "anyres": _anyres_views,
    "whole": _qwen_views,
    "tiles": _tile_views,
}


def grid_views(picture: str | None, layout: ImageLayout, slices: list[GridSlice], inputs: ViewInputs) -> list[GridView]:
    """The picture each slice of ``layout`` covers, for a model whose adapter's ``picture`` fact is ``picture``."""
    build = VIEWS.get(picture) if picture is not None else None
    if build is None:
        note = f"no token-to-pixel mapping for picture kind {picture!r}: tokens are counted, not drawn"
        return [GridView(None, f"grid {s.group}", note) for s in slices]
    views = build(layout, slices, inputs)
    if len(views) != len(slices):  # pragma: no cover - a builder bug
        raise RuntimeError(f"{picture} view builder returned {len(views)} views for {len(slices)} grids")
    return views
