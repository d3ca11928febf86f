"""The demo without a browser: token-to-pixel geometry, overlays, figures, request checks, the engine.

Pure functions are tested on hand cases and hypothesis properties; the engine runs the bundled model and
tiny random models of every family (one model instance for both sides, unwrapped after every request).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vtr
from vtr.demos.engine import DemoEngine, PeakMemory
from vtr.demos.figures import (
    FigureRow,
    SideResult,
    comparison_rows,
    compose,
    figures_html,
    kv_cache_bytes,
    layer_tokens,
    stage_tokens,
    token_panels,
    tokens_plot,
)
from vtr.demos.geometry import ViewInputs, cell_boxes, denormalize, grid_slices, grid_views, unit_slots
from vtr.demos.inputs import DemoError, UploadLimits, check_media, check_upload, make_request, parse_budget
from vtr.demos.overlay import DIM, KEPT_OUTLINE, MERGED_OUTLINE, PALETTE, TINT, draw_tokens, strip
from vtr.models import assets_dir
from vtr.report import ImageRecord, Report, StageRecord
from vtr.tokens import ImageLayout

SAMPLE = assets_dir() / "sample.png"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ----------------------------------------------------------------------------------------------- geometry
def test_cell_boxes_golden():
    # 2x3 grid over a 7x5 picture: x edges floor(i*7/3) = 0, 2, 4, 7; y edges floor(i*5/2) = 0, 2, 5.
    assert cell_boxes(2, 3, 7, 5).tolist() == [
        [0, 0, 2, 2], [2, 0, 4, 2], [4, 0, 7, 2],
        [0, 2, 2, 5], [2, 2, 4, 5], [4, 2, 7, 5],
    ]  # fmt: skip


def test_cell_boxes_are_the_patches_the_encoder_sees():
    # A ViT of patch p on an S x S input (S = g*p): unit (r, c) is pixels [r*p, (r+1)*p) x [c*p, (c+1)*p).
    g, p = 14, 16
    boxes = cell_boxes(g, g, g * p, g * p)
    r, c = 5, 9
    assert boxes[r * g + c].tolist() == [c * p, r * p, (c + 1) * p, (r + 1) * p]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 90), st.integers(1, 90))
def test_cell_boxes_tile_the_picture(h, w, width, height):
    boxes = cell_boxes(h, w, width, height)
    assert boxes.shape == (h * w, 4)
    cover = np.zeros((height, width), dtype=np.int64)
    for x0, y0, x1, y1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()  # no gap, no overlap
    if width >= w and height >= h:
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_cell_boxes_reject_empty_grids():
    with pytest.raises(ValueError, match="h, w >= 1"):
        cell_boxes(0, 3, 10, 10)
    with pytest.raises(ValueError, match="width, height >= 1"):
        cell_boxes(2, 3, 0, 10)


def test_grid_slices_tiles_frames_and_newlines():
    # Base view 2x2, canvas 3x4, then 3 newline rows (LLaVA-NeXT-like).
    slices, extra = grid_slices(ImageLayout(offset=0, n_tokens=4 + 12 + 3, grids=((1, 2, 2), (1, 3, 4))))
    assert [(s.group, s.step, s.start, s.stop, s.h, s.w) for s in slices] == [(0, 0, 0, 4, 2, 2), (1, 0, 4, 16, 3, 4)]
    assert extra == 3
    # A grid with t = 2 gives one slice per temporal step.
    slices, extra = grid_slices(ImageLayout(offset=7, n_tokens=12, grids=((2, 2, 3),), kind="video"))
    assert [(s.group, s.step, s.start) for s in slices] == [(0, 0, 0), (0, 1, 6)] and extra == 0
    with pytest.raises(ValueError, match="cover 16 units but the image has 10"):
        grid_slices(ImageLayout(offset=0, n_tokens=10, grids=((1, 4, 4),)))


def test_unit_slots():
    assert unit_slots(6, [1, 4], None).tolist() == [-1, 0, -1, -1, 1, -1]
    assert unit_slots(4, [0, 2], [0, 0, 1, -1]).tolist() == [0, 0, 1, -1]
    with pytest.raises(ValueError, match="groups has 3 entries for an image of 4 units"):
        unit_slots(4, [0], [0, 0, 0])
    with pytest.raises(ValueError, match=r"groups values must lie in \[-1, 1\)"):
        unit_slots(2, [0], [0, 1])
    with pytest.raises(ValueError, match=r"kept indices must lie in \[0, 4\)"):
        unit_slots(4, [0, 4], None)


def _normalise(image: Image.Image) -> torch.Tensor:
    arr = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    return (arr - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_denormalize_round_trip():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    back = np.asarray(denormalize(_normalise(image), MEAN, STD), dtype=np.int64)
    assert np.abs(back - np.asarray(image, dtype=np.int64)).max() <= 1
    with pytest.raises(ValueError, match=r"expected \[3, H, W\]"):
        denormalize(torch.zeros(4, 2, 2), MEAN, STD)


def test_qwen_token_units_map_to_the_cells_drawn_on_the_upload():
    """Qwen2-VL: paint one 2x2 merge unit of the image; the token whose patches carry it is the cell drawn there."""
    from vtr.testing import tiny_qwen2_vl

    _, processor = tiny_qwen2_vl()  # patch 4, 2x2 merge: a token unit is 8x8 pixels
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 40, (24, 40, 3), dtype=np.uint8)  # 3 x 5 units, no resize needed
    r0, c0 = 1, 3
    arr[r0 * 8 : (r0 + 1) * 8, c0 * 8 : (c0 + 1) * 8] = 255
    out = processor(
        images=[Image.fromarray(arr)], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt"
    )
    t, gh, gw = out["image_grid_thw"][0].tolist()
    h, w = gh // 2, gw // 2
    assert (t, h, w) == (1, 3, 5)
    rows = out["pixel_values"]  # patches grouped per merge unit: 4 consecutive rows per token
    bright = (rows.mean(dim=1) > 1.0).nonzero().flatten()
    assert sorted({int(i) // 4 for i in bright}) == [r0 * w + c0]
    layout = ImageLayout(offset=0, n_tokens=h * w, grids=((1, h, w),))
    slices, _ = grid_slices(layout)
    (view,) = grid_views("whole", layout, slices, ViewInputs(Image.fromarray(arr), out, processor))
    x0, y0, x1, y1 = cell_boxes(h, w, *view.picture.size)[r0 * w + c0]
    assert np.asarray(view.picture)[y0:y1, x0:x1].min() == 255  # the cell drawn for that token is the painted unit


def test_views_per_family_and_unknown_family():
    pix = _normalise(Image.new("RGB", (8, 8), (200, 100, 50))).unsqueeze(0)
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_mean=MEAN, image_std=STD))
    layout = ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),))
    slices, _ = grid_slices(layout)
    (view,) = grid_views("crop", layout, slices, ViewInputs(None, {"pixel_values": pix}, proc))
    assert view.picture.size == (8, 8) and np.abs(np.asarray(view.picture)[0, 0] - [200, 100, 50]).max() <= 1
    # LLaVA-NeXT: the base view is drawn, the unpadded canvas is only counted (and the UI says so).
    nxt = ImageLayout(offset=0, n_tokens=4 + 6 + 2, grids=((1, 2, 2), (1, 2, 3)))
    slices, _ = grid_slices(nxt)
    views = grid_views("anyres", nxt, slices, ViewInputs(None, {"pixel_values": pix.unsqueeze(0)}, proc))
    assert views[0].picture is not None and views[1].picture is None and "not drawn" in views[1].note
    (view,) = grid_views(None, layout, grid_slices(layout)[0], ViewInputs(None, {}, proc))
    assert view.picture is None and "no token-to-pixel mapping for picture kind None" in view.note


# ----------------------------------------------------------------------------------------------- overlay
def test_draw_tokens_dims_dropped_outlines_kept():
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    out = np.asarray(draw_tokens(white, 2, 2, np.array([0, -1, -1, 1]), min_side=320))
    assert out.shape == (320, 320, 3)
    assert out[80, 240].tolist() == [int(255 * DIM)] * 3  # dropped: dimmed
    assert out[80, 80].tolist() == [255, 255, 255]  # kept, inside: untouched
    assert tuple(out[0, 0]) == KEPT_OUTLINE and tuple(out[319, 319]) == KEPT_OUTLINE  # kept cells outlined


def test_draw_tokens_tints_merged_groups_and_outlines_their_region():
    grey = Image.new("RGB", (20, 20), (100, 100, 100))
    # Cells 0 and 1 form one merged token (slot 0), cell 3 is a single kept token, cell 2 is dropped.
    out = np.asarray(
        draw_tokens(grey, 2, 2, np.array([0, 0, -1, 1]), np.array([True, True, False, False]), min_side=320)
    )
    tint = (1 - TINT) * 100 + TINT * np.asarray(PALETTE[0], np.float64)
    assert np.abs(out[80, 80] - tint).max() <= 1 and np.abs(out[80, 240] - tint).max() <= 1
    assert np.abs(out[80, 159] - tint).max() <= 1  # no outline between the two cells of one token
    assert tuple(out[0, 100]) == MERGED_OUTLINE and tuple(out[0, 300]) == MERGED_OUTLINE
    assert tuple(out[319, 300]) == KEPT_OUTLINE  # the single token's own box


def test_draw_tokens_and_strip_reject_bad_shapes():
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="slots must have 4 entries for a 2x2 grid"):
        draw_tokens(im, 2, 2, np.zeros(3))
    with pytest.raises(ValueError, match="merged must have 4 entries"):
        draw_tokens(im, 2, 2, np.zeros(4), np.zeros(2, bool))
    with pytest.raises(ValueError, match="one caption per panel"):
        strip([im, im], ["a"])
    with pytest.raises(ValueError, match="at least one panel"):
        strip([], [])


def test_strip_lays_out_rows():
    im = Image.new("RGB", (30, 20))
    out = strip([im] * 5, list("abcde"), per_row=2, pad=5)
    assert out.size == (2 * 35 + 5, 3 * (20 + 18 + 10) + 5)


# ----------------------------------------------------------------------------------------------- figures
def _report(kept=(0, 3), groups=None, n=4, operator="DivPrune", layers=None) -> Report:
    rep = Report(original_tokens=[n], prompt_tokens=[(n + 10, len(kept) + 10)], llm_prefill_flops=[(8e8, 2e8)])
    image = ImageRecord(0, n, len(kept), list(kept), groups)
    rep.records.append(StageRecord(0, "pre_llm", operator, n, len(kept), 0.001, [image]))
    if layers is not None:
        rep.layer_tokens = layers  # what the stage machinery will add; read with getattr
    return rep


def test_comparison_rows_and_ratios():
    base = SideResult("purple", 4, 0.2, 0.5, 2 * 2**20)
    red = SideResult("purple", 4, 0.1, 0.4, None)
    rows = {r.key: r for r in comparison_rows(base, red, _report(), memory_label="peak", memory_exact=True)}
    keys = ["visual_tokens", "prompt_rows", "ttft", "total", "new_tokens", "peak_memory", "prefill_gflops"]
    assert list(rows) == keys
    assert (rows["visual_tokens"].baseline, rows["visual_tokens"].reduced, rows["visual_tokens"].ratio) == (4, 2, 0.5)
    assert (rows["prompt_rows"].baseline, rows["prompt_rows"].reduced) == (14, 12)
    assert rows["ttft"].ratio == pytest.approx(0.5) and rows["prefill_gflops"].ratio == pytest.approx(0.25)
    assert rows["peak_memory"].text(rows["peak_memory"].baseline) == "2.0" and rows["peak_memory"].ratio is None
    assert rows["peak_memory"].text(None) == "n/a" and rows["peak_memory"].label == "peak (MB)"
    assert FigureRow("x", "x", 0, 3).ratio is None
    # Rough (CPU RSS) memory: values shown, no ratio.
    red = SideResult("purple", 4, 0.1, 0.4, 2**20)
    rows = {r.key: r for r in comparison_rows(base, red, _report(), memory_label="rss", memory_exact=False)}
    assert rows["peak_memory"].reduced == 1.0 and rows["peak_memory"].ratio is None
    rows = {r.key: r for r in comparison_rows(base, red, _report(), memory_label="cuda", memory_exact=True)}
    assert rows["peak_memory"].ratio == 0.5


def test_kv_cache_rows():
    # 2 layers, 4 heads of 8 (2 KV heads), fp16: 2 * 2 * 8 * 2 = 64 bytes per row and layer.
    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    assert kv_cache_bytes(cfg, [10, 5], 2) == 64 * 15
    with pytest.raises(ValueError, match="3 row counts for 2 decoder layers"):
        kv_cache_bytes(cfg, [1, 2, 3], 2)
    base = SideResult("a", 1, 0.1, 0.2, None)
    kw = dict(memory_label="m", memory_exact=False, text_config=cfg, bytes_per_value=2)
    (kv,) = [r for r in comparison_rows(base, base, _report(), **kw) if r.key == "kv_cache"]
    assert (kv.baseline, kv.reduced) == (64 * 2 * 14 / 2**20, 64 * 2 * 12 / 2**20)  # 14 -> 12 prompt rows
    # With per-layer visual tokens (pruning inside the LLM): text rows (14 - 4) + each layer's visual tokens.
    (kv,) = [r for r in comparison_rows(base, base, _report(layers=[[4, 1]]), **kw) if r.key == "kv_cache"]
    assert kv.reduced == 64 * (14 + 11) / 2**20


def test_stage_and_layer_tokens_and_plot():
    assert stage_tokens(_report()) == [("input", 4), ("pre_llm: DivPrune", 2)]
    assert layer_tokens(_report()) is None  # no per-layer figures: the plot has one panel
    rep = _report(layers=[[4, 4, 2, 1]])
    assert layer_tokens(rep) == [4, 4, 2, 1] and layer_tokens(rep, 1) is None
    one, two = tokens_plot(stage_tokens(rep)), tokens_plot(stage_tokens(rep), layer_tokens(rep))
    assert two.size[0] > 1.6 * one.size[0] and one.size[1] == two.size[1]


def test_figures_html_hooks_and_escaping():
    base, red = SideResult("a", 1, 0.1, 0.2, None), SideResult("b", 1, 0.1, 0.2, None)
    rows = comparison_rows(base, red, _report(), memory_label="m", memory_exact=False)
    page = figures_html(rows, stage_tokens(_report()), "<b>“q”</b>")
    assert '<td data-metric="visual_tokens" data-side="reduced">2</td>' in page
    assert '<td data-metric="visual_tokens" data-side="ratio">0.500</td>' in page
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "<td>pre_llm: DivPrune</td><td>2 (50.0%)</td>" in page


def _llava_views(image: Image.Image) -> ViewInputs:
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_mean=MEAN, image_std=STD))
    return ViewInputs(image, {"pixel_values": _normalise(image).unsqueeze(0)}, proc)


def test_token_panels_image():
    layout = [ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),))]
    panels, notes = token_panels(_report(), layout, "crop", _llava_views(Image.new("RGB", (16, 16), "white")))
    assert [p.caption for p in panels] == ["pre_llm · DivPrune: 2/4 tokens kept"] and notes == []
    assert compose(panels).size[0] > panels[0].image.size[0] and compose([]) is None
    # A model that does not describe its picture: counted, not drawn, and said so.
    panels, notes = token_panels(_report(), layout, None, _llava_views(Image.new("RGB", (16, 16))))
    assert panels == [] and "no token-to-pixel mapping" in notes[0]
    # Newline rows after the grid are counted in a note.
    layout = [ImageLayout(offset=0, n_tokens=6, grids=((1, 2, 2),))]
    _, notes = token_panels(_report(kept=(0, 5), n=6), layout, "crop", _llava_views(Image.new("RGB", (16, 16))))
    assert notes == ["2 newline rows (not drawn): 1 kept after DivPrune"]


def test_token_panels_video_strip_counts_per_frame():
    frames = np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(6)])  # 6 frames, 3 temporal steps
    proc = SimpleNamespace(video_processor=SimpleNamespace(temporal_patch_size=2))
    layout = [ImageLayout(offset=0, n_tokens=12, grids=((1, 2, 2),) * 3, kind="video")]
    report = _report(kept=(0, 5, 8, 9), n=12, operator="STORM")
    views = grid_views("whole", layout[0], grid_slices(layout[0])[0], ViewInputs(frames, {}, proc))
    assert [v.label for v in views] == ["frames 0-1", "frames 2-3", "frames 4-5"]
    assert [int(np.asarray(v.picture).mean()) for v in views] == [0, 80, 160]  # the first frame of each step
    panels, _ = token_panels(report, layout, "whole", ViewInputs(frames, {}, proc))
    (panel,) = panels
    assert panel.caption == "pre_llm · STORM: 4/12 tokens kept (video: kept per frame under each)"
    assert panel.image.size[0] > 3 * 320  # a strip of the three steps


# ----------------------------------------------------------------------------------------------- requests
def test_check_upload(tmp_path):
    limits = UploadLimits()
    with pytest.raises(DemoError, match="no image or video"):
        check_upload(None, limits)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DemoError, match=r"unsupported file type '.txt' \(a.txt\): upload an image \(.png"):
        check_upload(tmp_path / "a.txt", limits)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(DemoError, match="bad.png is not a valid image file"):
        check_upload(bad, limits)
    good = tmp_path / "ok.png"
    Image.new("RGB", (30, 20)).save(good)
    assert check_upload(good, limits) == "image"
    with pytest.raises(DemoError, match=r"ok.png is 0.0 MB; the limit for images is 1e-05 MB"):
        check_upload(good, UploadLimits(image_mb=1e-5))
    with pytest.raises(DemoError, match="ok.png is 30x20 pixels; the limit is 25 pixels per side"):
        check_upload(good, UploadLimits(max_side=25))
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DemoError, match="clip.mp4 is not a readable video"):
        check_upload(junk, limits)
    with pytest.raises(ValueError, match="UploadLimits.video_mb must be > 0"):
        UploadLimits(video_mb=0)


def test_check_media_refuses_videos_for_image_models(tmp_path):
    clip = _write_video(tmp_path / "clip.mp4")
    image_only = SimpleNamespace(family="LLaVA-1.5", supports_video=False)
    with pytest.raises(DemoError, match=r"this model \(LLaVA-1.5\) does not take videos: upload an image"):
        check_media(image_only, clip, UploadLimits())
    assert check_media(SimpleNamespace(family="Qwen2-VL", supports_video=True), clip, UploadLimits()) == "video"


@dataclass
class _NoBudget(vtr.ops.base.Operator):
    """An operator without a ``keep`` field (like pooling recipes with their own parameters)."""

    stride: int = 2


def test_budget_on_a_recipe_without_keep_says_what_to_do(bundled):
    from vtr import recipes

    recipes.register("zz_no_budget", lambda: [_NoBudget()], "probe")
    try:
        with pytest.raises(
            DemoError, match=r"recipe 'zz_no_budget': unknown option 'keep'.*choose the budget 'recipe d"
        ):
            _request(bundled, recipe="zz_no_budget")
        assert _request(bundled, recipe="zz_no_budget", mode="recipe default").overrides == {}
    finally:
        recipes._REGISTRY.pop("zz_no_budget")


def test_parse_budget():
    assert parse_budget("recipe default", None) is None
    assert parse_budget("ratio", 0.25) == 0.25 and parse_budget("count", 64.0) == 64
    assert isinstance(parse_budget("count", 64.0), int)
    for mode, value, match in [
        ("ratio", 1.5, r"ratio must lie in \(0, 1\], got 1.5"),
        ("ratio", 0, r"ratio must lie in \(0, 1\]"),
        ("count", 2.5, "whole number >= 1, got 2.5"),
        ("count", 0, "whole number >= 1"),
        ("ratio", None, "enter a budget ratio"),
        ("percent", 3, "budget mode must be one of"),
    ]:
        with pytest.raises(DemoError, match=match):
            parse_budget(mode, value)


# ----------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def bundled():
    engine = DemoEngine.load(None)
    engine.warmup()
    return engine


def _request(
    engine, path=SAMPLE, prompt="What colour is the circle?", recipe="divprune", mode="ratio", value=0.1, **kw
):
    args = dict(max_new_tokens=2, frames=8, limits=UploadLimits())
    args.update(kw)
    return make_request(
        engine, path, prompt, recipe, mode, value, args["max_new_tokens"], args["frames"], args["limits"]
    )


def test_make_request_errors(bundled, tmp_path):
    req = _request(bundled)
    assert (req.kind, req.recipe, req.overrides, req.max_new_tokens) == ("image", "divprune", {"keep": 0.1}, 2)
    assert _request(bundled, mode="recipe default").overrides == {}
    cases = [
        (dict(prompt="  "), "enter a prompt"),
        (dict(prompt="x" * 2001), "the prompt has 2001 characters; the limit is 2000"),
        (dict(recipe="nope"), "unknown recipe 'nope'; available: "),
        (dict(mode="count", value=0), "whole number >= 1"),
        (dict(max_new_tokens=0), r"max new tokens must be a whole number in \[1, 512\]"),
        (dict(frames=65), r"frames must be a whole number in \[1, 64\]"),
    ]
    for kw, match in cases:
        with pytest.raises(DemoError, match=match):
            _request(bundled, **kw)
    assert not bundled.supports_video  # the bundled LLaVA: a readable video is refused for the model's sake
    with pytest.raises(DemoError, match=r"this model \(LLaVA-1.5\) does not take videos"):
        make_request(bundled, _write_video(tmp_path / "ok.mp4"), "p", "divprune", "ratio", 0.5, 2, 4, UploadLimits())


def test_engine_one_model_both_sides(bundled):
    model = bundled.model
    updates = list(bundled.run(_request(bundled, max_new_tokens=3)))
    phases = [u.phase for u in updates]
    assert phases[0] == "baseline" and phases[-1] == "done" and "reduced" in phases
    assert phases.index("reduced") > max(i for i, p in enumerate(phases) if p == "baseline")
    done = updates[-1]
    assert bundled.model is model and not vtr.is_wrapped(model)  # scoped: restored after the request
    assert bundled.text_config is not None and bundled.bytes_per_value == 4
    assert done.base.answer and done.red.answer and done.base.new_tokens == done.red.new_tokens == 3
    assert done.report.original_tokens == [196] and done.report.tokens_out(0) == 20
    assert 0 < done.base.ttft_s <= done.base.total_s and 0 < done.red.ttft_s <= done.red.total_s
    assert done.layouts == [ImageLayout(offset=0, n_tokens=196, grids=((1, 14, 14),))]
    panels, notes = token_panels(done.report, done.layouts, bundled.picture, done.views)
    assert len(panels) == 1 and notes == [] and panels[0].caption == "pre_llm · DivPrune: 20/196 tokens kept"
    # Streaming: the baseline text grows token by token before the reduced side starts.
    texts = [u.base_text for u in updates if u.phase == "baseline"]
    assert texts[0] == "" and texts[-1] == done.base.answer


def test_engine_closed_mid_request_leaves_the_model_clean(bundled):
    run = bundled.run(_request(bundled, max_new_tokens=6))
    for up in run:
        if up.phase == "reduced":
            assert vtr.is_wrapped(bundled.model)
            break
    run.close()  # the page went away mid-answer
    assert not vtr.is_wrapped(bundled.model)
    assert list(bundled.run(_request(bundled)))[-1].phase == "done"  # the lock was released


def test_engine_cancel_stops_both_sides_after_one_token(bundled):
    import threading

    cancel = threading.Event()
    cancel.set()
    done = list(bundled.run(_request(bundled, max_new_tokens=6), cancel))[-1]
    assert done.base.new_tokens == done.red.new_tokens == 1 and not vtr.is_wrapped(bundled.model)


def test_engine_rejects_wrapped_and_unsupported_models(bundled, tmp_path):
    with vtr.reduced(bundled.model, "pool", keep=0.5):
        with pytest.raises(ValueError, match="needs the model unwrapped"):
            DemoEngine(bundled.model, bundled.processor)
    with pytest.raises(TypeError, match="vtr has no adapter for Linear"):
        DemoEngine(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="cannot load model '.*': .* holds no config.json"):
        DemoEngine.load(str(tmp_path))


def test_peak_memory_cpu():
    meter = PeakMemory(torch.device("cpu"))
    with meter:
        x = torch.ones(4 * 2**20)  # 16 MiB
        del x
    assert meter.label == "peak process RSS growth, rough" and not meter.exact
    assert meter.peak_bytes is None or meter.peak_bytes >= 8 * 2**20


def _write_video(path, frames: int = 6, size: int = 64):
    av = pytest.importorskip("av")
    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=4)
    stream.height = stream.width = size
    stream.pix_fmt = "yuv420p"
    for i in range(frames):
        frame = np.full((size, size, 3), 30 * i, np.uint8)
        frame[: size // 2, : size // 2] = 255 - 30 * i
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


FAMILIES = ["tiny_llava", "tiny_qwen2_vl", "tiny_internvl", "tiny_llava_next", "tiny_llava_onevision"]


@pytest.mark.parametrize("factory", FAMILIES)
def test_engine_every_family_image(factory, tmp_path):
    import vtr.testing

    model, processor = getattr(vtr.testing, factory)()
    engine = DemoEngine(model, processor, name=factory)
    image = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    done = list(engine.run(_request(engine, path=image, prompt="what ?", value=0.5)))[-1]
    assert not vtr.is_wrapped(model)
    assert done.report.tokens_out(0) < done.report.original_tokens[0]
    panels, notes = token_panels(done.report, done.layouts, engine.picture, done.views)
    assert len(panels) == 1 and panels[0].caption.startswith("pre_llm · DivPrune")
    if engine.family in ("LLaVA-NeXT", "LLaVA-OneVision"):
        assert any("AnyRes canvas" in n or "not drawn" in n for n in notes)


@pytest.mark.parametrize("factory", ["tiny_qwen2_vl", "tiny_llava_onevision"])
def test_engine_video_strip(factory, tmp_path):
    import vtr.testing

    model, processor = getattr(vtr.testing, factory)()
    engine = DemoEngine(model, processor, name=factory)
    assert engine.supports_video
    clip = _write_video(tmp_path / "clip.mp4", frames=6)
    req = _request(engine, path=clip, prompt="what happens ?", value=0.5, frames=4)
    assert req.kind == "video"
    done = list(engine.run(req))[-1]
    (layout,) = done.layouts
    assert layout.kind == "video" and done.views.media.shape[0] == 4
    panels, _ = token_panels(done.report, done.layouts, engine.picture, done.views)
    (panel,) = panels
    assert "(video: kept per frame under each)" in panel.caption
    steps = 2 if engine.family == "Qwen2-VL" else 4  # Qwen packs 2 frames per temporal step
    assert len(grid_slices(layout)[0]) == steps


# ----------------------------------------------------------------------------------------------- app and CLI
def test_app_lists_every_registered_recipe(bundled):
    pytest.importorskip("gradio")
    from vtr import recipes
    from vtr.demos.side_by_side import build_app, default_examples

    recipes.register("zz_demo_probe", lambda: [vtr.ops.Random(keep=0.5)], "probe recipe")
    try:
        app = build_app(bundled, examples=[])
        (dropdown,) = [c for c in app.config["components"] if c.get("props", {}).get("elem_id") == "recipe"]
        values = [choice[1] for choice in dropdown["props"]["choices"]]
        assert values == recipes.names() and "zz_demo_probe" in values
    finally:
        recipes._REGISTRY.pop("zz_demo_probe")
    assert [e[0] for e in default_examples()][:1] == [str(SAMPLE)]


@dataclass
class _Boom(vtr.ops.base.Operator):
    """An operator that fails inside the reduced call."""

    def apply(self, tokens, ctx):
        raise RuntimeError("boom")


def test_run_outputs_stream_then_show_errors_in_the_page(bundled, tmp_path):
    pytest.importorskip("gradio")
    from vtr import recipes
    from vtr.demos.side_by_side import media_outputs, run_outputs

    limits = UploadLimits()
    (status, *rest) = list(run_outputs(bundled, limits, None, "q", "divprune", "ratio", 0.1, 2, 8))[-1]
    assert "Error: no image or video" in status and rest == ["", "", "", None, None, ""]
    outs = list(run_outputs(bundled, limits, str(SAMPLE), "What colour is the circle?", "pool", "ratio", 0.25, 2, 8))
    assert outs[0][0] == "Generating the baseline answer…" and outs[0][3:] == ("", None, None, "")
    status, base, red, figures, overlay, plot, notes = outs[-1]
    assert status.startswith("Done: Pool(") and base and red and 'data-side="reduced">49<' in figures
    assert isinstance(overlay, Image.Image) and isinstance(plot, Image.Image) and notes == ""
    recipes.register("zz_boom", lambda: [_Boom()], "fails")
    try:
        outs = list(run_outputs(bundled, limits, str(SAMPLE), "q", "zz_boom", "recipe default", None, 2, 8))
    finally:
        recipes._REGISTRY.pop("zz_boom")
    assert any(o[1] for o in outs[:-1])  # the baseline answer came before the failure
    assert outs[-1][0] == '<span class="vtr-error">Error: RuntimeError: boom</span>'
    assert not vtr.is_wrapped(bundled.model)
    # Uploads: shown when good, dropped with the reason when bad.
    assert media_outputs(bundled, limits, str(SAMPLE))[1:] == (str(SAMPLE), "Image ready: sample.png.")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    file, preview, status = media_outputs(bundled, limits, str(tmp_path / "x.gif"))
    assert file is None and preview is None and "x.gif is not a valid image file" in status


def test_default_examples_include_videos(tmp_path):
    pytest.importorskip("gradio")
    from vtr.demos.side_by_side import EXAMPLE_PROMPTS, default_examples

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "b.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert default_examples(tmp_path) == [
        [str(tmp_path / "a.png"), EXAMPLE_PROMPTS["image"]],
        [str(tmp_path / "videos" / "b.mp4"), EXAMPLE_PROMPTS["video"]],
    ]


def test_cli_demo_bad_model_is_one_line(tmp_path, capsys):
    from vtr.cli import main

    assert main(["demo", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"vtr: error: cannot load model '{tmp_path}'")


def test_cli_demo_without_gradio(monkeypatch, capsys):
    from vtr.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "vtr.demos.side_by_side", raising=False)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == "vtr demo needs Gradio: pip install 'vtr[demo]'"
