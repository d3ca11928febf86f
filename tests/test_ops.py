"""Budgets, scopes, Random and Pool on plain VisualTokens."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops import DivPrune, Pool, Random, resolve_keep
from vtr.ops.baselines import pool_grid_shape, pool_windows, random_select
from vtr.tokens import ImageLayout, VisualTokens


def tokens(grids_per_image: list[list[tuple[int, int, int]]], d: int = 4, seed: int = 0) -> VisualTokens:
    layout, offset = [], 0
    for grids in grids_per_image:
        n = sum(t * h * w for t, h, w in grids)
        layout.append(ImageLayout(offset=offset, n_tokens=n, grids=tuple(grids)))
        offset += n
    emb = torch.randn(offset, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens.from_layout(emb, layout)


@pytest.mark.parametrize(
    ("keep", "n", "expected"),
    [(0.25, 576, 144), (0.098, 576, 56), (1.0, 10, 10), (0.01, 10, 1), (64, 576, 64), (1000, 576, 576), (0.5, 0, 0)],
)
def test_resolve_keep(keep, n, expected):
    assert resolve_keep(keep, n) == expected


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, -0.1])
def test_bad_keep_values_name_the_value(bad):
    # The message ends with "got <value>", the exact repr of what was passed (0 and 0.0 differ).
    with pytest.raises(ValueError, match=rf"got {re.escape(repr(bad))}$"):
        DivPrune(keep=bad)


@pytest.mark.parametrize("bad", ["x", None, True, [1]])
def test_bad_keep_types(bad):
    with pytest.raises(TypeError, match="keep must be an int"):
        Random(keep=bad)


def test_bad_scope():
    with pytest.raises(ValueError, match="scope must be one of"):
        Pool(scope="tile")


def test_random_is_reproducible_and_seeded():
    a = random_select(100, 10, seed=1)
    assert torch.equal(a, random_select(100, 10, seed=1))
    assert not torch.equal(a, random_select(100, 10, seed=2))
    assert a.tolist() == sorted(set(a.tolist()))


@pytest.mark.parametrize(
    ("scope", "keep", "expected"),
    [("image", 0.25, [8, 2]), ("image", 5, [5, 5]), ("sample", 0.25, [10]), ("frame", 0.5, [8, 8, 2, 2])],
)
def test_scopes_split_the_budget(scope, keep, expected):
    # image 0: two frames of 4x4; image 1: two frames of 2x2
    t = tokens([[(1, 4, 4), (1, 4, 4)], [(1, 2, 2), (1, 2, 2)]])
    out = Random(keep=keep, scope=scope).apply(t, None)
    if scope == "sample":
        counts = [len(out)]
    elif scope == "image":
        counts = [int((out.image == i).sum()) for i in range(2)]
    else:
        counts = [int(((out.image == i) & (out.frame == f)).sum()) for i in range(2) for f in range(2)]
    assert counts == expected
    assert out.index.tolist() == sorted(out.index.tolist())


def test_selected_tokens_keep_their_data():
    t = tokens([[(1, 4, 4)]])
    out = DivPrune(keep=5).apply(t, None)
    assert torch.equal(out.embeds, t.embeds[out.index])
    assert torch.equal(out.coords, t.coords[out.index])


def test_protected_tokens_survive():
    t = tokens([[(1, 4, 4)]])
    t.protected[3] = True
    for _ in range(3):
        out = Random(keep=2, seed=_).apply(t, None)
        assert 3 in out.index.tolist()


def test_pool_golden_2x2_average():
    t = tokens([[(1, 4, 4)]])
    out = Pool(keep=4).apply(t, None)
    assert len(out) == 4
    grid = t.embeds.view(4, 4, -1)
    expected = torch.stack([grid[r : r + 2, c : c + 2].reshape(4, -1).mean(0) for r in (0, 2) for c in (0, 2)])
    assert torch.allclose(out.embeds, expected, atol=1e-6)
    assert out.sizes.tolist() == [4.0, 4.0, 4.0, 4.0]
    # Representatives: the cell nearest each window centre, lowest index on ties -> top-left cell.
    assert out.index.tolist() == [0, 2, 8, 10]
    assert out.source_matrix().sum(dim=1).tolist() == [4, 4, 4, 4]
    assert out.source_matrix().any(dim=0).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 600))
def test_pool_grid_shape_properties(h, w, k):
    oh, ow = pool_grid_shape(h, w, k)
    assert 1 <= oh <= h and 1 <= ow <= w
    assert oh * ow <= max(k, 1) or (oh, ow) == (1, 1)
    if k >= h * w:
        assert (oh, ow) == (h, w)


@given(st.integers(1, 50), st.integers(1, 50))
def test_pool_windows_cover_everything(n, out):
    out = min(out, n)
    wins = pool_windows(n, out)
    assert len(wins) == out and wins[0][0] == 0 and wins[-1][1] == n
    assert all(a < b for a, b in wins)
    assert all(w1[0] <= w0[1] for w0, w1 in itertools.pairwise(wins))


def test_pool_count_close_to_budget_and_per_frame():
    t = tokens([[(1, 6, 6), (1, 6, 6)]])
    out = Pool(keep=18, scope="image").apply(t, None)
    assert [int((out.frame == f).sum()) for f in range(2)] == [9, 9]
    assert float(out.sizes.sum()) == 72.0


def test_chain_ratio_refers_to_original_count():
    t = tokens([[(1, 8, 8)]])
    pooled = Pool(keep=16).apply(t, None)  # 64 -> 16 tokens of size 4
    out = Random(keep=0.125).apply(pooled, None)  # 12.5% of the ORIGINAL 64 = 8
    assert len(out) == 8
