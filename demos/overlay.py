"""Drawing kept tokens on pictures (pure functions on PIL images and numpy arrays, no Gradio).

A token overlay dims the cells of dropped units, outlines every kept token (the outline follows the
boundary of a merged token's cells) and tints the cells of merged tokens by group, so a reader sees at
once what survived and what was pooled together. Several overlays (video frames, tiles) are laid out as a
captioned strip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vtr.demos.geometry import cell_boxes

__all__ = ["PALETTE", "draw_tokens", "strip"]

#: Tints of merged groups (tab10 without grey), cycled by token.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
KEPT_OUTLINE = (0, 229, 255)
MERGED_OUTLINE = (255, 255, 255)
DIM = 0.28  # brightness of dropped cells
TINT = 0.45  # opacity of a merged group's colour


def _display_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """Scale so the longer side lies in ``[min_side, max_side]`` (tiny model inputs are enlarged)."""
    long = max(width, height)
    scale = min_side / long if long < min_side else (max_side / long if long > max_side else 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw_tokens(
    picture: Image.Image,
    h: int,
    w: int,
    slots: np.ndarray,
    merged: np.ndarray | None = None,
    *,
    min_side: int = 320,
    max_side: int = 480,
) -> Image.Image:
    """Overlay an ``h x w`` token grid on ``picture``.

    Args:
        picture: what the grid covers exactly (see :func:`vtr.demos.geometry.grid_views`).
        h, w: grid size in token units.
        slots: ``[h*w]`` int, the token covering each cell (any id shared by the cells of one token), ``-1``
            for dropped cells.
        merged: ``[h*w]`` bool, cells whose token covers more than one unit (tinted by token); ``None``: none.
        min_side, max_side: display size bounds of the longer side.

    Returns:
        a new RGB image: dropped cells dimmed, merged cells tinted, every kept token outlined.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if slots.shape != (h * w,):
        raise ValueError(f"slots must have {h * w} entries for a {h}x{w} grid, got shape {slots.shape}")
    if merged is not None and np.asarray(merged).shape != (h * w,):
        raise ValueError(f"merged must have {h * w} entries for a {h}x{w} grid, got shape {np.asarray(merged).shape}")
    size = _display_size(*picture.size, min_side, max_side)
    # Nearest keeps upscaled tiny inputs crisp, so cells line up with what the model saw.
    resample = Image.Resampling.NEAREST if size[0] > picture.size[0] else Image.Resampling.BILINEAR
    arr = np.asarray(picture.convert("RGB").resize(size, resample), dtype=np.float32).copy()
    boxes = cell_boxes(h, w, *size)
    grid = slots.reshape(h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if slots[i] < 0:
            arr[y0:y1, x0:x1] *= DIM
        elif merged is not None and merged[i]:
            colour = np.asarray(PALETTE[int(slots[i]) % len(PALETTE)], np.float32)
            arr[y0:y1, x0:x1] = (1 - TINT) * arr[y0:y1, x0:x1] + TINT * colour
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    cell = min(size[0] / w, size[1] / h)
    width = 2 if cell >= 10 else 1
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        s = slots[i]
        if s < 0:
            continue
        r, c = divmod(i, w)
        colour = MERGED_OUTLINE if merged is not None and merged[i] else KEPT_OUTLINE
        # Outline only the sides where the neighbour belongs to another token: a merged token gets one
        # outline around its region, a single kept token a full box.
        if r == 0 or grid[r - 1, c] != s:
            draw.line([(x0, y0), (x1 - 1, y0)], fill=colour, width=width)
        if r == h - 1 or grid[r + 1, c] != s:
            draw.line([(x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour, width=width)
        if c == 0 or grid[r, c - 1] != s:
            draw.line([(x0, y0), (x0, y1 - 1)], fill=colour, width=width)
        if c == w - 1 or grid[r, c + 1] != s:
            draw.line([(x1 - 1, y0), (x1 - 1, y1 - 1)], fill=colour, width=width)
    return out


def strip(panels: Sequence[Image.Image], captions: Sequence[str], *, per_row: int = 6, pad: int = 6) -> Image.Image:
    """Lay ``panels`` out in rows of ``per_row``, each with its caption underneath (white background)."""
    if not panels:
        raise ValueError("strip needs at least one panel")
    if len(captions) != len(panels):
        raise ValueError(f"strip needs one caption per panel, got {len(captions)} for {len(panels)}")
    font = ImageFont.load_default(size=13)
    text_h = 18
    cw = max(p.size[0] for p in panels)
    ch = max(p.size[1] for p in panels)
    cols = min(per_row, len(panels))
    rows = -(-len(panels) // cols)
    out = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + 2 * pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for i, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = pad + r * (ch + text_h + 2 * pad)
        out.paste(panel, (x, y))
        draw.text((x, y + panel.size[1] + 2), caption, fill=(0, 0, 0), font=font)
    return out
