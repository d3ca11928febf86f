"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP without CLS, AnyRes images, video.

Images are packed as in LLaVA-NeXT (this adapter subclasses :class:`LlavaNextAdapter`): a base view of
``g*g`` rows (``g = image_size / patch_size``; SigLIP has no CLS, the ``full`` feature strategy keeps
every patch), then the unpadded AnyRes canvas ``(H', W')``, each canvas row closed by ``image_newline``.
Two OneVision differences:

* ``anyres_max_N`` (``config.vision_aspect_ratio``): when the unpadded canvas holds more than about
  ``N`` tiles (``ratio = sqrt(H'*W' / (N*g*g)) > 1.1``), the model bilinearly resizes it to
  ``(int(H' // ratio), int(W' // ratio))`` before adding the newlines; the layout uses that size.
* Multi-image prompts: when the processor is given nested images (``batch_num_images[b] > 1``), the
  images of that sample are not tiled: each is its base view ``(g, g)`` plus ONE trailing newline row.

Videos (``get_video_features``): every frame goes through the tower, the projector and the model's own
2x2 bilinear pooling to a ``(q, q)`` grid, ``q = ceil(g / 2)``; the frames of a video are concatenated
and ONE newline row closes the whole video: ``F*q*q + 1`` ``<video>`` rows. Layout per video: ``F``
groups ``(1, q, q)`` (``kind="video"``), so ``scope="frame"`` budgets each frame and ``scope="image"``
prunes all frames of the video jointly. The trailing video newline belongs to no frame: it stays in
the LLM input outside every budget (not a candidate, not counted in ``report.original_tokens``), or is
removed with ``drop_newlines=True``. All videos of one call have the same frame count (the model
reshapes ``pixel_values_videos`` ``[n_videos, F, C, H, W]``); ``F`` is read from that tensor.

Image newline rows follow the NeXT adapter: ordinary candidates of their image's budget by default
(the official DivPrune behaviour), removed before any operator with ``drop_newlines=True``.

Metadata (``image_sizes``, ``batch_num_images``, ``pixel_values_videos``, ``vision_aspect_ratio``) is
captured from ``get_image_features`` / ``get_video_features`` (instance wrappers; ``generate`` calls them
before the first forward) and from the base model's forward kwargs. The LLM (Qwen2) uses 1-D RoPE:
kept rows keep their original ids and decoding continues from the unreduced length.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from vtr.adapters.base import MetadataMismatch, VisionInfo, VisualSpans, tower_vision_info
from vtr.adapters.llava_next import LlavaNextAdapter, SpanPart, pack_parts

__all__ = ["LlavaOnevisionAdapter", "onevision_canvas"]


def onevision_canvas(
    image_size: tuple[int, int], pinpoints: list, tile: int, grid: int, aspect_ratio: str
) -> tuple[int, int]:
    """``(H', W')``: the canvas size in tokens of one tiled image, as ``pack_image_features`` builds it.

    Args:
        image_size: ``(height, width)`` of the original image in pixels.
        pinpoints: ``config.image_grid_pinpoints``.
        tile: tile side in pixels (``vision_config.image_size``).
        grid: tokens per tile side (``image_size // patch_size``).
        aspect_ratio: ``"anyres_max_N"``; a canvas above ``1.1**2 * N`` tiles is resized down.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    nph, npw = get_anyres_image_grid_shape(list(image_size), pinpoints, tile)
    h, w = unpad_image(torch.empty(1, nph * grid, npw * grid), torch.as_tensor(image_size)).shape[1:]
    max_tiles = int(aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(h * w / (max_tiles * grid**2))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return int(h), int(w)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """AnyRes images (NeXT packing, ``anyres_max`` resize, untiled multi-image) and pooled video frames."""

    name: ClassVar[str] = "LLaVA-OneVision"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    supports_video: ClassVar[bool] = True
    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features", "get_video_features")
    metadata_kwargs: ClassVar[tuple[str, ...]] = (
        "image_sizes",
        "batch_num_images",
        "pixel_values_videos",
        "vision_aspect_ratio",
    )
    #: SigLIP has no CLS: every patch row reaches the projector.
    feature_select_strategy: ClassVar[str] = "full"

    def __init__(self, model: nn.Module, *, drop_newlines: bool = False):
        super().__init__(model, drop_newlines=drop_newlines)
        cfg = model.config
        self.video_token_id = int(cfg.video_token_id)
        self.video_grid = math.ceil(self.grid / 2)  # side of a frame after the model's 2x2 pooling

    @property
    def vision_info(self) -> VisionInfo:
        # SigLIP has no CLS: CLS-attention signals will use the mean attention each token receives.
        return tower_vision_info(self.model, has_cls=False)

    # ------------------------------------------------------------------ layout
    def onevision_rows(self, image_size: tuple[int, int], tiled: bool) -> tuple[int, int, int, int]:
        """``(base, H', W', tail)`` of one image: ``base + H' * (W' + 1) + tail`` rows at the LLM input.

        A tiled image has the canvas ``(H', W')`` and no tail; an untiled one (multi-image sample)
        has ``H' = W' = 0`` and one trailing newline.
        """
        base = self.grid * self.grid
        if not tiled:
            return base, 0, 0, 1
        ratio = self.metadata.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        h, w = onevision_canvas(image_size, self.pinpoints, self.tile, self.grid, str(ratio))
        return base, h, w, 0

    def image_plan(self) -> list[tuple[tuple[int, int], bool]]:
        """``(size, tiled)`` of every image of the call, in batch order (from the captured metadata)."""
        sizes = self.metadata.get("image_sizes")
        if sizes is None:
            return []
        rows = [(int(r[0]), int(r[1])) for r in torch.as_tensor(sizes).tolist()]
        per_sample = self.metadata.get("batch_num_images")
        if per_sample is None:
            return [(s, True) for s in rows]  # the model tiles every image when it is not told otherwise
        tiled = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
        if len(tiled) != len(rows):
            raise ValueError(f"`batch_num_images` counts {len(tiled)} images but `image_sizes` lists {len(rows)}")
        return list(zip(rows, tiled, strict=True))

    def video_frames(self, processor) -> list[Tensor]:
        """Frames of every video of the call, un-normalised from ``pixel_values_videos`` ``[n, F, C, H, W]``."""
        pv = self.metadata.get("pixel_values_videos")
        if pv is None:
            raise ValueError(f"the {self.name} adapter saw no `pixel_values_videos` in this call")
        vp = getattr(processor, "video_processor", None) or processor.image_processor
        mean = torch.tensor(vp.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(vp.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return [(v.float() * std + mean).clamp(0, 1) for v in pv]

    def _video_frames(self) -> int | None:
        """Frames per video of the call (``pixel_values_videos`` is ``[n_videos, F, C, H, W]``)."""
        pv = self.metadata.get("pixel_values_videos")
        return None if pv is None else int(pv.shape[1])

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        """Spans of every sample: runs of ``<image>``/``<video>`` rows matched in order to the captured
        image sizes (images of the whole batch, sample after sample) and the video frame count."""
        images = iter(self.image_plan())
        frames = self._video_frames()
        q2 = self.video_grid * self.video_grid
        out = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            pos = ((ids == self.image_token_id) | (ids == self.video_token_id)).nonzero().flatten()
            parts: list[SpanPart] = []
            start = 0
            while start < len(pos):
                is_video = int(ids[pos[start]]) == self.video_token_id
                if is_video:
                    if frames is None:
                        raise ValueError(
                            f"the {self.name} adapter found <video> rows but no `pixel_values_videos`: pass the "
                            "processor outputs to forward/generate"
                        )
                    n = frames * q2 + 1
                else:
                    try:
                        size, tiled = next(images)
                    except StopIteration:
                        raise MetadataMismatch(
                            "input_ids hold more images than `image_sizes` describes (pass the processor outputs, "
                            "including `image_sizes` and `batch_num_images`)"
                        ) from None
                    base, h, w, tail = self.onevision_rows(size, tiled)
                    n = base + h * (w + 1) + tail
                rows = pos[start : start + n]
                token = self.video_token_id if is_video else self.image_token_id
                if len(rows) != n or not bool((ids[rows] == token).all()):
                    what = f"a video of {frames} frames" if is_video else f"an image of size {size}"
                    raise MetadataMismatch(
                        f"{what} needs {n} rows but input_ids hold a different run: the prompt was not expanded by "
                        "this model's LlavaOnevisionProcessor (or the processor and model configs differ)"
                    )
                if is_video:
                    part = SpanPart(
                        grid_rows=rows[:-1],
                        newline_rows=rows[-1:],
                        grids=((1, self.video_grid, self.video_grid),) * frames,  # type: ignore[operator]
                        kind="video",
                        newlines="keep",
                    )
                else:
                    part = self.image_part(rows, base, h, w, tail)
                parts.append(part)
                start += n
            out.append(pack_parts(parts, self.drop_newlines, empty=pos))
        if next(images, None) is not None:
            raise MetadataMismatch("`image_sizes` describes more images than input_ids hold")
        return out
