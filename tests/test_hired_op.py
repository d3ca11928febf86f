"""HiRED as an operator (its cores are tested in ``test_hired_core.py``): hand cases on ``VisualTokens`` for a
LLaVA-NeXT-style canvas and InternVL tiles (thumbnail last), budgets applied to the right tiles through ``wrap``,
newline rows, videos, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_inputs, family_cases, model_and_processor

import vtr
from vtr.ops import HiRED
from vtr.ops.base import OpContext
from vtr.ops.hired import allocate_budgets
from vtr.tokens import ImageLayout, VisualTokens

INIT, FINAL = "cls_attn@0", "cls_attn@1"


def bound(**kw) -> HiRED:
    """A HiRED as ``bind`` leaves it (score, layers and full view resolved)."""
    return HiRED(**{"score": "cls_attn", "init_layer": 0, "final_layer": 1, "full_view": "first", **kw})


def next_image() -> VisualTokens:
    """One LLaVA-NeXT-style image: a 4x4 base view, a 4x8 canvas of two 4x4 tiles (1x2), 4 newline rows."""
    layout = (ImageLayout(offset=0, n_tokens=16 + 32 + 4, grids=((1, 4, 4), (1, 4, 8))),)
    t = VisualTokens.from_layout(torch.zeros(52, 2), layout)
    y, x = torch.meshgrid(torch.arange(4), torch.arange(8), indexing="ij")
    canvas = torch.stack([1 + x.flatten() // 4, (y * 4 + x % 4).flatten()], 1)
    base = torch.stack([torch.zeros(16, dtype=torch.long), torch.arange(16)], 1)
    t.encoder = torch.cat([base, canvas, torch.full((4, 2), -1)])
    init = torch.zeros(52)
    init[[0, 4, 8, 12, 1, 5, 9, 13]] = 1.0  # base-view attention on its two left columns: the left tile's region
    t.scores = {INIT: init, FINAL: torch.arange(52, dtype=torch.float32).flip(0)}  # lower rows score higher
    return t


def test_next_canvas_budgets_per_tile_and_newlines():
    """Paper mode: the base view's left half lies over the left tile, so it takes the whole sub-image budget; each
    partition keeps its top units; a newline stays exactly for the canvas lines that keep a token."""
    t = next_image()
    details: dict = {}
    out = bound(keep=12, alpha=0.5).apply(t, OpContext(extras={"details": details}))
    assert details["hired"] == [
        {"sample": 0, "image": 0, "partitions": 3, "budgets": [6, 6, 0], "grid": [1, 2], "layout": "canvas"}
    ]
    kept = out.index.tolist()
    assert kept[:6] == [0, 1, 2, 3, 4, 5]  # base view: its 6 best (lowest rows)
    # Left tile = canvas columns 0..3; its best 6 units are rows 16..19 (line 0) and 24, 25 (line 1).
    assert kept[6:12] == [16, 17, 18, 19, 24, 25]
    assert kept[12:] == [48, 49]  # the newlines of canvas lines 0 and 1


def test_next_code_mode_counts_top_tokens_in_raster_stripes():
    t = next_image()
    details: dict = {}
    bound(keep=12, alpha=0.5, mode="code").apply(t, OpContext(extras={"details": details}))
    # Top floor(16 * 0.5) = 8 attention tokens marked; stripes of 8 (base rows 0-1, 2-3) hold 4 each.
    assert details["hired"][0]["budgets"] == [6, 3, 3]


def internvl_image(crops: int = 3) -> VisualTokens:
    n = (crops + 1) * 16
    layout = (ImageLayout(offset=0, n_tokens=n, grids=((1, 4, 4),) * (crops + 1)),)
    t = VisualTokens.from_layout(torch.zeros(n, 2), layout)
    t.encoder = torch.stack([torch.arange(n) // 16, torch.arange(n) % 16], 1)
    init = torch.zeros(n)
    thumb = crops * 16
    init[thumb + torch.tensor([0, 4, 8, 12])] = 1.0  # the thumbnail's first column: the first crop's region
    t.scores = {INIT: init, FINAL: torch.rand(n, generator=torch.Generator().manual_seed(0))}
    return t


def test_internvl_thumbnail_is_the_full_view_and_comes_last():
    """InternVL: the thumbnail (last tile) gets element 0 of the budgets; crops 0..k-1 get the others in order (the
    crop layout is not in the model's inputs: 3 crops are taken as 1x3)."""
    t = internvl_image(3)
    details: dict = {}
    out = bound(keep=20, alpha=0.5, full_view="last").apply(t, OpContext(extras={"details": details}))
    d = details["hired"][0]
    p = torch.zeros(16)
    p[[0, 4, 8, 12]] = 1.0
    assert d["budgets"] == allocate_budgets(p, (1, 3), 20, 0.5) == [10, 10, 0, 0]
    assert d["grid"] == [1, 3] and d["layout"] == "assumed"
    tiles = (out.index // 16).tolist()
    assert tiles.count(3) == 10 and tiles.count(0) == 10 and tiles.count(1) == tiles.count(2) == 0
    for tile in (0, 3):
        rows = torch.arange(16) + 16 * tile
        want = torch.sort(t.scores[FINAL][rows], descending=True, stable=True).indices[:10] + 16 * tile
        assert sorted(want.tolist()) == [i for i in out.index.tolist() if i // 16 == tile]


def test_single_partition_keeps_floor_beta_units_and_protected_rows():
    layout = (ImageLayout(offset=0, n_tokens=16, grids=((1, 4, 4),)),)
    t = VisualTokens.from_layout(torch.zeros(16, 2), layout)
    t.encoder = torch.stack([torch.zeros(16, dtype=torch.long), torch.arange(16)], 1)
    t.scores = {INIT: torch.zeros(16), FINAL: torch.arange(16, dtype=torch.float32)}
    t.protected[0] = True
    out = bound(keep=0.3).apply(t, OpContext())
    assert out.index.tolist() == [0, 12, 13, 14, 15]  # floor(16 * 0.3) = 4 best + the protected row
    assert bound(keep=1.0).apply(t, OpContext()) is t  # beta = 1: nothing to do (the official code skips HiRED)


# --------------------------------------------------------------------------------------------- through wrap
def test_internvl_budgets_reach_the_right_tiles_through_wrap():
    model, processor = model_and_processor("internvl")
    inputs = build_inputs(processor, family_cases(FAMILIES["internvl"])["multi-b1"])  # 3 crops + thumb; 2 + thumb
    vtr.wrap(model, "hired", keep=0.4)
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    details = report.details["hired"]
    assert [d["partitions"] for d in details] == [4, 3]
    for d, im in zip(details, report.layouts[0], strict=True):
        per_tile = im.grids[0][1] * im.grids[0][2]
        assert sum(d["budgets"]) <= int(d["partitions"] * per_tile * 0.4)
        tiles = [i // per_tile for i in report.kept(0, d["image"])]
        want = [*d["budgets"][1:], d["budgets"][0]]  # crops in order, then the thumbnail (budget 0)
        assert [tiles.count(i) for i in range(d["partitions"])] == want


@pytest.mark.parametrize("drop_newlines", [False, True])
def test_next_newlines_through_wrap(drop_newlines):
    """Native layout: a canvas line's newline stays iff one of its tokens does; ``drop_newlines=True`` removes all."""
    model, processor = model_and_processor("llava_next")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava_next"])["image-b1"])
    vtr.wrap(model, "hired", keep=0.3, drop_newlines=drop_newlines)
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    (im,) = report.layouts[0]
    (_, g, _), (_, hh, ww) = im.grids
    kept = report.kept(0, 0)
    lines = {(i - g * g) // ww for i in kept if g * g <= i < g * g + hh * ww}
    newlines = {i - g * g - hh * ww for i in kept if i >= g * g + hh * ww}
    assert lines
    assert newlines == (set() if drop_newlines else lines)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_videos_are_one_partition(family):
    """No tiles on Qwen: a video (all its temporal steps) keeps its top floor(beta * units) units."""
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])["video-b3"])
    vtr.wrap(model, "hired", keep=0.25)
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    for b, layout in enumerate(report.layouts):
        for i, im in enumerate(layout):
            assert len(report.kept(b, i)) == int(im.n_tokens * 0.25)


def test_onevision_video_rows_cannot_be_scored():
    model, processor = model_and_processor("llava_onevision")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava_onevision"])["video-b1"])
    vtr.wrap(model, "hired")
    try:
        with pytest.raises(ValueError, match="HiRED has no vision-encoder scores .* video rows"), torch.no_grad():
            model(**inputs)
    finally:
        vtr.unwrap(model)


def test_code_mode_needs_the_tiles_to_divide_the_full_view():
    """InternVL with 3 crops of 16 units: the official stripes do not exist (clear error naming both numbers)."""
    model, processor = model_and_processor("internvl")
    inputs = build_inputs(processor, family_cases(FAMILIES["internvl"])["image-b1"])
    vtr.wrap(model, "hired", mode="code")
    try:
        with pytest.raises(ValueError, match="mode='code' needs the 3 sub-tiles to divide P=16"), torch.no_grad():
            model(**inputs)
    finally:
        vtr.unwrap(model)


def test_recipe_strings_of_the_benchmarks():
    rec = vtr.recipes.build("hired", keep=64)
    assert rec.ops[0].keep == 64 and isinstance(rec.ops[0].keep, int)


@pytest.mark.parametrize(
    ("family", "op", "match"),
    [
        ("llava", HiRED(init_layer=5), r"HiRED.init_layer=5: the LLaVA-1.5 encoder has blocks 0..1"),
        ("llava", HiRED(final_layer=-3), r"HiRED.final_layer=-3"),
        ("qwen2_vl", HiRED(score="cls_attn"), "needs a CLS token; the Qwen2-VL encoder has none"),
        ("internvl", HiRED(score="mean_received"), "the InternVL encoder has a CLS token"),
    ],
)
def test_bad_input_at_wrap(family, op, match):
    model, _ = model_and_processor(family)
    with pytest.raises(ValueError, match=match):
        vtr.wrap(model, op)
    assert not vtr.is_wrapped(model)


def test_timm_cannot_host_hired():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    with pytest.raises(ValueError, match="HiRED acts in stage 'pre_llm', which the timm ViT adapter does not support"):
        vtr.wrap(vit, "hired")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0}, "HiRED.keep must be an int >= 1"),
        ({"alpha": 1.5}, r"HiRED.alpha must be a number in \[0, 1\], got 1.5"),
        ({"mode": "official"}, "HiRED.mode must be one of"),
        ({"score": "cls"}, "HiRED.score must be one of"),
        ({"full_view": "middle"}, "HiRED.full_view must be one of"),
    ],
)
def test_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiRED(**kwargs)


def test_official_next_setting_from_its_config():
    """``configs/hired_next_code.yaml``: code allocation, newline rows dropped, compact positions on LLaVA-NeXT."""
    from pathlib import Path

    model, processor = model_and_processor("llava_next")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava_next"])["image-b3"])
    config = Path(__file__).parents[1] / "configs" / "hired_next_code.yaml"
    vtr.wrap(model, config)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        report, state = model.vtr.report, model.vtr.adapter.last
    finally:
        vtr.unwrap(model)
    for b, layout in enumerate(report.layouts):
        (im,) = layout
        assert im.n_tokens == sum(t * h * w for t, h, w in im.grids)  # no newline rows at all
        budget = int((len(report.details["hired"][b]["budgets"])) * im.grids[0][1] * im.grids[0][2] * 0.2)
        assert report.tokens_out(b) <= budget
        assert bool(state.splice.shift[b] > 0)  # positions re-indexed


@pytest.mark.parametrize("recipe", ["hired", "ats", "mustdrop"])
def test_resized_onevision_canvases_are_refused(recipe):
    """``anyres_max`` canvases the model resizes cannot receive encoder results (README: where not, and why)."""
    from conftest import Sample

    from vtr.testing import tiny_llava_onevision

    model, processor = tiny_llava_onevision(vision_aspect_ratio="anyres_max_1")
    inputs = build_inputs(processor, [Sample(images=((64, 40),))])
    vtr.wrap(model, recipe)
    with pytest.raises(ValueError, match="cannot be placed on the LLaVA-OneVision canvas"), torch.no_grad():
        model(**inputs)
