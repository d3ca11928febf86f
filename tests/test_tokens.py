"""``VisualTokens``: sparse sources (owner map), ``merge``, ``take`` and ``cat`` keep provenance exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.tokens import ImageLayout, VisualTokens


def grid_tokens(h: int = 2, w: int = 3, d: int = 2) -> VisualTokens:
    emb = torch.arange(h * w * d, dtype=torch.float32).view(h * w, d)
    return VisualTokens.from_layout(emb, [ImageLayout(offset=0, n_tokens=h * w, grids=((1, h, w),))])


def test_merge_golden_case():
    # Grid 2x3 (raster 0..5): tokens {0, 1} -> output 0 (rep 1), {3, 4} -> output 1 (rep 3), 5 stays, 2 dropped.
    t = grid_tokens()
    t.scores["s"] = torch.tensor([1.0, 3.0, 9.0, 2.0, 4.0, 7.0])
    t.protected[4] = True
    assign = torch.tensor([0, 0, -1, 1, 1, 2])
    emb = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    out = t.merge(assign, emb, rep=torch.tensor([1, 3, 5]))
    assert out.index.tolist() == [1, 3, 5]
    assert out.coords.tolist() == [[0, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert out.sizes.tolist() == [2.0, 2.0, 1.0]
    assert out.protected.tolist() == [False, True, False]
    assert out.scores["s"].tolist() == [2.0, 3.0, 7.0]
    assert out.owner.tolist() == [0, 0, -1, 1, 1, 2]
    assert out.source_matrix().int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    # A second merge composes: outputs 0 and 2 fuse (sizes 2 + 1), output 1 is dropped.
    again = out.merge(torch.tensor([0, -1, 0]), emb[:1], rep=torch.tensor([0]))
    assert again.sizes.tolist() == [3.0]
    assert again.owner.tolist() == [0, 0, -1, -1, -1, 0]
    assert again.scores["s"].tolist() == [pytest.approx((2.0 * 2 + 7.0) / 3)]


def test_take_and_sorted_remap_owner():
    t = grid_tokens()
    merged = t.merge(torch.tensor([2, 2, 1, 0, 0, 1]), torch.zeros(3, 2), rep=torch.tensor([4, 2, 0]))
    assert merged.index.tolist() == [4, 2, 0]
    s = merged.sorted()
    assert s.index.tolist() == [0, 2, 4]
    assert s.owner.tolist() == [0, 0, 1, 2, 2, 1]
    kept = s.take(torch.tensor([2]))
    assert kept.owner.tolist() == [-1, -1, -1, 0, 0, -1]


def test_cat_offsets_owner_and_rejects_overlap():
    t = grid_tokens()
    a = t.take(torch.tensor([0, 1, 2])).merge(torch.tensor([0, 0, 1]), torch.zeros(2, 2), rep=torch.tensor([0, 2]))
    b = t.take(torch.tensor([3, 4, 5]))
    c = VisualTokens.cat([a, b])
    assert c.owner.tolist() == [0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="same original unit twice"):
        VisualTokens.cat([a, a])


def test_identity_owner_is_lazy():
    t = grid_tokens().take(torch.tensor([1, 4]))
    assert t.owner is None
    assert t.owner_map().tolist() == [-1, 0, -1, -1, 1, -1]


@pytest.mark.parametrize(
    ("assign", "rep", "match"),
    [
        ([0, 0, 0, 0, 0], [0], "assign must have shape"),
        ([0, 0, 0, 0, 0, 3], [0], r"\[-1, 1\)"),
        ([0, 0, 0, 0, 0, 0], [6], r"\[0, 6\)"),
        ([0, 0, 0, 0, 0, 0], [0, 1], "rep must have shape"),
    ],
)
def test_merge_bad_input(assign, rep, match):
    with pytest.raises(ValueError, match=match):
        grid_tokens().merge(torch.tensor(assign), torch.zeros(1, 2), rep=torch.tensor(rep))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**16))
def test_merge_conserves_mass_and_covers_each_unit_once(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 3, generator=g)
    t = VisualTokens.from_layout(emb, [ImageLayout(offset=0, n_tokens=n, grids=((1, 1, n),))])
    assign = torch.randint(-1, k, (n,), generator=g)
    rep = torch.randint(0, n, (k,), generator=g)
    out = t.merge(assign, torch.zeros(k, 3), rep)
    # Each original unit is covered by at most one token; sizes count exactly the covered units.
    src = out.source_matrix()
    assert (src.sum(0) <= 1).all()
    assert out.sizes.tolist() == src.sum(1).float().tolist()
    assert int(out.sizes.sum()) == int((assign >= 0).sum())
    assert out.index.tolist() == rep.tolist()


def test_report_records_merge_groups():
    from vtr.ops import Pool
    from vtr.report import Report

    t = grid_tokens(4, 4)
    out = Pool(keep=4)(t)
    rep = Report()
    rep.add(sample=0, stage="pre_llm", operator="Pool", before=t, after=out, seconds=0.0)
    img = rep.records[0].images[0]
    assert img.kept == [0, 2, 8, 10]  # all four cells are equally near a 2x2 centre: lowest index
    assert img.groups == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
