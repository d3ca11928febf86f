"""Family-specific adapter behaviour: vision-encoder descriptions, InternVL thumbnail-last tiles,
Qwen2.5-VL window attention left untouched, and save/load of tiny models through ``load_model``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import vtr
from vtr import testing as vt
from vtr.adapters import InternVLAdapter, Qwen2VLAdapter, adapter_for
from vtr.ops import Random


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


@pytest.mark.parametrize(
    ("factory", "unit", "has_cls", "attention"),
    [
        (vt.tiny_llava, "patch", True, "full"),
        (vt.tiny_qwen2_vl, "merge2x2", False, "varlen"),
        (vt.tiny_qwen2_5_vl, "merge2x2", False, "window+full"),
        (vt.tiny_internvl, "pixel_shuffle2x2", True, "full"),
        (vt.tiny_llava_next, "patch", True, "full"),
    ],
)
def test_vision_info(factory, unit: str, has_cls: bool, attention: str) -> None:
    model, _ = factory()
    info = adapter_for(model).vision_info
    blocks = adapter_for(model).vision_blocks()
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == info.num_blocks == 2
    assert (info.unit, info.has_cls, info.attention) == (unit, has_cls, attention)
    assert info.unit_patches == (1 if unit == "patch" else 4)
    enc = model
    for part in info.encoder.split("."):
        enc = getattr(enc, part)
    assert any(m is blocks for m in enc.modules())


def test_internvl_thumbnail_last() -> None:
    """The last tile group of a tiled image holds the global thumbnail (the whole image resized)."""
    model, processor = vt.tiny_internvl()
    img = _image(32, 80)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[img], return_tensors="pt")
    pv = inputs["pixel_values"]
    assert pv.shape[0] == 4  # 3 crops of a 32x80 image + thumbnail
    # The thumbnail is the whole image resized to one tile: recompute it and compare with the last tile.
    thumb = processor.image_processor(images=[img], crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pv[-1:], thumb, atol=1e-5, rtol=0)

    rows: dict[str, torch.Tensor] = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, k: rows.__setitem__("e", k["inputs_embeds"]), with_kwargs=True)
    vtr.wrap(model, Random(keep=1.0))
    try:
        with torch.no_grad():
            model(**inputs)
            thumb_feats = model.model.get_image_features(
                pixel_values=thumb, vision_feature_layer=-1, vision_feature_select_strategy="default"
            ).pooler_output[0]
        adapter = model.vtr.adapter
        (span,) = adapter.last.spans
    finally:
        vtr.unwrap(model)
        h.remove()
    (im,) = span.layout
    assert len(im.grids) == 4 and InternVLAdapter.thumbnail_group(im) == 3
    per_tile = adapter.tokens_per_tile
    last_rows = span.seq_pos[3 * per_tile : 4 * per_tile]
    torch.testing.assert_close(rows["e"][0, last_rows], thumb_feats, atol=1e-5, rtol=0)


def test_internvl_single_tile_has_no_thumbnail() -> None:
    model, processor = vt.tiny_internvl()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[_image(32, 32)], return_tensors="pt")
    (span,) = adapter_for(model).batch_spans(inputs["input_ids"])
    (im,) = span.layout
    assert len(im.grids) == 1 and InternVLAdapter.thumbnail_group(im) is None


def test_qwen2_5_window_attention_untouched() -> None:
    """Wrapping adds no hook to the vision tower: window/full attention blocks and features are unchanged."""
    model, processor = vt.tiny_qwen2_5_vl()
    vc = model.config.vision_config
    assert list(vc.fullatt_block_indexes) == [1] and vc.window_size < 32  # windows are really used
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[_image(48, 48)], return_tensors="pt")
    visual = model.model.visual
    with torch.no_grad():
        ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    vtr.wrap(model, Random(keep=0.5))
    try:
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in visual.modules())
        with torch.no_grad():
            got = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            model(**inputs)
        assert model.vtr.report.tokens_out(0) < model.vtr.report.original_tokens[0]
        assert list(model.config.vision_config.fullatt_block_indexes) == [1]
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(torch.cat(got), torch.cat(ref), atol=0, rtol=0)


def test_qwen_missing_grid_raises() -> None:
    model, processor = vt.tiny_qwen2_vl()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[_image(32, 32)], return_tensors="pt")
    adapter = Qwen2VLAdapter(model)
    adapter._metadata = {}
    with pytest.raises(ValueError, match="image_grid_thw"):
        adapter.batch_spans(inputs["input_ids"])


@pytest.mark.parametrize("factory", [vt.tiny_qwen2_vl, vt.tiny_internvl])
def test_save_and_load_tiny_model(tmp_path, factory) -> None:
    """``save_pretrained`` of a tiny model + processor loads back through ``vtr.models.load_model``."""
    from vtr.models import load_model

    model, processor = factory()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = load_model(str(tmp_path))
    assert type(loaded) is type(model) and type(proc) is type(processor)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}],
        add_generation_prompt=True,
    )
    inputs = proc(text=[text], images=[_image(32, 48)], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, ref, atol=1e-5, rtol=0)
        vtr.wrap(loaded, Random(keep=0.5))
        loaded(**inputs)
        assert loaded.vtr.report.tokens_out(0) < loaded.vtr.report.original_tokens[0]
        vtr.unwrap(loaded)


@pytest.mark.parametrize("drop", [False, True])
def test_llava_next_drop_newlines(drop: bool) -> None:
    """Newline rows: ordinary candidates by default; removed before any operator with ``drop_newlines``."""
    from vtr.adapters import LlavaNextAdapter

    model, processor = vt.tiny_llava_next()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[_image(50, 50)], return_tensors="pt")
    base, h, w = LlavaNextAdapter(model).image_rows((50, 50))
    assert h > 1 and w > 1
    n_rows = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_rows == base + h * (w + 1)
    newline = model.model.image_newline
    seen: dict[str, torch.Tensor] = {}
    lm = model.model.language_model
    with torch.no_grad():
        ref = model.model.get_input_embeddings()(inputs["input_ids"])  # shape reference only
    vtr.wrap(model, Random(keep=1.0), drop_newlines=drop)  # the public wrap-level option
    assert model.vtr.adapter.drop_newlines is drop
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("e", k["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
        (span,) = model.vtr.adapter.last.spans
    finally:
        hook.remove()
        vtr.unwrap(model)
    e = seen["e"][0]
    is_newline = torch.isclose(e, newline.to(e), atol=1e-6).all(dim=-1)
    if drop:
        assert report.original_tokens == [base + h * w]
        assert e.shape[0] == ref.shape[1] - h
        assert not bool(is_newline.any())
        assert span.drop is not None and len(span.drop) == h
    else:
        assert report.original_tokens == [n_rows]
        assert e.shape[0] == ref.shape[1]
        assert int(is_newline.sum()) == h
        # Newline rows are candidates: a small budget can drop them like any other row.
        vtr.wrap(model, Random(keep=0.2, seed=3))
        try:
            with torch.no_grad():
                model(**inputs)
            kept = set(model.vtr.report.kept(0, 0))
        finally:
            vtr.unwrap(model)
        # Random samples over all n_rows candidates (newlines are the last h rows of the layout).
        from vtr.ops.baselines import random_select

        assert kept == set(random_select(n_rows, round(0.2 * n_rows), 3).tolist())
        assert kept & set(range(base + h * w, n_rows)), "this seed keeps a newline row"
