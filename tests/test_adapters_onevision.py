"""LLaVA-OneVision specifics: the layout matches the model's own packing (tiled, ``anyres_max`` resized,
untiled multi-image, pooled video frames + one trailing newline), the video newline stays outside every
budget, ``drop_newlines`` removes it, and the encoder description (SigLIP, no CLS)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import vtr
from vtr import testing as vt
from vtr.adapters import LlavaOnevisionAdapter, adapter_for
from vtr.adapters.llava_onevision import onevision_canvas
from vtr.ops import DivPrune, Random
from vtr.ops.base import resolve_keep


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def _video(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((frames, h, w, 3)) * 255).astype("uint8")


@functools.cache
def _tiny(aspect: str):
    return vt.tiny_llava_onevision(vision_aspect_ratio=aspect)


def _inputs(processor, n_images: int, n_videos: int, images, videos=None) -> dict:
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": "what ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs: dict = {"text": [text], "return_tensors": "pt"}
    if images is not None:
        kwargs["images"] = images
    if videos is not None:
        kwargs["videos"] = videos
    return dict(processor(**kwargs))


class _LMInput:
    """Captures the ``inputs_embeds`` reaching the language model (registered after vtr's hook)."""

    def __init__(self, model):
        self.embeds: list[torch.Tensor] = []
        self.h = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: self.embeds.append(k["inputs_embeds"]), with_kwargs=True
        )

    def remove(self):
        self.h.remove()


CASES = {
    # (aspect ratio, image sizes, nested, videos)
    "tiled": ("anyres_max_9", [(32, 80), (64, 40)], False, None),
    "resized": ("anyres_max_1", [(32, 80), (50, 50)], False, None),  # canvases above 1 tile shrink
    "untiled": ("anyres_max_9", [(32, 80), (64, 40)], True, None),  # nested: base view + 1 newline each
    "video": ("anyres_max_9", [(50, 50)], False, [(3, 32, 48)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_model_packing(case: str) -> None:
    """Grid rows and newline rows sit where the model put grid features and ``image_newline``."""
    aspect, sizes, nested, vids = CASES[case]
    model, processor = _tiny(aspect)
    imgs = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    videos = [_video(f, h, w, 7) for f, h, w in vids] if vids else None
    inputs = _inputs(processor, len(imgs), len(vids or []), [imgs] if nested else imgs, videos)
    vtr.wrap(model, Random(keep=1.0))
    rec = _LMInput(model)
    try:
        with torch.no_grad():
            model(**inputs)
        adapter = model.vtr.adapter
        (spans,) = adapter.last.spans
    finally:
        vtr.unwrap(model)
        rec.remove()
    embeds = rec.embeds[0][0]
    newline = model.model.image_newline.detach()
    is_newline = (embeds == newline).all(-1)
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    g, q = adapter.grid, adapter.video_grid
    layout = spans.layout
    assert [im.kind for im in layout] == ["image"] * len(imgs) + ["video"] * len(vids or [])
    for i, (im, size) in enumerate(zip(layout, sizes, strict=False)):
        if nested:
            assert im.grids == ((1, g, g),) and im.n_tokens == g * g + 1
        else:
            h, w = onevision_canvas(size, adapter.pinpoints, adapter.tile, g, aspect)
            assert im.grids == ((1, g, g), (1, h, w)) and im.n_tokens == g * g + h * (w + 1)
            if case == "resized":
                assert h * w < 2 * g * g, f"image {i}: the canvas should have been resized"
        rows = spans.seq_pos[im.offset : im.offset + im.n_tokens]
        n_grid = sum(t * hh * ww for t, hh, ww in im.grids)
        assert not bool(is_newline[rows[:n_grid]].any())  # grid rows hold features
        assert bool(is_newline[rows[n_grid:]].all())  # extra rows are the newlines
    if vids:
        (video,) = layout[len(imgs) :]
        frames = vids[0][0]
        assert video.grids == ((1, q, q),) * frames and video.n_tokens == frames * q * q
        rows = spans.seq_pos[video.offset : video.offset + video.n_tokens]
        assert not bool(is_newline[rows].any())
        # The trailing video newline is a visual row of the prompt but not a candidate.
        last = int(visual.nonzero().flatten()[-1])
        assert bool(is_newline[last]) and last not in spans.seq_pos.tolist()
    assert len(spans.seq_pos) + (1 if vids else 0) == int(visual.sum())


def test_video_newline_outside_budget_and_drop_newlines() -> None:
    model, processor = _tiny("anyres_max_9")
    frames = 4
    inputs = _inputs(processor, 0, 1, None, [_video(frames, 32, 32, 3)])
    n_frame = LlavaOnevisionAdapter(model).video_grid ** 2
    length = inputs["input_ids"].shape[1]
    newline = model.model.image_newline.detach()
    for drop in (False, True):
        vtr.wrap(model, DivPrune(keep=0.25, scope="image"), drop_newlines=drop)
        rec = _LMInput(model)  # after vtr's hook: sees the reduced input
        try:
            with torch.no_grad():
                model(**inputs)
            report = model.vtr.report
        finally:
            vtr.unwrap(model)
            rec.remove()
        k = resolve_keep(0.25, frames * n_frame)  # all frames pruned jointly: one budget for the video
        assert report.original_tokens == [frames * n_frame]
        assert len(report.kept(0, 0)) == k
        embeds = rec.embeds[0][0]
        assert embeds.shape[0] == length - frames * n_frame + k - int(drop)
        assert int((embeds == newline).all(-1).sum()) == (0 if drop else 1)


def test_vision_info_siglip_without_cls() -> None:
    model, _ = _tiny("anyres_max_9")
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaOnevisionAdapter) and adapter.supports_video
    info = adapter.vision_info
    blocks = adapter.vision_blocks()
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == info.num_blocks == 2
    assert (info.unit, info.unit_patches, info.has_cls, info.attention) == ("patch", 1, False, "full")
    assert info.feature_layer == -1 and info.patch_size == 4
    assert any(m is blocks for m in model.model.vision_tower.modules())


def test_wrong_feature_strategy_raises() -> None:
    model, _ = _tiny("anyres_max_9")
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(NotImplementedError, match="'full'"):
            LlavaOnevisionAdapter(model)
    finally:
        model.config.vision_feature_select_strategy = "full"
