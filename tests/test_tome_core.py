"""ToMe functional cores (vtr.ops.tome): spec golden cases, properties, an independent loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.tome import (
    bipartite_soft_matching,
    merge_representative,
    merge_source,
    merge_to,
    merge_wavg,
    parse_r,
    schedule_for_keep,
)

HAND_METRIC = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]])
HAND_X = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.flatten()]


# ---------------------------------------------------------------- golden cases (spec section 9)


def test_hand_case():
    merge, unmerge = bipartite_soft_matching(HAND_METRIC, 1)
    x, size = merge_wavg(merge, HAND_X)
    assert flat(x) == [5.0, 2.0, 7.0]
    assert flat(size) == [1.0, 2.0, 1.0]
    assert flat(unmerge(torch.tensor([[[5.0], [2.0], [7.0]]]))) == [2.0, 2.0, 5.0, 7.0]
    assert merge_representative(merge, torch.arange(4)[None]).tolist() == [[2, 1, 3]]  # 0 merged into 1
    assert merge_source(merge, HAND_X)[0].tolist() == [[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]


def test_hand_case_with_class_token():
    merge, _ = bipartite_soft_matching(HAND_METRIC, 1, class_token=True)
    x, size = merge_wavg(merge, HAND_X)
    assert flat(x) == [1.0, 4.0, 7.0]  # CLS first, 2 merged into 1
    assert flat(size) == [1.0, 2.0, 1.0]
    assert merge_representative(merge, torch.arange(4)[None]).tolist() == [[0, 1, 3]]


@pytest.mark.parametrize("r", [0, -1, -50])
def test_nonpositive_r_is_the_identity(r):
    x = rand(2, 9, 3, seed=0)
    merge, unmerge = bipartite_soft_matching(rand(2, 9, 4, seed=1), r)
    assert merge(x) is x and unmerge(x) is x
    out, size = merge_wavg(merge, x)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1, dtype=x.dtype))
    assert merge_representative(merge, torch.arange(9).expand(2, 9)).tolist() == [list(range(9))] * 2


@pytest.mark.parametrize(
    ("n", "cls", "merged"), [(10, False, 5), (11, True, 5), (10, True, 4), (3, True, 1), (2, True, 0)]
)
def test_r_is_capped_at_half_of_the_unprotected_tokens(n, cls, merged):
    merge, _ = bipartite_soft_matching(rand(1, n, 4, seed=n), 100, class_token=cls)
    assert merge(rand(1, n, 2, seed=3)).shape == (1, n - merged, 2)


def test_class_token_stays_first_and_unmerged():
    metric = rand(3, 21, 6, seed=4)
    metric[:, 0] = metric[:, 2]  # CLS identical to an A token and to nothing else: still never a source
    x = torch.arange(21, dtype=torch.float64)[None, :, None].expand(3, 21, 1)
    merge, _ = bipartite_soft_matching(metric, 10, class_token=True)
    out, size = merge_wavg(merge, x)
    assert torch.all(out[:, 0, 0] == 0) and torch.all(size[:, 0, 0] == 1)


def test_distill_token_receives_nothing_and_official_order():
    # Tokens: CLS 0, DIST 1; the official output order is [A_0, B_0, other unmerged A, other B].
    metric = rand(2, 12, 5, seed=5)
    metric[:, 3] = metric[:, 1]  # a perfect match for DIST, which must not attract it
    merge, unmerge = bipartite_soft_matching(metric, 5, class_token=True, distill_token=True)
    x = torch.arange(12, dtype=torch.float64)[None, :, None].expand(2, 12, 1)
    out, size = merge_wavg(merge, x)
    assert out.shape == (2, 7, 1)
    assert torch.all(out[:, 0, 0] == 0) and torch.all(out[:, 1, 0] == 1)
    assert torch.all(size[:, :2] == 1)
    # unmerge is the exact inverse of this order: every position gets the token it went into.
    back = unmerge(merge(x, mode="amax"))
    src = merge_source(merge, x)
    owner = src.argmax(dim=1)  # [B, N_orig] output index of each original
    assert torch.equal(back[..., 0], merge(x, mode="amax")[..., 0].gather(1, owner))


def test_unmerge_restores_each_position_from_its_token():
    metric, x = rand(2, 15, 4, seed=6), rand(2, 15, 3, seed=7)
    merge, unmerge = bipartite_soft_matching(metric, 6, class_token=True)
    merged, _ = merge_wavg(merge, x)
    owner = merge_source(merge, x).argmax(dim=1)  # [B, 15]
    assert torch.equal(unmerge(merged), merged.gather(1, owner[..., None].expand(-1, -1, 3)))


def test_parse_r_golden():
    assert parse_r(12, (8, -1)) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert parse_r(12, 13) == [13] * 12
    assert parse_r(12, [1, 2]) == [1, 2] + [0] * 10
    assert parse_r(3, [1, 2, 3, 4, 5]) == [1, 2, 3]
    assert parse_r(5, (4, 0)) == [4] * 5
    assert parse_r(5, (4, 1)) == [0, 2, 4, 6, 8]
    assert parse_r(1, 7) == [7] and parse_r(1, (7, -1)) == [7]


@pytest.mark.parametrize(("keep", "first", "last"), [(192, 17, 16), (128, 20, 19), (64, 23, 22)])
def test_keep_schedule_reaches_exactly_k_on_llava15(keep, first, last):
    # CLIP-L/336: 576 patches + CLS; blocks 0..22 feed hidden_states[-2].
    schedule = schedule_for_keep(577, keep, 23, protected=1)
    assert len(schedule) == 23 and sum(schedule) == 576 - keep
    assert schedule[0] == first and schedule[-1] == last and schedule == sorted(schedule, reverse=True)
    x = rand(1, 577, 8, seed=keep)
    for r in schedule:
        merge, _ = bipartite_soft_matching(x, r, class_token=True)
        x, _ = merge_wavg(merge, x)
    assert x.shape[1] == keep + 1


def test_keep_schedule_respects_later_caps_and_raises_when_unreachable():
    # 8 free tokens in 3 layers can reach 1 only by halving every time (8 -> 4 -> 2 -> 1).
    assert schedule_for_keep(9, 1, 3, protected=1) == [4, 2, 1]
    assert schedule_for_keep(8, 2, 3, protected=0) == [2, 2, 2]
    # The even share of layer 1 (2) would leave 5 tokens for 2 layers, which can only reach 2: it takes 3.
    assert schedule_for_keep(11, 1, 4, protected=1) == [3, 3, 2, 1]
    assert schedule_for_keep(100, 20, 3, protected=0) == [27, 33, 20]  # the even [27, 27, 26] breaks the last cap
    assert schedule_for_keep(10, 10, 4, protected=0) == [0, 0, 0, 0]
    assert schedule_for_keep(10, 50, 2, protected=0) == [0, 0]
    with pytest.raises(ValueError, match=r"keep=1 is unreachable.*at least 2 of 8"):
        schedule_for_keep(9, 1, 2, protected=1)
    with pytest.raises(ValueError, match="keep=3 is unreachable"):
        schedule_for_keep(10, 3, 0, protected=0)


# ---------------------------------------------------------------- properties


tome_cases = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 40),  # tokens
    st.integers(1, 6),  # metric dim
    st.integers(-2, 25),  # r
    st.booleans(),  # class token
    st.booleans(),  # distill token
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=80, deadline=None)
@given(tome_cases)
def test_conservation_and_coverage(case):
    bsz, n, c, r, cls, dist, seed = case
    metric, x = rand(bsz, n, c, seed=seed), rand(bsz, n, 3, seed=seed + 1)
    size0 = (torch.randint(1, 5, (bsz, n, 1), generator=torch.Generator().manual_seed(seed))).double()
    merge, _ = bipartite_soft_matching(metric, r, cls, dist)
    out, size = merge_wavg(merge, x, size0)
    expected_r = max(0, min(r, (n - cls - dist) // 2))
    assert out.shape == (bsz, n - expected_r, 3)
    torch.testing.assert_close(size.sum(dim=1), size0.sum(dim=1), rtol=0, atol=0)
    torch.testing.assert_close((out * size).sum(dim=1), (x * size0).sum(dim=1), rtol=1e-12, atol=1e-12)
    source = merge_source(merge, x)
    assert torch.all(source.sum(dim=1) == 1)  # every original covered exactly once
    # Each row of source sums to its token's number of originals (unit sizes here).
    unit_size = merge_wavg(merge, x)[1]
    assert torch.equal(source.sum(dim=2, keepdim=True), unit_size.float())
    rep = merge_representative(merge, torch.arange(n).expand(bsz, n))
    assert torch.all(source.gather(2, rep[..., None]) == 1)  # the representative lies in its token
    assert all(len(set(row)) == len(row) for row in rep.tolist())
    if cls:  # the class token is never merged: x * size / size is x up to one rounding
        torch.testing.assert_close(out[:, 0], x[:, 0], rtol=1e-15, atol=0)
        assert torch.equal(size[:, 0], size0[:, 0]) and torch.all(rep[:, 0] == 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax attention ``[Nq, d] x [Nk, d]``; proportional attention adds ``log(size)`` per key."""
    logits = q @ k.T / math.sqrt(q.shape[-1])
    if size is not None:
        logits = logits + size.log()[None, :]
    return logits.softmax(dim=-1) @ v


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_proportional_attention_equivalence(seed, copies):
    # [k1 (size 2), k2] with a log(size) key bias equals [k1, k1, k2]; here produced by merging duplicates.
    d = 6
    k1, k2, v1, v2 = rand(4, d, seed=seed).unbind(0)
    q = rand(3, d, seed=seed + 1)
    keys = torch.stack([k1, k1, k2])
    values = torch.stack([v1, v1, v2])
    merge, _ = bipartite_soft_matching(keys[None], 1)  # token 0 (A) merges into its duplicate 1 (B)
    kv, size = merge_wavg(merge, torch.cat([keys, values], dim=-1)[None])
    km, vm, sm = kv[0, :, :d], kv[0, :, d:], size[0, :, 0]
    assert sorted(sm.tolist()) == [1.0, 2.0]
    torch.testing.assert_close(attention(q, km, vm, sm), attention(q, keys, values), rtol=1e-12, atol=1e-12)
    # The same holds for any number of copies of k1 (size = copies + 1) without merging.
    many = torch.cat([k1.expand(copies + 1, d), k2[None]])
    many_v = torch.cat([v1.expand(copies + 1, d), v2[None]])
    two_v, two_k = torch.stack([v1, v2]), torch.stack([k1, k2])
    size = torch.tensor([copies + 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(attention(q, two_k, two_v, size), attention(q, many, many_v), rtol=1e-12, atol=1e-12)
    # Without the bias (or with a per-query bias, which cancels) the outputs differ.
    assert not torch.allclose(attention(q, km, vm), attention(q, keys, values))


def loop_tome_reference(metric: torch.Tensor, x: torch.Tensor, r: int, cls: bool) -> tuple[list, list]:
    """Independent single-sample ToMe step with plain Python loops: returns (tokens, sizes) in output order."""
    n = len(metric)
    protected = int(cls)
    r = min(r, (n - protected) // 2)
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))
    unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in metric.tolist()]
    best = []
    for pos, i in enumerate(a_ids):
        sims = [sum(p * q for p, q in zip(unit[i], unit[j], strict=True)) for j in b_ids]
        value = -math.inf if (cls and pos == 0) else max(sims)
        dst = 0 if (cls and pos == 0) else sims.index(max(sims))
        best.append((value, pos, dst))
    ranked = sorted(best, key=lambda t: -t[0])  # Python's sort is stable: ties keep the lower A index
    merged, kept = ranked[:r], ranked[r:]
    if cls:
        kept = sorted(kept, key=lambda t: t[1])
    rows = x.tolist()
    tokens = [rows[a_ids[pos]] for _, pos, _ in kept]
    sizes = [1.0] * len(kept)
    for bpos, j in enumerate(b_ids):
        group = [j] + [a_ids[pos] for _, pos, dst in merged if dst == bpos]
        tokens.append([sum(rows[g][c] for g in group) / len(group) for c in range(len(rows[j]))])
        sizes.append(float(len(group)))
    return tokens, sizes


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 16), st.booleans(), st.integers(0, 2**31 - 1))
def test_matches_independent_loop_reference(n, r, cls, seed):
    metric, x = rand(n, 5, seed=seed), rand(n, 3, seed=seed + 7)
    merge, _ = bipartite_soft_matching(metric[None], r, class_token=cls)
    out, size = merge_wavg(merge, x[None])
    tokens, sizes = loop_tome_reference(metric, x, r, cls)
    assert flat(size) == sizes
    torch.testing.assert_close(out[0], torch.tensor(tokens, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_stable_tie_break_goes_to_the_lower_a_index():
    # Every A token has the same best score: the lowest A indices are merged first.
    metric = torch.tensor([[[1.0, 0.0]] * 8])
    merge, _ = bipartite_soft_matching(metric, 2)
    rep = merge_representative(merge, torch.arange(8)[None])
    assert rep.tolist() == [[4, 6, 1, 3, 5, 7]]  # A tokens 0 and 2 merged (into B token 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_maths_stays_in_the_input_dtype(dtype):
    metric, x = rand(2, 30, 8, seed=8, dtype=dtype), rand(2, 30, 4, seed=9, dtype=dtype)
    merge, unmerge = bipartite_soft_matching(metric, 9, class_token=True)
    out, size = merge_wavg(merge, x)
    assert out.dtype == dtype and size.dtype == dtype and unmerge(out).dtype == dtype
    assert merge_source(merge, x).dtype == torch.float32  # the official source map is an fp32 identity
    # Official arithmetic: one normalisation of the whole metric in its dtype, then A @ B^T in that dtype.
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    order = scores.max(dim=-1).values.argsort(dim=-1, descending=True, stable=True)
    rep = merge_representative(merge, torch.arange(30).expand(2, 30))
    merged_a = {2 * int(i) for i in order[0, :9]}
    assert merged_a.isdisjoint(rep[0].tolist()) and len(merged_a) == 9


# ---------------------------------------------------------------- keep schedules


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(0, 2), st.integers(0, 30), st.integers(1, 600))
def test_keep_schedule_properties(n_free, protected, layers, keep):
    n_tokens = n_free + protected
    fewest = n_free
    for _ in range(layers):
        fewest -= fewest // 2
    if keep < min(fewest, n_free):
        with pytest.raises(ValueError, match=f"keep={keep} is unreachable"):
            schedule_for_keep(n_tokens, keep, layers, protected)
        return
    schedule = schedule_for_keep(n_tokens, keep, layers, protected)
    assert len(schedule) == layers
    d = max(0, n_free - keep)
    assert sum(schedule) == d
    free = n_free
    for r in schedule:
        assert 0 <= r <= free // 2  # ToMe's 50% cap
        free -= r
    # When the front-loaded even split fits under every cap, it is the schedule.
    if layers:
        even = [d // layers + (i < d % layers) for i in range(layers)]
        free, fits = n_free, True
        for r in even:
            fits &= r <= free // 2
            free -= r
        if fits:
            assert schedule == even


# ---------------------------------------------------------------- pre-LLM merging


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 45), st.integers(0, 2**31 - 1), st.booleans())
def test_merge_to_properties(n, k, seed, with_sizes):
    x = rand(n, 4, seed=seed)
    size0 = torch.randint(1, 4, (n,), generator=torch.Generator().manual_seed(seed)).double() if with_sizes else None
    out, size, rep, assign = merge_to(x, k, size0)
    kk = min(k, n)
    assert out.shape == (kk, 4) and size.shape == (kk,) and rep.shape == (kk,) and assign.shape == (n,)
    assert rep.tolist() == sorted(set(rep.tolist()))  # distinct originals, sorted: the LLM order
    assert torch.equal(assign[rep], torch.arange(kk))  # each representative lies inside its own token
    assert sorted(set(assign.tolist())) == list(range(kk))
    w = torch.ones(n, dtype=torch.float64) if size0 is None else size0
    mass = torch.zeros(kk, dtype=torch.float64).index_add_(0, assign, w)
    torch.testing.assert_close(size, mass, rtol=0, atol=0)
    means = torch.zeros(kk, 4, dtype=torch.float64).index_add_(0, assign, x * w[:, None]) / mass[:, None]
    torch.testing.assert_close(out, means, rtol=1e-10, atol=1e-10)  # merged tokens are weighted means


def test_merge_to_identity_batch_and_steps():
    x = rand(3, 20, 5, seed=10)
    out, size, rep, assign = merge_to(x, 20)
    assert torch.equal(out, x) and torch.all(size == 1)
    assert torch.equal(rep, torch.arange(20).expand(3, 20)) and torch.equal(assign, rep)
    out, size, rep, assign = merge_to(x, 3)
    for b in range(3):  # each sample of a batch equals its single run
        single = merge_to(x[b], 3)
        for got, want in zip((out[b], size[b], rep[b], assign[b]), single, strict=True):
            assert torch.equal(got, want)
    # 20 -> 10 -> 5 -> 3: the steps are min(N - k, N // 2).
    assert merge_to(x[0], 1)[0].shape == (1, 5)
    torch.testing.assert_close(merge_to(x[0], 1)[0][0], x[0].mean(dim=0), rtol=1e-12, atol=1e-12)


def test_merge_to_merges_near_duplicates_first():
    e = torch.eye(6, dtype=torch.float64)
    # Tokens 0/1 and 2/3 are near-copies across the A/B split; the rest are orthogonal to everything.
    x = torch.stack([e[0], e[0] + 1e-3, e[1], e[1] + 1e-3, e[2], e[3], e[4], e[5]])
    out, size, rep, assign = merge_to(x, 6)
    assert rep.tolist() == [1, 3, 4, 5, 6, 7]  # the B destinations represent the merged pairs
    assert assign.tolist() == [0, 0, 1, 1, 2, 3, 4, 5] and size.tolist() == [2, 2, 1, 1, 1, 1]
    torch.testing.assert_close(out[0], (x[0] + x[1]) / 2, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_value():
    with pytest.raises(
        ValueError, match=r"metric must be a float tensor \[B, N, C\], got torch.float32 tensor of shape \(4, 2\)"
    ):
        bipartite_soft_matching(torch.zeros(4, 2), 1)
    with pytest.raises(ValueError, match="torch.int64"):
        bipartite_soft_matching(torch.zeros(1, 4, 2, dtype=torch.long), 1)
    with pytest.raises(TypeError, match=r"r must be an int, got 1.5"):
        bipartite_soft_matching(HAND_METRIC, 1.5)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        bipartite_soft_matching(HAND_METRIC, 1, backend="gpu")
    merge, _ = bipartite_soft_matching(HAND_METRIC, 1)
    with pytest.raises(ValueError, match="rep must be an int64 tensor"):
        merge_representative(merge, torch.arange(4.0)[None])
    with pytest.raises(ValueError, match="non-negative.*-3"):
        merge_representative(merge, torch.tensor([[0, -3, 1, 2]]))
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        parse_r(0, 3)
    with pytest.raises(ValueError, match=r"inflect must be a number in \[-1, 1\], got 2"):
        parse_r(4, (3, 2))
    with pytest.raises(ValueError, match=r"\(r, inflect\), got \(1, 2, 3\)"):
        parse_r(4, (1, 2, 3))
    with pytest.raises(TypeError, match=r"r\[1\] must be an int, got 'x'"):
        parse_r(4, [1, "x"])
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        schedule_for_keep(10, 0, 3)
    with pytest.raises(ValueError, match="protected=3, n_tokens=2"):
        schedule_for_keep(2, 1, 3, protected=3)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        merge_to(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match=r"size must have shape \(3,\)"):
        merge_to(torch.zeros(3, 2), 2, torch.ones(4))
    with pytest.raises(ValueError, match="x must be a float tensor"):
        merge_to(torch.zeros(2, 3, 4, 5), 2)
