"""vtr.kernels: Triton kernels (CPU interpreter) against the torch fallbacks, fallbacks against dense references.

Triton decorates its own standard library (``tl.zeros``, ``tl.sum``, ...) when ``triton`` is first imported,
reading ``TRITON_INTERPRET`` then; the interpreter cannot run kernels if that import happened without it (as
in the full suite, where other tests import triton through transformers). So the ``test_interp_*`` tests run
in-process only when Triton was (or will be) imported in interpreter mode; otherwise
``test_interpreter_tests_in_child_process`` runs them in a child pytest started with ``TRITON_INTERPRET=1``.
Our own kernel module is re-decorated by the dispatcher whenever the setting changes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr.kernels as K
from vtr.kernels.dispatch import load_triton, resolve_backend
from vtr.kernels.torch_impl import (
    bipartite_best_match_torch,
    cosine_similarity_torch,
    maxmin_select_torch,
    unit_rows,
)
from vtr.ops.divprune import DivPrune, divprune_select
from vtr.ops.tome import bipartite_soft_matching, merge_representative, merge_to, merge_wavg
from vtr.tokens import ImageLayout, VisualTokens

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _interpreter_usable() -> bool:
    """Whether Triton's standard library is decorated for the interpreter (importing it so when harmless)."""
    if "triton" not in sys.modules and (os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()):
        # Without a GPU no real Triton kernel can run in this process, so import Triton in interpreter mode
        # (the variable is restored: only the decoration of triton's standard library depends on it).
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
    return "triton" in sys.modules and _stdlib_interpreted()


def _stdlib_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.zeros, InterpretedFunction)


IN_PROCESS = _interpreter_usable()


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    """Run Triton kernels on the CPU; yields the kernel module loaded in interpreter mode."""
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: run by test_interpreter_tests_in_child_process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = load_triton()
    assert module.INTERPRETED
    return module


def test_interpreter_tests_in_child_process():
    if IN_PROCESS:
        pytest.skip("the test_interp_* tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_interp_"]
    res = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def unit_vectors(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def with_duplicates(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Copy some rows of ``x [M, D]`` over others (exact ties in every distance)."""
    m = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, m, (m // 3,), generator=gen)
    dst = torch.randint(0, m, (m // 3,), generator=gen)
    x = x.clone()
    x[dst] = x[src]
    return x


def dense_maxmin_reference(x: torch.Tensor, k: int) -> list[int]:
    """Official-style loop on a full distance matrix: recompute min over the selected set at every step."""
    m = x.shape[0]
    if k >= m:
        return list(range(m))
    u = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = (1 - u @ u.T).clamp_min(0)
    off = d + torch.diag(torch.full((m,), float("inf")))
    sel = [int(torch.argmax(off.min(dim=1).values))]
    while len(sel) < k:
        mind = d[sel].min(dim=0).values
        mind[sel] = float("-inf")  # vtr masks selected tokens
        sel.append(int(torch.argmax(mind)))
    return sorted(sel)


# ---------------------------------------------------------------- Triton (interpreter) vs torch fallback


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "d", "batch"), [(1, 1, 1, None), (5, 7, 3, None), (33, 17, 40, 2), (40, 70, 33, 1)])
def test_interp_cosine_matches_fallback(interpret, dtype, m, n, d, batch):
    shape_a = (m, d) if batch is None else (batch, m, d)
    shape_b = (n, d) if batch is None else (batch, n, d)
    a, b = rand(*shape_a, seed=1, dtype=dtype), rand(*shape_b, seed=2, dtype=dtype)
    a[..., 0, :] = 0  # zero row: similarity 0 thanks to the norm floor
    got = K.cosine_similarity(a, b, backend="triton")
    want = K.cosine_similarity(a, b, backend="torch")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert torch.all(got[..., 0, :] == 0)
    torch.testing.assert_close(
        K.cosine_similarity(a, backend="triton"), cosine_similarity_torch(a), atol=2e-6, rtol=1e-5
    )


def test_interp_cosine_strided_input(interpret):
    a = rand(20, 48, seed=3)[:, ::2]  # non-contiguous view [20, 24]
    b = rand(24, 9, seed=4).T
    torch.testing.assert_close(
        K.cosine_similarity(a, b, backend="triton"), cosine_similarity_torch(a, b), atol=2e-6, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("na", "nb", "d", "batch"), [(1, 1, 4, None), (9, 1, 5, None), (31, 45, 20, 2), (50, 17, 64, 1)]
)
def test_interp_best_match_matches_fallback(interpret, dtype, na, nb, d, batch):
    shape_a = (na, d) if batch is None else (batch, na, d)
    shape_b = (nb, d) if batch is None else (batch, nb, d)
    a, b = rand(*shape_a, seed=5, dtype=dtype), rand(*shape_b, seed=6, dtype=dtype)
    if nb > 3:
        b[..., nb - 1, :] = b[..., 1, :]  # duplicate column in another tile: ties go to the lowest index
    v1, i1 = K.bipartite_best_match(a, b, backend="triton")
    v2, i2 = K.bipartite_best_match(a, b, backend="torch")
    assert torch.equal(i1, i2) and i1.dtype == torch.long
    assert v1.dtype == v2.dtype == dtype  # similarities are values of the input dtype (ToMe semantics)
    if dtype == torch.float32:
        torch.testing.assert_close(v1, v2, atol=2e-6, rtol=1e-5)  # fp32 sums in another order
    else:
        assert torch.equal(v1, v2)  # both round the fp32 sum to the input dtype (round to nearest even)
    if nb > 3:
        assert not torch.any(i1 == nb - 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_best_match_zero_rows_are_nan_like_torch_max(interpret, dtype):
    # No norm floor (official ToMe): a zero row is NaN; torch.max makes NaN win at its first column.
    a, b = rand(1, 40, 8, seed=17, dtype=dtype), rand(1, 40, 8, seed=18, dtype=dtype)
    a[0, 3] = 0
    b[0, 35] = 0
    b[0, 36] = 0
    a_mask = torch.ones(1, 40, dtype=torch.bool)
    a_mask[0, 5] = False  # a masked row is -inf / 0 even when it contains NaN
    v1, i1 = K.bipartite_best_match(a, b, backend="triton", a_mask=a_mask)
    v2, i2 = K.bipartite_best_match(a, b, backend="torch", a_mask=a_mask)
    assert torch.equal(i1, i2)
    assert torch.equal(v1.isnan(), v2.isnan()) and torch.equal(v1[~v1.isnan()], v2[~v2.isnan()])
    assert bool(v1[0, :5].isnan().all()) and i1[0, :5].tolist() == [35, 35, 35, 0, 35]
    assert v1[0, 5] == float("-inf") and int(i1[0, 5]) == 0


def test_interp_bf16_rounding_is_round_to_nearest_even(interpret):
    # The interpreter's own bf16 cast truncates; the kernel rounds by bit arithmetic like torch's matmul.
    a, b = rand(3, 64, 24, seed=19, dtype=torch.bfloat16), rand(3, 48, 24, seed=20, dtype=torch.bfloat16)
    values, _ = K.bipartite_best_match(a, b, backend="triton")
    ua, ub = unit_rows(a).float(), unit_rows(b).float()
    want = (ua @ ub.transpose(-1, -2)).to(torch.bfloat16).max(dim=-1).values
    assert torch.equal(values, want)


def test_interp_best_match_masks_class_and_distill(interpret):
    a, b = rand(2, 13, 8, seed=7), rand(2, 12, 8, seed=8)
    a_mask = torch.ones(2, 13, dtype=torch.bool)
    a_mask[:, 0] = False  # ToMe class_token: row 0 is never a source
    b_mask = torch.ones(2, 12, dtype=torch.bool)
    b_mask[:, 0] = False  # ToMe distill_token: nothing merges into column 0
    b_mask[1, :] = False  # a fully masked sample: -inf, index 0
    v1, i1 = K.bipartite_best_match(a, b, backend="triton", a_mask=a_mask, b_mask=b_mask)
    v2, i2 = K.bipartite_best_match(a, b, backend="torch", a_mask=a_mask, b_mask=b_mask)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2, atol=2e-6, rtol=1e-5)
    assert torch.all(v1[:, 0] == float("-inf")) and torch.all(i1[:, 0] == 0)
    assert torch.all(i1[0, 1:] != 0)  # column 0 is masked for the sample that has other columns
    assert torch.all(v1[1] == float("-inf")) and torch.all(i1[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("cls", "dist"), [(False, False), (True, False), (True, True)])
def test_interp_tome_core_triton_backend(interpret, dtype, cls, dist):
    # vtr.ops.tome on the fused kernel equals its default torch path (same semantics, same rounding).
    metric, x = rand(2, 77, 24, seed=21, dtype=dtype), rand(2, 77, 6, seed=22, dtype=dtype)
    outs = []
    for backend in ("triton", "torch"):
        merge, unmerge = bipartite_soft_matching(metric, 20, cls, dist, backend=backend)
        merged, size = merge_wavg(merge, x)
        outs.append((merged, size, unmerge(merged), merge_representative(merge, torch.arange(77).expand(2, 77))))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)
    got = merge_to(metric[0], 9, backend="triton")
    for a, b in zip(got, merge_to(metric[0], 9, backend="torch"), strict=True):
        assert torch.equal(a, b)


CASES = [  # (M, D, ks): non-powers of two, M < tile size, K = 1, K = M - 1, K = M, K > M
    (2, 3, [1, 2]),
    (3, 1, [1, 2, 3]),
    (17, 5, [1, 4, 16, 17, 20]),
    (45, 33, [1, 7, 44]),
    (70, 40, [1, 23, 69]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "d", "ks"), CASES)
def test_interp_maxmin_matches_fallback(interpret, dtype, m, d, ks):
    x = rand(m, d, seed=m * 100 + d, dtype=dtype)
    for k in ks:
        got = K.maxmin_select(x, k, backend="triton")
        assert torch.equal(got, maxmin_select_torch(x, k)), (m, d, k)
        assert got.dtype == torch.long


@pytest.mark.parametrize("dist", [True, False], ids=["stored-dist", "recomputed-rows"])
def test_interp_maxmin_duplicates_and_blocks(interpret, monkeypatch, dist):
    # Small greedy blocks so ties and argmax cross block boundaries; both distance-row paths.
    monkeypatch.setattr(interpret, "_GREEDY_BLOCK", 16)
    monkeypatch.setattr(interpret, "_GREEDY_BK", 16)
    if not dist:
        monkeypatch.setattr(interpret, "MAX_DIST_BYTES", 0)
    x = with_duplicates(rand(53, 20, seed=9), seed=1)
    x[5] = 0  # zero row: distance 1 to everything
    for k in (1, 10, 40, 52):
        got = K.maxmin_select(x, k, backend="triton")
        assert torch.equal(got, maxmin_select_torch(x, k)), k
        assert len(set(got.tolist())) == k
    # 1-D features: every unit vector is exactly +-1, so nearly every comparison is an exact tie.
    signs = torch.tensor([[1.0], [-2.0], [3.0], [4.0], [-1.0], [0.0]] * 5)
    for k in (1, 2, 3, 4, 29):
        assert torch.equal(K.maxmin_select(signs, k, backend="triton"), maxmin_select_torch(signs, k)), k


def test_interp_maxmin_golden(interpret):
    x = unit_vectors([0, 10, 90, 180])
    assert K.maxmin_select(x, 1, backend="triton").tolist() == [3]
    assert K.maxmin_select(x, 2, backend="triton").tolist() == [0, 3]
    assert K.maxmin_select(x, 3, backend="triton").tolist() == [0, 2, 3]
    assert K.maxmin_select(x, 4, backend="triton").tolist() == [0, 1, 2, 3]


def test_interp_divprune_operator_triton_backend(interpret):
    x = rand(40, 16, seed=10)
    tokens = VisualTokens.from_layout(x, [ImageLayout(offset=0, n_tokens=40, grids=((1, 5, 8),))])
    out_triton = DivPrune(keep=9, backend="triton")(tokens)
    out_torch = DivPrune(keep=9, backend="torch")(tokens)
    assert torch.equal(out_triton.index, out_torch.index)
    assert out_triton.index.tolist() == divprune_select(x, 9).tolist()


# ---------------------------------------------------------------- dispatch and validation


def test_auto_dispatch_picks_torch_on_cpu(monkeypatch):
    x = rand(10, 4)
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x) == "torch"  # the interpreter is only used when asked for
    assert resolve_backend("triton", x) == "triton"
    assert resolve_backend("torch", x) == "torch"


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None])
def test_bad_backend_names_value_and_choices(bad):
    x = rand(6, 4)
    calls = [
        lambda: K.cosine_similarity(x, backend=bad),
        lambda: K.bipartite_best_match(x, x, backend=bad),
        lambda: K.maxmin_select(x, 2, backend=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)") as err:
            call()
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="backend must be one of") as err:
        DivPrune(keep=2, backend=bad)
    assert repr(bad) in str(err.value)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = rand(6, 4)
    for call in (
        lambda: K.cosine_similarity(x, backend="triton"),
        lambda: K.bipartite_best_match(x, x, backend="triton"),
        lambda: K.maxmin_select(x, 2, backend="triton"),
        lambda: DivPrune(keep=2, backend="triton")(
            VisualTokens.from_layout(x, [ImageLayout(offset=0, n_tokens=6, grids=((1, 2, 3),))])
        ),
    ):
        with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
            call()


def test_maxmin_validation():
    x = rand(5, 3)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            K.maxmin_select(x, k)
    for k in (2.0, True, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            K.maxmin_select(x, k)
    with pytest.raises(ValueError, match="2-D"):
        K.maxmin_select(x[None], 2)
    assert K.maxmin_select(x, 5).tolist() == [0, 1, 2, 3, 4]
    assert K.maxmin_select(x, 9).tolist() == [0, 1, 2, 3, 4]
    empty = K.maxmin_select(torch.empty(0, 3), 1)
    assert empty.dtype == torch.long and empty.numel() == 0


def test_similarity_input_validation():
    x = rand(5, 3)
    with pytest.raises(ValueError, match="share rank"):
        K.cosine_similarity(x, rand(5, 4))
    with pytest.raises(ValueError, match="share rank"):
        K.bipartite_best_match(x[None], rand(2, 5, 3))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        K.cosine_similarity(x.double())
    with pytest.raises(ValueError, match="b_mask must be a bool tensor of shape"):
        K.bipartite_best_match(x, x, b_mask=torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------- fallbacks vs plain dense references


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_fallback_matches_dense_reference(dtype):
    a, b = rand(3, 11, 7, seed=11, dtype=dtype), rand(3, 5, 7, seed=12, dtype=dtype)
    a64, b64 = a.double(), b.double()
    ref = torch.einsum("bmd,bnd->bmn", a64, b64) / (a64.norm(dim=-1)[..., :, None] * b64.norm(dim=-1)[..., None, :])
    got = K.cosine_similarity(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    na=st.integers(1, 12),
    nb=st.integers(1, 12),
    d=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    mask_col0=st.booleans(),
)
def test_best_match_fallback_matches_dense_reference(na, nb, d, seed, mask_col0):
    a = torch.randint(-3, 4, (na, d), generator=torch.Generator().manual_seed(seed)).float()
    b = torch.randint(-3, 4, (nb, d), generator=torch.Generator().manual_seed(seed + 1)).float()
    # No zero rows here (those are NaN, tested separately).
    a = torch.where(a.abs().sum(dim=1, keepdim=True) == 0, torch.ones_like(a), a)
    b = torch.where(b.abs().sum(dim=1, keepdim=True) == 0, torch.ones_like(b), b)
    b_mask = torch.ones(nb, dtype=torch.bool)
    b_mask[0] = not mask_col0
    values, indices = K.bipartite_best_match(a, b, b_mask=b_mask)
    # The fallback batches 2-D inputs; the same batched product gives the same fp32 numbers (exact ties).
    sim = unit_rows(a[None]) @ unit_rows(b[None]).transpose(-1, -2)
    for i in range(na):
        row = [float(sim[0, i, j]) if b_mask[j] else float("-inf") for j in range(nb)]
        best = max(row)
        assert float(values[i]) == best
        assert int(indices[i]) == row.index(best)  # first maximum


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 14),
    d=st.integers(1, 4),
    k=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_maxmin_fallback_matches_naive_loop(m, d, k, seed):
    # Small integer features: many exact duplicates and ties exercise masking and first-argmax.
    x = torch.randint(-2, 3, (m, d), generator=torch.Generator().manual_seed(seed)).float()
    got = maxmin_select_torch(x, k).tolist()
    assert got == dense_maxmin_reference(x, k)
    assert got == sorted(set(got)) and len(got) == min(k, m)


def test_maxmin_fallback_blocked_path_equals_dense():
    x = rand(300, 8, seed=13)
    for k in (1, 25, 120):
        dense = maxmin_select_torch(x, k)
        assert torch.equal(maxmin_select_torch(x, k, dense_max=16, block_rows=37), dense)
        assert dense.tolist() == dense_maxmin_reference(x, k)


def test_maxmin_fallback_golden_and_wrapper():
    x = unit_vectors([0, 10, 90, 180])
    for fn in (lambda k: maxmin_select_torch(x, k), lambda k: divprune_select(x, k), lambda k: K.maxmin_select(x, k)):
        assert fn(1).tolist() == [3]
        assert fn(2).tolist() == [0, 3]
        assert fn(3).tolist() == [0, 2, 3]
        assert fn(4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        divprune_select(x, 0)


def test_maxmin_fallback_fp16_equals_fp32_values():
    x = rand(64, 16, seed=14).half()
    assert torch.equal(maxmin_select_torch(x, 10), maxmin_select_torch(x.float(), 10))


@pytest.mark.parametrize("dtype", DTYPES)
def test_best_match_fallback_is_the_official_tome_arithmetic(dtype):
    # Official ToMe: normalise the whole metric in its dtype (no eps), split alternately, matmul in the dtype.
    metric = rand(2, 23, 6, seed=15, dtype=dtype)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[..., ::2, :] @ m[..., 1::2, :].transpose(-1, -2)
    values, indices = bipartite_best_match_torch(metric[:, ::2], metric[:, 1::2])
    assert values.dtype == dtype
    assert torch.equal(values, scores.max(dim=-1).values) and torch.equal(indices, scores.max(dim=-1).indices)


def test_best_match_dtype_mismatch_is_an_error():
    with pytest.raises(TypeError, match="same dtype"):
        K.bipartite_best_match(rand(4, 3), rand(5, 3, dtype=torch.float16))
