"""STORM-style pooling: functional cores (spec §9 golden cases, hypothesis properties) and the operators."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.storm import (
    SpatialPool,
    TemporalPool,
    TemporalSample,
    spatial_pool,
    storm_chain,
    temporal_pool,
    temporal_sample,
)
from vtr.tokens import ImageLayout, VisualTokens


def frames_valued_by_index(t: int, n: int = 3, d: int = 2) -> torch.Tensor:
    return torch.arange(t, dtype=torch.float32).view(t, 1, 1).expand(t, n, d).clone()


# ------------------------------------------------------------------------------------------------ golden (spec §9)
def test_temporal_pool_golden():
    out, starts = temporal_pool(frames_valued_by_index(5), 2)
    assert out[:, 0, 0].tolist() == [0.5, 2.5, 4.0]  # the remainder frame 4 is its own group
    assert starts.tolist() == [0, 2, 4]
    assert out.shape == (3, 3, 2)


def test_temporal_sample_golden():
    x = frames_valued_by_index(5)
    for s, kept in [(2, [0, 2, 4]), (3, [0, 3]), (1, [0, 1, 2, 3, 4])]:
        out, idx = temporal_sample(x, s)
        assert idx.tolist() == kept
        assert out[:, 0, 0].tolist() == [float(k) for k in kept]


def test_spatial_pool_golden_4x4():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # cell (i, j) = 4i + j
    out, grid = spatial_pool(x, (4, 4), 2)
    assert grid == (2, 2)
    assert out.view(2, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_spatial_pool_golden_3x3_partial_windows():
    x = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # cell (i, j) = 3i + j
    out, grid = spatial_pool(x, (3, 3), 2)
    assert grid == (2, 2)
    assert out.view(2, 2).tolist() == [[2.0, 3.5], [6.5, 8.0]]


def test_edge_cases():
    empty = torch.zeros(0, 4, 3)
    out, starts = temporal_pool(empty, 3)
    assert out.shape == (0, 4, 3) and starts.numel() == 0
    out, kept = temporal_sample(empty, 2)
    assert out.shape == (0, 4, 3) and kept.numel() == 0
    out, grid = spatial_pool(empty, (2, 2), 2)
    assert out.shape == (0, 1, 3) and grid == (1, 1)
    one = torch.randn(1, 4, 3)  # an image: both temporal operators are the identity
    assert torch.equal(temporal_pool(one, 4)[0], one) and torch.equal(temporal_sample(one, 2)[0], one)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: temporal_pool(x, 0), "k must be an int >= 1, got 0"),
        (lambda x: temporal_pool(x, -2), "k must be an int >= 1, got -2"),
        (lambda x: temporal_pool(x, 1.5), "k must be an int >= 1, got 1.5"),
        (lambda x: temporal_sample(x, 0), "stride must be an int >= 1, got 0"),
        (lambda x: temporal_sample(x, True), "stride must be an int >= 1, got True"),
        (lambda x: spatial_pool(x, (2, 2), 0), "p must be an int >= 1, got 0"),
        (lambda x: spatial_pool(x, (3, 2), 2), r"grid \(3, 2\) does not hold the 4 tokens"),
        (lambda x: temporal_pool(x[0], 2), r"shape \[T, N, D\]"),
    ],
)
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 4, 2))


# ------------------------------------------------------------------------------------------------ properties
shapes = st.tuples(st.integers(0, 9), st.integers(1, 7), st.integers(1, 7), st.integers(1, 4))
factors = st.integers(1, 5)


def _x(t, h, w, d, seed, dtype=torch.float32):
    return torch.randn(t, h * w, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, k=factors, p=factors, s=factors, seed=st.integers(0, 10**6))
def test_counts_follow_the_ceil_formulas(shape, k, p, s, seed):
    t, h, w, d = shape
    y, starts = temporal_pool(_x(t, h, w, d, seed), k)
    y, (oh, ow) = spatial_pool(y, (h, w), p)
    y, kept = temporal_sample(y, s)
    assert y.shape == (math.ceil(math.ceil(t / k) / s), math.ceil(h / p) * math.ceil(w / p), d)
    assert (oh, ow) == (math.ceil(h / p), math.ceil(w / p))
    assert starts[kept].tolist() == list(range(0, t, k))[::s]  # representative frames of the kept groups


@settings(max_examples=100, deadline=None)
@given(shape=shapes, k=factors, p=factors, seed=st.integers(0, 10**6))
def test_pooling_operators_commute_and_cover_every_frame(shape, k, p, seed):
    t, h, w, d = shape
    x = _x(t, h, w, d, seed, torch.float64)
    a = spatial_pool(temporal_pool(x, k)[0], (h, w), p)[0]
    b = temporal_pool(spatial_pool(x, (h, w), p)[0], k)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The sum of group sizes times group means is the sum of all frames: nothing is dropped.
    pooled, starts = temporal_pool(x, k)
    sizes = torch.diff(torch.cat([starts, torch.tensor([t])])).to(x.dtype)
    torch.testing.assert_close((pooled * sizes.view(-1, 1, 1)).sum(0), x.sum(0), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    k=factors,
    p=factors,
    value=st.floats(-100, 100),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_constant_stays_constant_and_dtype_is_kept(shape, k, p, value, dtype):
    t, h, w, d = shape
    x = torch.full((t, h * w, d), value, dtype=dtype)
    y = spatial_pool(temporal_pool(x, k)[0], (h, w), p)[0]
    assert y.dtype == dtype
    torch.testing.assert_close(y, torch.full_like(y, float(x.flatten()[0]) if x.numel() else value))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6))
def test_factor_one_is_the_identity(shape, seed):
    t, h, w, d = shape
    x = _x(t, h, w, d, seed)
    assert torch.equal(temporal_pool(x, 1)[0], x)
    assert torch.equal(temporal_sample(x, 1)[0], x)
    assert torch.equal(spatial_pool(x, (h, w), 1)[0], x)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), p=factors, seed=st.integers(0, 10**6))
def test_spatial_pool_matches_a_window_loop(h, w, p, seed):
    """Each output cell is the mean of its (possibly partial) window, representative at (p*i, p*j)."""
    x = _x(2, h, w, 3, seed, torch.float64)
    y, (oh, ow) = spatial_pool(x, (h, w), p)
    g = x.view(2, h, w, 3)
    for i in range(oh):
        for j in range(ow):
            want = g[:, p * i : p * i + p, p * j : p * j + p].mean(dim=(1, 2))
            torch.testing.assert_close(y[:, i * ow + j], want)


# ------------------------------------------------------------------------------------------------ operators
def video_tokens(t: int = 5, h: int = 3, w: int = 4, d: int = 6, image: bool = True, seed: int = 0) -> VisualTokens:
    """A sample with an optional 2x2 image then a ``t``-frame ``h x w`` video (frame groups ``(1, h, w)``)."""
    layout = []
    offset = 0
    if image:
        layout.append(ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),), kind="image"))
        offset = 4
    layout.append(ImageLayout(offset=offset, n_tokens=t * h * w, grids=((1, h, w),) * t, kind="video"))
    n = offset + t * h * w
    embeds = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_layout(embeds, layout)


def test_chain_equals_the_cores_and_keeps_images():
    tokens = video_tokens()
    video = tokens.embeds[4:].view(5, 12, 6)
    out = tokens
    for op in storm_chain(k=2, p=2, stride=2):
        out = op(out)
    y, starts = temporal_pool(video, 2)
    y, (oh, ow) = spatial_pool(y, (3, 4), 2)
    y, kept = temporal_sample(y, 2)
    assert (oh, ow) == (2, 2) and starts[kept].tolist() == [0, 4]
    torch.testing.assert_close(out.embeds[4:], y.reshape(-1, 6))
    assert torch.equal(out.embeds[:4], tokens.embeds[:4])  # the image passes through
    # Representatives: frames 0 and 4, cells (0,0) (0,2) (2,0) (2,2) of the 3x4 grid.
    cells = [0, 2, 8, 10]
    assert out.index.tolist() == [0, 1, 2, 3] + [4 + f * 12 + c for f in (0, 4) for c in cells]
    assert out.frame[4:].tolist() == [0] * 4 + [4] * 4
    # Sizes: frame group 0 = frames 0-1 (2 frames), group 2 = frame 4 alone; windows 2x2 / 1x2 at the border.
    assert out.sizes.tolist() == [1.0] * 4 + [8.0, 8.0, 4.0, 4.0, 4.0, 4.0, 2.0, 2.0]
    # Sources: frames 2-3 (the dropped pooled group) are covered by no token; the rest by their window.
    owner = out.owner_map()
    assert bool((owner[4 + 2 * 12 : 4 + 4 * 12] == -1).all())
    assert int((owner >= 0).sum()) == 4 + 2 * 12 + 12


def test_report_counts_through_merges():
    tokens = video_tokens(t=4, image=False)
    pooled = TemporalPool(k=2)(tokens)
    assert len(pooled) == 2 * 12 and bool((pooled.sizes == 2).all())
    again = SpatialPool(p=3)(pooled)  # works on an already pooled grid: windows of the 2-frame grid
    assert again.index.tolist() == [0, 3, 24, 27]  # frames 0 and 2, cells (0,0) and (0,3)
    assert again.sizes.tolist() == [18.0, 6.0, 18.0, 6.0]


def test_identity_factors_return_the_tokens():
    tokens = video_tokens()
    for op in storm_chain(k=1, p=1, stride=1):
        assert op(tokens) is tokens
    assert TemporalPool(k=4, keep=1.0)(tokens) is tokens


def test_keep_sets_the_temporal_factor():
    assert TemporalPool(keep=0.25).factor == 4 and TemporalPool(keep=0.5, k=3).factor == 2
    assert TemporalPool(keep=0.11).factor == 9 and TemporalPool(k=3).factor == 3
    out = TemporalPool(keep=0.5)(video_tokens(t=6, image=False))
    assert len(out) == 3 * 12


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TemporalPool(k=0), "TemporalPool.k must be an int >= 1, got 0"),
        (lambda: TemporalPool(keep=0.0), r"TemporalPool.keep must be None or a ratio in \(0, 1\], got 0.0"),
        (lambda: TemporalPool(keep=2), r"ratio in \(0, 1\], got 2"),
        (lambda: SpatialPool(p=-1), "SpatialPool.p must be an int >= 1, got -1"),
        (lambda: TemporalSample(stride=1.0), "TemporalSample.stride must be an int >= 1, got 1.0"),
    ],
)
def test_operator_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_image_only_sample_is_refused():
    layout = [ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),), kind="image")]
    tokens = VisualTokens.from_layout(torch.randn(4, 3), layout)
    with pytest.raises(ValueError, match="TemporalPool acts on videos .* this sample has only images"):
        TemporalPool(k=2)(tokens)


def test_incomplete_frames_are_refused():
    tokens = video_tokens(image=False)
    pruned = tokens.take(torch.arange(1, len(tokens)))  # frame 0 lost a token
    with pytest.raises(ValueError, match="SpatialPool needs every frame of a video as a complete token grid"):
        SpatialPool(p=2)(pruned)


def test_sampling_refuses_to_drop_protected_tokens():
    tokens = video_tokens(image=False)
    tokens.protected[13] = True  # frame 1
    with pytest.raises(ValueError, match="would drop protected tokens"):
        TemporalSample(stride=2)(tokens)
    assert bool(TemporalPool(k=2)(tokens).protected[1])  # pooled: the group's token is protected


def test_long_video_memory_is_linear():
    """2,000 frames of 196 tokens (392k rows): sources stay an owner map, no [N, N_orig] matrix."""
    t, h, w, d = 2000, 14, 14, 4
    layout = [ImageLayout(offset=0, n_tokens=t * h * w, grids=((1, h, w),) * t, kind="video")]
    tokens = VisualTokens.from_layout(torch.randn(t * h * w, d), layout)
    out = tokens
    for op in storm_chain(k=4, p=2, stride=2):
        out = op(out)
    assert len(out) == 250 * 49
    assert out.owner is not None and out.owner.shape == (t * h * w,)
    assert int((out.owner >= 0).sum()) == t * h * w // 2  # half the pooled groups survive the sampling


def test_recipe_and_overrides():
    import vtr

    ops = vtr.recipes.get("storm")
    assert [type(o).__name__ for o in ops] == ["TemporalPool", "SpatialPool", "TemporalSample"]
    assert (ops[0].k, ops[1].p, ops[2].stride) == (4, 1, 1)
    ops = vtr.recipes.get("storm", k=2, p=2, stride=2)
    assert (ops[0].k, ops[1].p, ops[2].stride) == (2, 2, 2)
    assert all(op.scope == "image" for op in vtr.recipes.get("storm", scope="image"))
    with pytest.raises(ValueError, match="TemporalPool acts on each whole video: scope must be 'image', got 'frame'"):
        vtr.recipes.get("storm", scope="frame")


@pytest.mark.parametrize(
    ("preset", "fraction"), [("tpool4", 0.25), ("tsample2", 0.5), ("tpool4_tsample2", 0.125), ("spool2", 0.25)]
)
def test_presets(preset, fraction):
    import vtr

    recipe = vtr.load_recipe(Path(__file__).resolve().parents[1] / "configs" / f"storm_{preset}.yaml")
    tokens = video_tokens(t=8, h=4, w=4, image=False)
    out = tokens
    for op in recipe.ops:
        out = op(out)
    assert len(out) == fraction * len(tokens)
