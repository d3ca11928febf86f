"""MustDrop functional cores (vtr.ops.mustdrop): spec golden cases, properties, a loop reference, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.mustdrop import (
    PRESETS,
    dual_attention_keep,
    key_set,
    layer_averaged_count,
    preset_thresholds,
    scale_layers,
    window_merge,
)

LEFT = [0, 1, 2, 6, 7, 8, 12, 13, 14]
RIGHT = [3, 4, 5, 9, 10, 11, 15, 16, 17]
HAND_ATTN = torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.3, 0.0, 0.1, 0.0]])


def hand_grid() -> torch.Tensor:
    """Grid (3, 6): the left 3x3 window holds 9 identical vectors, the right one 9 orthogonal one-hots."""
    x = torch.zeros(1, 18, 9)
    x[0, LEFT] = torch.arange(1.0, 10.0)
    for j, i in enumerate(RIGHT):
        x[0, i, j] = 1.0
    return x


def clustered(bsz: int, h: int, w: int, c: int, seed: int, frac: float) -> torch.Tensor:
    """Random tokens where a fraction of the 3x3 windows hold near-identical vectors."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, h, w, c, generator=gen)
    for b, r, q in itertools.product(range(bsz), range(h // 3), range(w // 3)):
        if float(torch.rand(1, generator=gen)) < frac:
            noise = 0.05 + 0.95 * float(torch.rand(1, generator=gen))  # never a near-exact tie at similarity 1
            x[b, 3 * r : 3 * r + 3, 3 * q : 3 * q + 3] = torch.randn(c, generator=gen) + noise * torch.randn(
                3, 3, c, generator=gen
            )
    return x.reshape(bsz, h * w, c)


def loop_reference(x: torch.Tensor, grid: tuple[int, int], window: int, threshold: float):
    """Independent per-window loops (fp64): (windows, sims per row, r, merged window ids per row in merge order)."""
    h, w = grid
    windows = []
    for r, q in itertools.product(range(h // window), range(w // window)):
        windows.append(
            [(r * window + i) * w + q * window + j for i, j in itertools.product(range(window), range(window))]
        )
    sims = []
    for row in x.double():
        row_sims = []
        for ids in windows:
            pairs = [
                float(torch.nn.functional.cosine_similarity(row[a], row[b], dim=0, eps=1e-12))
                for a, b in itertools.permutations(ids, 2)
            ]
            row_sims.append(sum(pairs) / len(pairs))
        sims.append(row_sims)
    r = min((sum(s >= threshold for s in row) for row in sims), default=0) if windows else 0
    order = [sorted(range(len(windows)), key=lambda k: (-row[k], k))[:r] for row in sims]
    return windows, sims, r, order


# ---------------------------------------------------------------- window merge: golden cases (spec section 9)


def test_window_merge_hand_case():
    x = hand_grid()
    out, sizes, sources = window_merge(x, (3, 6), 3, 0.8)
    assert out.shape == (1, 10, 9)
    torch.testing.assert_close(out[0, 0], torch.arange(1.0, 10.0))  # the left window's mean
    assert sizes[0].tolist() == [9.0] + [1.0] * 9
    assert sources[0, 0].tolist() == LEFT  # anchor 14 last
    assert sources[0, 1:, 0].tolist() == RIGHT and torch.all(sources[0, 1:, 1:] == -1)
    assert torch.equal(out[0, 1:], x[0, RIGHT])


@pytest.mark.parametrize(("grid", "threshold"), [((3, 6), 1.01), ((2, 9), 0.8), ((3, 2), 0.8)])
def test_window_merge_identity(grid, threshold):
    x = torch.ones(2, grid[0] * grid[1], 4)  # every window is perfectly similar
    out, sizes, sources = window_merge(x, grid, 3, threshold)
    assert out is x and torch.all(sizes == 1) and sizes.dtype == torch.float32
    assert torch.equal(sources[..., 0], torch.arange(grid[0] * grid[1]).expand(2, -1))
    assert torch.all(sources[..., 1:] == -1)


def test_window_merge_border_tokens_never_merge():
    x = torch.ones(1, 16, 3)  # 4 x 4 grid, window 3: one window, row 3 and column 3 outside
    out, sizes, sources = window_merge(x, (4, 4), 3, 0.8)
    assert out.shape == (1, 8, 3) and torch.equal(out, torch.ones(1, 8, 3))
    assert sizes[0].tolist() == [9.0] + [1.0] * 7
    assert sources[0, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert sources[0, 1:, 0].tolist() == [3, 7, 11, 12, 13, 14, 15]


def test_window_merge_batch_minimum_and_order():
    # Row 0 has 2 mergeable windows, row 1 only 1: both merge r = 1 window, their most similar one.
    x = clustered(1, 3, 9, 8, seed=0, frac=0.0).repeat(2, 1, 1)
    gen = torch.Generator().manual_seed(1)
    x.view(2, 3, 9, 8)[0, :, 0:3] = torch.randn(8, generator=gen)  # window 0 identical in row 0
    x.view(2, 3, 9, 8)[0, :, 6:9] = torch.randn(8, generator=gen) + 0.05 * torch.randn(3, 3, 8, generator=gen)
    x.view(2, 3, 9, 8)[1, :, 3:6] = torch.randn(8, generator=gen) + 0.05 * torch.randn(3, 3, 8, generator=gen)
    out, sizes, sources = window_merge(x, (3, 9), 3, 0.8)
    assert out.shape == (2, 27 - 8, 8) and torch.all(sizes[:, 0] == 9) and torch.all(sizes[:, 1:] == 1)
    assert sources[0, 0, -1].item() == 20 and sources[1, 0, -1].item() == 23  # anchors: bottom-right tokens


def test_window_merge_dtype_and_fp32_mean():
    x = clustered(2, 6, 6, 16, seed=1, frac=1.0).to(torch.bfloat16)
    out, sizes, sources = window_merge(x, (6, 6), 3, 0.5)
    assert out.dtype == torch.bfloat16 and sizes.dtype == torch.float32 and sources.dtype == torch.long
    merged = sizes[0] > 1
    want = x[0].float()[sources[0, merged]].mean(dim=1).to(torch.bfloat16)
    assert torch.equal(out[0, merged], want)


# ---------------------------------------------------------------- window merge: properties


merge_cases = st.tuples(
    st.integers(1, 3),
    st.integers(0, 10),
    st.integers(0, 10),
    st.integers(2, 4),
    st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.01]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=120, deadline=None)
@given(merge_cases)
def test_window_merge_properties(case):
    bsz, h, w, window, threshold, frac, seed = case
    x = clustered(bsz, h, w, 6, seed, frac) if h * w else torch.zeros(bsz, 0, 6)
    out, sizes, sources = window_merge(x, (h, w), window, threshold)
    windows, sims, r, order = loop_reference(x, (h, w), window, threshold)
    m = window * window
    assert out.shape == (bsz, h * w - r * (m - 1), 6) and sizes.shape == out.shape[:2]
    assert sources.shape == (bsz, out.shape[1], m)
    for b in range(bsz):
        valid = sources[b][sources[b] >= 0].tolist()
        assert sorted(valid) == list(range(h * w))  # every original index exactly once
        # Merged first, by descending similarity (the reference's order); the rest ascending, size 1.
        assert [sources[b, i].tolist() for i in range(r)] == [windows[k] for k in order[b]]
        rest = sources[b, r:, 0].tolist()
        assert rest == sorted(rest) and torch.all(sources[b, r:, 1:] == -1)
        assert sizes[b].tolist() == [float(m)] * r + [1.0] * (out.shape[1] - r)
        for i in range(r):  # anchor last, ascending sources
            assert sources[b, i].tolist() == sorted(sources[b, i].tolist())
        assert all(sims[b][k] >= threshold for k in order[b])  # only windows at or above the threshold merge
    # Mass is conserved.
    torch.testing.assert_close((out * sizes[..., None]).sum(dim=1), x.sum(dim=1), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- key set


def test_key_set():
    scores = torch.rand(576, generator=torch.Generator().manual_seed(0))
    keys = key_set(scores)
    assert len(keys) == 47  # ceil(0.08 * 576)
    assert keys.tolist() == sorted(torch.topk(scores, 47).indices.tolist())
    assert key_set(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0]), rate=0.4).tolist() == [1, 2]  # ties: lowest index
    assert key_set(torch.tensor([1.0]), rate=0.08).tolist() == [0]
    assert key_set(torch.zeros(0)).tolist() == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.floats(0.001, 1.0), st.integers(0, 2**31 - 1))
def test_key_set_properties(n, rate, seed):
    scores = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed)).float()
    keys = key_set(scores, rate).tolist()
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    assert keys == sorted(ranked[: len(keys)])
    assert len(keys) == math.ceil(rate * n)  # the float product, as in the official code


# ---------------------------------------------------------------- dual attention filter


def test_dual_attention_keep_hand_cases():
    assert dual_attention_keep(HAND_ATTN, 0.15, 0.12, torch.tensor([3])).tolist() == [0, 3]
    assert dual_attention_keep(HAND_ATTN, 0.15, 0.09, torch.tensor([], dtype=torch.long)).tolist() == [0, 1, 2]
    assert dual_attention_keep(torch.zeros(0, 4), 0.15, 0.09, []).tolist() == [0, 1, 2, 3]  # T = 0
    assert dual_attention_keep(torch.zeros(3, 0), 0.15, 0.09, []).tolist() == []  # V = 0
    assert dual_attention_keep(HAND_ATTN, 0.15, 0.12, torch.tensor(2)).tolist() == [0, 2]  # 0-d protected
    assert dual_attention_keep(HAND_ATTN, 0.0, 1.0, [1, 1]).tolist() == [0, 1, 2, 3]  # global 0: nothing weak


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 12),
    st.integers(0, 40),
    st.floats(0.0, 0.5),
    st.floats(0.0, 0.5),
    st.integers(0, 2**31 - 1),
)
def test_dual_attention_keep_properties(t, v, g_thr, i_thr, seed):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(t, v, generator=gen) ** 4
    protected = torch.randperm(v, generator=gen)[: v // 5]
    kept = dual_attention_keep(attn, g_thr, i_thr, protected)
    assert kept.dtype == torch.long and kept.tolist() == sorted(set(kept.tolist()))
    assert set(protected.tolist()) <= set(kept.tolist())  # the key set is always kept
    if t == 0:
        assert kept.tolist() == list(range(v))
        return
    g, u = attn.sum(dim=0), attn.max(dim=0).values
    for j in range(v):
        dropped = bool(g[j] < g_thr * g.sum()) and bool(u[j] < i_thr)
        assert (j in kept.tolist()) == (not dropped or j in protected.tolist())


# ---------------------------------------------------------------- layers, presets, counting


def test_scale_layers_table():
    assert scale_layers(depth=24) == [2, 4, 8, 10]
    assert scale_layers(depth=28) == [2, 5, 9, 12]
    assert scale_layers(depth=32) == [2, 6, 10, 14]
    assert scale_layers(depth=40) == [2, 8, 12, 18]
    assert scale_layers(depth=4) == [0, 1, 2]  # 0.25, 0.75, 1.25, 1.75 round to 0, 1, 1, 2: deduplicated
    assert scale_layers((1, 3), depth=12, reference_depth=12) == [1, 3]
    assert scale_layers((), depth=8) == []


def test_presets():
    assert preset_thresholds("192") == (0.001, 0.001)
    assert preset_thresholds(128) == (0.0012, 0.001)
    assert preset_thresholds("64") == (0.011, 0.01)
    assert set(PRESETS) == {"192", "128", "64"}


def test_layer_averaged_count():
    counts = [576, 400, 300, 200, 100]
    assert layer_averaged_count(counts, [2, 6, 10, 14], 32) == (3 * 576 + 4 * 400 + 4 * 300 + 4 * 200 + 17 * 100) / 32
    assert layer_averaged_count([576], [], 32) == 576
    assert layer_averaged_count([10, 0], [0], 4) == 2.5  # layer 0 still processes the 10 tokens


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 48), st.data())
def test_layer_averaged_count_matches_a_layer_loop(depth, data):
    layers = sorted(data.draw(st.sets(st.integers(0, depth - 1), max_size=6)))
    counts = data.draw(st.lists(st.integers(0, 600), min_size=len(layers) + 1, max_size=len(layers) + 1))
    per_layer, current = [], 0
    for layer in range(depth):
        per_layer.append(counts[current])  # a pruning layer processes its input, then prunes
        if layer in layers:
            current += 1
    assert layer_averaged_count(counts, layers, depth) == pytest.approx(sum(per_layer) / depth, rel=1e-12)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_value():
    x = torch.zeros(1, 9, 2)
    with pytest.raises(ValueError, match=r"grid \(3, 4\) has 12 cells but x has 9 tokens"):
        window_merge(x, (3, 4))
    with pytest.raises(ValueError, match="window must be >= 2, got 1"):
        window_merge(x, (3, 3), window=1)
    with pytest.raises(TypeError, match="window must be an int, got 2.5"):
        window_merge(x, (3, 3), window=2.5)
    with pytest.raises(ValueError, match="threshold must be a number, got nan"):
        window_merge(x, (3, 3), threshold=float("nan"))
    with pytest.raises(
        ValueError, match=r"x must be a float tensor \[B, H\*W, C\], got torch.float32 tensor of shape \(9, 2\)"
    ):
        window_merge(x[0], (3, 3))
    with pytest.raises(ValueError, match=r"protected indices must lie in \[0, 4\), got range \[0, 4\]"):
        dual_attention_keep(HAND_ATTN, 0.1, 0.1, [0, 4])
    with pytest.raises(ValueError, match=r"protected indices must lie in \[0, 4\), got range \[-1, -1\]"):
        dual_attention_keep(HAND_ATTN, 0.1, 0.1, torch.tensor(-1))
    with pytest.raises(ValueError, match="protected must hold integer indices, got torch.float32"):
        dual_attention_keep(HAND_ATTN, 0.1, 0.1, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="global_thr must be a finite number, got inf"):
        dual_attention_keep(HAND_ATTN, float("inf"), 0.1, [])
    with pytest.raises(ValueError, match=r"attn_text_to_vis must be a float tensor \[T, V\]"):
        dual_attention_keep(HAND_ATTN[0], 0.1, 0.1, [])
    with pytest.raises(ValueError, match="depth and reference_depth must be >= 1, got 0 and 32"):
        scale_layers(depth=0)
    with pytest.raises(ValueError, match=r"give layer 4, beyond the last \(3\)"):
        scale_layers((31,), depth=4)
    with pytest.raises(ValueError, match=r"layers must be >= 0, got \[-2\]"):
        scale_layers((-2,), depth=32)
    with pytest.raises(ValueError, match=r"preset must be one of \('192', '128', '64'\), got '100'"):
        preset_thresholds("100")
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\], got 0"):
        key_set(torch.ones(4), rate=0)
    with pytest.raises(ValueError, match="need 3 counts"):
        layer_averaged_count([1, 2], [2, 6], 32)
    with pytest.raises(ValueError, match="ascending, unique"):
        layer_averaged_count([1, 2, 3], [6, 2], 32)
