"""ATS functional cores (vtr.ops.ats): spec golden cases, properties, a dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.ops.ats import ats_scores, inverse_transform_sample


def its(values: list[float], n_samples: int) -> list[int]:
    return inverse_transform_sample(torch.tensor(values), n_samples).tolist()


def dense_reference(scores: torch.Tensor, n_samples: int) -> list[int]:
    """The spec's steps with a dense |y - c_hat| matrix and a plain first-argmin loop (fp32 like the core)."""
    s = scores.float()
    n = len(s)
    if n <= 1:
        return list(range(n))
    s = s / s.sum() if float(s.sum()) > 0 else torch.full((n,), 1.0 / n)
    order = sorted(range(n), key=lambda i: (float(s[i]), i))
    c = torch.cumsum(s[order], dim=0)
    c = (c - c[0]) / (c[-1] - c[0])
    y0 = min(float(v) for v in c if v > 0)
    if n_samples == 1:
        ys = torch.ones(1)
    else:
        grid = torch.linspace(0.0, 1.0, n_samples)
        ys = y0 + (grid * (n_samples - 1) - y0 * torch.arange(n_samples, dtype=torch.float32)) / (n_samples - 1)
    picks = set()
    for y in ys:
        dist = (y - c).abs().tolist()
        picks.add(dist.index(min(dist)))  # list.index: the first minimum
    return sorted(order[p] for p in picks)


# ---------------------------------------------------------------- golden cases (spec section 9)


def test_golden_cases():
    assert its([0.1, 0.2, 0.3, 0.4], 3) == [1, 2, 3]  # the lowest token is dropped
    assert its([0.4, 0.1, 0.3, 0.2], 3) == [0, 2, 3]  # mapped back to original indices
    assert its([0.025, 0.025, 0.025, 0.025, 0.9], 4) == [1, 3, 4]  # peaked: 3 kept
    assert its([0.2] * 5, 4) == [1, 2, 3, 4]  # uniform: 4 kept


def test_count_rises_with_temperature():
    z = torch.randn(196, generator=torch.Generator().manual_seed(0))
    counts = [len(inverse_transform_sample((z / tau).softmax(0), 196)) for tau in (0.1, 0.3, 1.0, 3.0, 10.0)]
    assert counts == sorted(counts) and counts[-1] > 5 * counts[0], counts


def test_edge_cases():
    assert its([], 3) == [] and inverse_transform_sample(torch.zeros(0), 3).dtype == torch.long
    assert its([5.0], 3) == [0] and its([0.0], 1) == [0]
    assert its([0.0, 0.0, 0.0, 0.0], 3) == its([1.0, 1.0, 1.0, 1.0], 3) == [1, 2, 3]  # all-zero = uniform
    assert its([0.3, 0.1, 0.6], 1) == [2]  # one sample: y = [1], the top token
    assert its([0.0, 0.0, 3.0, 0.0], 50) == [2]  # zeros are never kept


def test_fp16_and_bf16_scores_use_fp32_maths():
    s = torch.rand(100, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        low = s.to(dtype)
        assert torch.equal(inverse_transform_sample(low, 100), inverse_transform_sample(low.float(), 100))


# ---------------------------------------------------------------- properties


score_lists = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-4, 1e3, allow_nan=False, allow_infinity=False)), min_size=0, max_size=60
)


@settings(max_examples=150, deadline=None)
@given(score_lists, st.integers(1, 80))
def test_properties(values, n_samples):
    scores = torch.tensor(values, dtype=torch.float32)
    out = inverse_transform_sample(scores, n_samples)
    kept = out.tolist()
    n = len(values)
    assert out.dtype == torch.long
    assert kept == sorted(set(kept))  # unique, ascending original indices
    assert len(kept) <= (min(n_samples, n - 1) if n >= 2 else n)
    assert kept == dense_reference(scores, n_samples)
    if n >= 2 and any(values):
        assert not any(values[i] == 0 for i in kept)  # zero scores are never kept
        assert any(values[i] == max(values) for i in kept)  # a top-score token always is
        lowest = min(range(n), key=lambda i: (values[i], i))  # first in the stable ascending order
        assert lowest not in kept
    # Scaling by a power of two is exact in fp32, so the result must not change.
    for c in (2.0**-10, 0.5, 8.0):
        assert torch.equal(inverse_transform_sample(scores * c, n_samples), out)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 300), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_random_scores_match_dense_reference_and_scaling(n, seed, c):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed)) ** 3
    out = inverse_transform_sample(scores, n)
    assert out.tolist() == dense_reference(scores, n)
    assert len(out) <= n - 1
    # Any positive scale: continuous random scores are never at a rounding-sensitive tie.
    assert torch.equal(inverse_transform_sample(scores * c, n), out)


# ---------------------------------------------------------------- scores


def test_ats_scores():
    attn = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    norms = torch.tensor([[2.0, 4.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float16)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    out = ats_scores(attn, norms, valid)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0], [0.1, 0.2, 0.7]]))
    assert inverse_transform_sample(out[0], 3).tolist() == [0, 1]  # the padded token (score 0) is never kept


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="n_samples must be >= 1, got 0"):
        inverse_transform_sample(torch.ones(4), 0)
    with pytest.raises(TypeError, match=r"n_samples must be an int, got 2.0"):
        inverse_transform_sample(torch.ones(4), 2.0)
    with pytest.raises(ValueError, match="non-negative, got minimum -0.5"):
        inverse_transform_sample(torch.tensor([1.0, -0.5]), 2)
    with pytest.raises(ValueError, match="finite, got nan"):
        inverse_transform_sample(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"1-D float tensor \[N\], got torch.float32 tensor of shape \(2, 2\)"):
        inverse_transform_sample(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="torch.int64"):
        inverse_transform_sample(torch.ones(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"same shape, got \(3,\) and \(4,\)"):
        ats_scores(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        ats_scores(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        ats_scores(torch.tensor([-1.0]), torch.ones(1))
