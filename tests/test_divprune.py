"""DivPrune functional core: golden cases, properties and the large-M path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops import divprune as dp
from vtr.ops.divprune import divprune_select


def unit_vectors(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def naive_reference(x: torch.Tensor, k: int) -> list[int]:
    """Official-style loop: recompute the min distance to the whole selected set at every step."""
    u = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = (1 - u @ u.T).clamp_min(0)
    m = x.shape[0]
    if k >= m:
        return list(range(m))
    off = d + torch.diag(torch.full((m,), float("inf"), dtype=d.dtype))
    sel = [int(torch.argmax(off.min(dim=1).values))]
    while len(sel) < k:
        mind = d[sel].min(dim=0).values
        mind[sel] = -1.0
        sel.append(int(torch.argmax(mind)))
    return sorted(sel)


def test_golden_hand_case():
    x = unit_vectors([0, 10, 90, 180])
    assert divprune_select(x, 1).tolist() == [3]  # the seed: nearest-neighbour distance 1.0 is largest
    assert divprune_select(x, 2).tolist() == [0, 3]
    assert divprune_select(x, 3).tolist() == [0, 2, 3]
    assert divprune_select(x, 4).tolist() == [0, 1, 2, 3]


def test_three_tight_clusters_pick_one_each():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    x = torch.cat([c + 0.01 * torch.randn(5, 8, generator=gen) for c in centres])
    picked = divprune_select(x, 3)
    assert sorted(int(i) // 5 for i in picked) == [0, 1, 2]


def test_duplicates_give_distinct_indices_covering_both_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([a, a, a, b, b, b])
    picked = divprune_select(x, 4).tolist()
    assert len(set(picked)) == 4
    assert any(i < 3 for i in picked) and any(i >= 3 for i in picked)


@pytest.mark.parametrize("k", [0, -1])
def test_nonpositive_k_raises(k):
    with pytest.raises(ValueError, match="k must be >= 1"):
        divprune_select(torch.randn(4, 3), k)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        divprune_select(torch.randn(2, 3, 4), 2)
    with pytest.raises(TypeError, match="int"):
        divprune_select(torch.randn(4, 3), 2.0)


def test_k_at_least_m_and_empty():
    assert divprune_select(torch.randn(5, 3), 5).tolist() == list(range(5))
    assert divprune_select(torch.randn(5, 3), 50).tolist() == list(range(5))
    empty = divprune_select(torch.zeros(0, 3), 3)
    assert empty.dtype == torch.long and empty.numel() == 0


def test_zero_row_is_distance_one_from_everything():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]])
    # The zero row is at distance 1 from both others, the most isolated: it seeds the selection.
    assert divprune_select(x, 1).tolist() == [2]


matrices = st.integers(2, 40).flatmap(
    lambda m: st.tuples(st.just(m), st.integers(1, 6), st.integers(0, 2**31 - 1), st.integers(1, m))
)


@settings(max_examples=60, deadline=None)
@given(matrices)
def test_properties(args):
    m, d, seed, k = args
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    out = divprune_select(x, k)
    assert out.dtype == torch.long
    assert out.tolist() == sorted(set(out.tolist())) and len(out) == min(k, m)
    assert 0 <= int(out.min()) and int(out.max()) < m
    # Invariant to positive per-row scaling.
    scale = torch.rand(m, 1, generator=torch.Generator().manual_seed(seed + 1)) * 10 + 0.1
    assert torch.equal(divprune_select(x * scale, k), out)
    # Nesting: the set for k contains the set for k - 1.
    if k > 1:
        assert set(divprune_select(x, k - 1).tolist()) <= set(out.tolist())
    assert out.tolist() == naive_reference(x, k)


def test_fp16_input_equals_same_values_in_fp32():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)).half()
    assert torch.equal(divprune_select(x, 10), divprune_select(x.float(), 10))


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 5, generator=gen)
    perm = torch.randperm(30, generator=gen)
    out = divprune_select(x, 7)
    out_perm = divprune_select(x[perm], 7)
    assert sorted(perm[out_perm].tolist()) == out.tolist()


def test_blocked_path_equals_dense(monkeypatch):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    dense = divprune_select(x, 25)
    monkeypatch.setattr(dp, "DENSE_MAX_TOKENS", 16)
    monkeypatch.setattr(dp, "_BLOCK_ROWS", 37, raising=False)
    assert torch.equal(divprune_select(x, 25), dense)
