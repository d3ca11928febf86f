"""Frame grids of the videos of one sample, recovered from the current :class:`~vtr.tokens.VisualTokens`.

Frame-aware operators (STORM-style pooling, QuoTA) see a video as ``T`` frames of an ``h x w`` token grid. The
adapter describes each frame as one group of the layout (``kind == "video"``; Qwen: one temporal step of 2 input
frames; LLaVA-OneVision: one pooled frame). After an earlier frame-aware operator the grid may be coarser (a
pooled frame keeps its first frame's id, a pooled cell its top-left cell's coordinates), so the grid is read from
the tokens themselves: each remaining frame must hold the same complete ``rows x cols`` set of cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtr.tokens import VisualTokens

__all__ = ["VideoGrid", "require_video", "video_grids"]


@dataclass
class VideoGrid:
    """One video of a sample as a frame grid.

    Attributes:
        image: index of the video in the sample's layout.
        pos: ``[T, h*w]`` long, positions into the current tokens, frames in temporal order, cells raster.
        frames: ``[T]`` long, frame (group) id of each frame.
        grid: ``(h, w)`` cells per frame.
        native: ``(H, W)`` the layout's grid of the video's frames (before any reduction).
    """

    image: int
    pos: Tensor
    frames: Tensor
    grid: tuple[int, int]
    native: tuple[int, int]

    @property
    def t(self) -> int:
        return int(self.pos.shape[0])


def video_grids(tokens: VisualTokens, op: str) -> list[VideoGrid]:
    """The frame grids of every video of ``tokens`` that still has tokens, in layout order.

    ``op`` names the calling operator in error messages. Raises ``ValueError`` when a video's tokens do not form
    complete frames of one common grid (e.g. after a pruning operator).
    """
    out = []
    for i, im in enumerate(tokens.layout):
        if im.kind != "video":
            continue
        pos = (tokens.image == i).nonzero().flatten()
        if len(pos) == 0:
            continue
        shapes = {(h, w) for _t, h, w in im.grids}
        if len(shapes) != 1 or any(t != 1 for t, _h, _w in im.grids):
            raise ValueError(f"{op}: video {i} has frame groups {sorted(set(im.grids))}; expected one (1, h, w) grid")
        native = next(iter(shapes))
        fr, co = tokens.frame[pos], tokens.coords[pos]
        span = native[0] * native[1]
        order = torch.argsort(fr * span + co[:, 1] * native[1] + co[:, 2])
        pos, fr, co = pos[order], fr[order], co[order]
        frames, counts = torch.unique_consecutive(fr, return_counts=True)
        n = int(counts[0])
        rows = torch.unique(co[:n, 1])
        cols = torch.unique(co[:n, 2])
        complete = bool((counts == n).all()) and n == len(rows) * len(cols)
        if complete:
            first = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(n, 2)
            complete = bool((co[:, 1:].view(len(frames), n, 2) == first).all())
        if not complete:
            raise ValueError(
                f"{op} needs every frame of a video as a complete token grid, but video {i} of this sample has "
                f"{counts.tolist()} tokens in its frames: place {op} before operators that prune tokens"
            )
        out.append(VideoGrid(i, pos.view(len(frames), n), frames, (len(rows), len(cols)), native))
    return out


def require_video(tokens: VisualTokens, op: str) -> None:
    """Raise when ``tokens`` holds visual tokens but no video (frame-aware operators act on videos only)."""
    if len(tokens) and not any(im.kind == "video" for im in tokens.layout):
        raise ValueError(
            f"{op} acts on videos (frame groups), but this sample has only images: use an image recipe "
            "(e.g. pool, divprune) or unwrap the model for image prompts"
        )
