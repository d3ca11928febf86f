"""HiRED functional cores (vtr.ops.hired): spec golden cases, properties in both modes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.hired import allocate_budgets, select_partitions, stable_topk_mask, total_budget


def column0_attention() -> torch.Tensor:
    attn = torch.zeros(16)
    attn[[0, 4, 8, 12]] = 1.0  # column 0 of a 4 x 4 grid
    return attn


# ---------------------------------------------------------------- golden cases (spec section 9)


def test_hand_case_both_modes():
    assert allocate_budgets(column0_attention(), (2, 2), 20, alpha=0.75, mode="paper") == [15, 2, 0, 2, 0]
    assert allocate_budgets(column0_attention(), (2, 2), 20, alpha=0.75, mode="code") == [15, 1, 1, 1, 1]


def test_cap_case_is_not_redistributed():
    attn = torch.zeros(16)
    attn[[0, 1, 4, 5]] = 0.25  # all mass inside tile 0
    assert allocate_budgets(attn, (2, 2), 80, alpha=0.5, mode="paper") == [16, 16, 0, 0, 0]


def test_zero_budget_and_zero_attention():
    for mode in ("paper", "code"):
        assert allocate_budgets(column0_attention(), (2, 2), 0, mode=mode) == [0, 0, 0, 0, 0]
        assert allocate_budgets(torch.zeros(16), (2, 2), 20, alpha=0.5, mode=mode) == [10, 2, 2, 2, 2]
    # alpha = 1 marks no token in "code": an even split instead of the official NaN.
    assert allocate_budgets(column0_attention(), (2, 2), 40, alpha=1.0, mode="code") == [16, 6, 6, 6, 6]


def test_paper_regions_for_uneven_grids():
    # g = 5 and a 2 x 3 tiling: rows [0, 2), [2, 5); columns [0, 1), [1, 3), [3, 5).
    attn = torch.arange(25, dtype=torch.float32)
    grid = attn.reshape(5, 5)
    mass = [float(grid[r0:r1, c0:c1].sum()) for r0, r1 in ((0, 2), (2, 5)) for c0, c1 in ((0, 1), (1, 3), (3, 5))]
    got = allocate_budgets(attn, (2, 3), 60, alpha=0.25, mode="paper")
    assert got == [15] + [min(math.floor(45 * m / sum(mass)), 25) for m in mass]


def test_code_mode_uses_horizontal_stripes():
    # Marked tokens in the first raster stripe only: with grid (2, 2) the stripes are rows 0 and 1, 2, 3.
    attn = torch.zeros(16)
    attn[:4] = 1.0
    assert allocate_budgets(attn, (2, 2), 32, alpha=0.75, mode="code") == [16, 16, 0, 0, 0]
    # The paper regions of the same attention split it between the two top quadrants.
    assert allocate_budgets(attn, (2, 2), 32, alpha=0.75, mode="paper") == [16, 8, 8, 0, 0]


def test_total_budget():
    assert total_budget(5, 576, 0.2) == 576  # HiRED-20% on a 2 x 2 LLaVA-NeXT image
    assert total_budget(1, 576, 0.2) == 115
    assert total_budget(3, 576, 0.4) == 691


# ---------------------------------------------------------------- properties


cases = st.tuples(
    st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (2, 3), (3, 2), (4, 4)]),
    st.sampled_from([4, 16, 36, 144]),  # P = g^2; "code" raises where k does not divide P
    st.integers(0, 3000),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["dense", "sparse", "zeros", "ties"]),
)


@settings(max_examples=300, deadline=None)
@given(cases)
def test_invariants_in_both_modes(case):
    grid, p, total, alpha, seed, kind = case
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(p, generator=gen)
    if kind == "sparse":
        attn = attn * (torch.rand(p, generator=gen) < 0.1)
    elif kind == "zeros":
        attn = torch.zeros(p)
    elif kind == "ties":
        attn = torch.randint(0, 3, (p,), generator=gen).float()
    k = grid[0] * grid[1]
    for mode in ("paper", "code"):
        if mode == "code" and p % k:
            with pytest.raises(ValueError, match=f"needs the {k} sub-tiles to divide P={p}"):
                allocate_budgets(attn, grid, total, alpha, mode)
            continue
        out = allocate_budgets(attn, grid, total, alpha, mode)
        assert len(out) == k + 1 and all(isinstance(v, int) for v in out)
        assert all(0 <= v <= p for v in out)
        assert sum(out) <= total
        assert out[0] == min(math.floor(alpha * total), p)
        n_sub = min(total - out[0], k * p)
        if float(attn.sum()) == 0 or (mode == "code" and int(p * (1 - alpha)) == 0):
            assert out[1:] == [min(n_sub // k, p)] * k  # even split, never NaN
        # Nothing is redistributed: the sub-image part never exceeds N_sub.
        assert sum(out[1:]) <= n_sub
        # Invariant to scaling the attention (in "paper" up to float ties, so scale by a power of two).
        assert allocate_budgets(attn * 4.0, grid, total, alpha, mode) == out


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.integers(0, 60), st.integers(0, 2**31 - 1))
def test_selection_is_a_stable_topk(p, k, seed):
    scores = torch.randint(0, 4, (p,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    mask = stable_topk_mask(scores, k)
    kept = mask.nonzero()[:, 0].tolist()
    assert len(kept) == min(k, p)
    ranked = sorted(range(p), key=lambda i: (-float(scores[i]), i))  # ties to the lowest index
    assert kept == sorted(ranked[: min(k, p)])


def test_select_partitions():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 0.2, 0.1, 0.3]])
    kept = select_partitions(scores, [2, 3, 0])
    assert [t.tolist() for t in kept] == [[1, 2], [0, 1, 2], []]
    assert all(t.dtype == torch.long for t in kept)
    kept = select_partitions([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([5.0])], [2, 9])
    assert [t.tolist() for t in kept] == [[0, 2], [0]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.5}, ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a number in"),
        ({"mode": "both"}, ValueError, r"mode must be one of \('paper', 'code'\), got 'both'"),
        ({"total": -1}, ValueError, "total must be >= 0, got -1"),
        ({"total": 2.5}, TypeError, "total must be an int, got 2.5"),
        ({"grid": (0, 2)}, ValueError, r"grid entries must be >= 1, got \(0, 2\)"),
        ({"grid": (2,)}, ValueError, r"grid must be a pair \(n_h, n_w\), got \(2,\)"),
        ({"grid": (3, 1), "mode": "code"}, ValueError, "needs the 3 sub-tiles to divide P=16"),
        ({"attn": torch.ones(12)}, ValueError, "square token grid.*P=12"),
        ({"attn": -torch.ones(16)}, ValueError, "non-negative"),
        ({"attn": torch.ones(4, 4)}, ValueError, r"1-D float tensor \[P\], got torch.float32 tensor of shape \(4, 4\)"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, error, match):
    args = {"attn": column0_attention(), "grid": (2, 2), "total": 10, "alpha": 0.5, "mode": "paper", **kwargs}
    with pytest.raises(error, match=match):
        allocate_budgets(args["attn"], args["grid"], args["total"], args["alpha"], args["mode"])


def test_bad_selection_inputs():
    with pytest.raises(ValueError, match="3 partitions of scores but 2 budgets"):
        select_partitions(torch.ones(3, 4), [1, 1])
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        stable_topk_mask(torch.ones(4), -1)
    with pytest.raises(ValueError, match="NaN"):
        stable_topk_mask(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\], got 2"):
        total_budget(5, 576, 2)
