"""Triton kernels of ``vtr.kernels`` and their launchers.

Imported lazily by :mod:`vtr.kernels.dispatch` (Triton reads ``TRITON_INTERPRET`` at decoration time).
All dot products are fp32 with ``input_precision="ieee"``: TF32 perturbs similarities by ~1e-3 relative,
enough to flip greedy and argmax picks (notes/transformers-5.md, "Exactness of kernels"). The max-min kernel
runs on unit vectors produced by the same torch ``normalise`` as its fallback; the best-match kernel (ToMe)
on the same ``unit_rows`` (input dtype, no norm floor) as its fallback, rounding each fp32 similarity to the
input dtype as torch's matmul does. The only difference to the fallbacks is the summation order of the dot
products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vtr.kernels.dispatch import interpreter_enabled
from vtr.kernels.torch_impl import EPS, normalise, unit_rows

__all__ = [
    "INTERPRETED",
    "MAX_DIST_BYTES",
    "bipartite_best_match",
    "cosine_similarity",
    "maxmin_greedy",
    "maxmin_prepare",
    "maxmin_select",
]

#: Decoration mode of this module's kernels (checked by the dispatcher before reuse).
INTERPRETED = interpreter_enabled()
#: The max-min kernel stores the fp32 M x M distance matrix when it fits in this many bytes (M <= 16384);
#: above, every greedy step recomputes its distance row from the unit vectors instead.
MAX_DIST_BYTES = 1 << 30

# The interpreter maps tl.dot to numpy BLAS, whose rounding depends on the output position, so identical
# rows would not tie exactly; it uses a position-independent multiply-and-sum instead. On the GPU the fp32
# "ieee" dot is a per-element FMA chain in k order, which is position-independent already.
_USE_DOT = not INTERPRETED
_BM, _BN, _BK = 32, 32, 32  # tile sizes of the similarity kernels (tl.dot needs >= 16)
_GREEDY_BLOCK = 1024  # columns per iteration of the single-program greedy kernel
_GREEDY_BK = 32
#: Rounding of the best-match similarities to the input dtype (torch's matmul output dtype).
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _mm(x, y, acc, USE_DOT: tl.constexpr):
    """acc + x @ y^T for fp32 tiles x [BM, BK], y [BN, BK] with full fp32 products."""
    if USE_DOT:
        return tl.dot(x, tl.trans(y), acc, input_precision="ieee")
    return acc + tl.sum(x[:, None, :] * y[None, :, :], axis=2)


@triton.jit
def _cosine_kernel(
    a_ptr, b_ptr, out_ptr, M, N, D,
    s_ab, s_am, s_ad, s_bb, s_bn, s_bd, s_ob, s_om, s_on,
    eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    """out[b, i, j] = <a_i, b_j> / (max(|a_i|, eps) max(|b_j|, eps)); one [BM, BN] tile per program."""
    pid_m, pid_n, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    a_base = a_ptr + pid_b.to(tl.int64) * s_ab
    b_base = b_ptr + pid_b.to(tl.int64) * s_bb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    na = tl.zeros((BM,), dtype=tl.float32)
    nb = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        at = tl.load(
            a_base + rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ad,
            mask=(rows[:, None] < M) & (ks[None, :] < D), other=0.0,
        ).to(tl.float32)  # fmt: skip
        bt = tl.load(
            b_base + cols[:, None].to(tl.int64) * s_bn + ks[None, :] * s_bd,
            mask=(cols[:, None] < N) & (ks[None, :] < D), other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc = _mm(at, bt, acc, USE_DOT)
        # Norms are accumulated in the same pass: the inputs are read once.
        na += tl.sum(at * at, axis=1)
        nb += tl.sum(bt * bt, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(na), eps)
    inv_b = 1.0 / tl.maximum(tl.sqrt(nb), eps)
    out = acc * inv_a[:, None] * inv_b[None, :]
    o_ptrs = out_ptr + pid_b.to(tl.int64) * s_ob + rows[:, None].to(tl.int64) * s_om + cols[None, :] * s_on
    tl.store(o_ptrs, out, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _dot_tile(x_ptr, y_ptr, rows, cols, n_rows, n_cols, D, s_x, s_y, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, USE_DOT: tl.constexpr):  # fmt: skip
    """[BM, BN] fp32 tile of x[rows] @ y[cols]^T for row-major x, y of one float dtype (row strides s_x, s_y)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_x + ks[None, :],
                     mask=(rows[:, None] < n_rows) & (ks[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
        yt = tl.load(y_ptr + cols[:, None].to(tl.int64) * s_y + ks[None, :],
                     mask=(cols[:, None] < n_cols) & (ks[None, :] < D), other=0.0).to(tl.float32)  # fmt: skip
        acc = _mm(xt, yt, acc, USE_DOT)
    return acc


@triton.jit
def _best_match_kernel(
    ua_ptr, ub_ptr, am_ptr, bm_ptr, val_ptr, idx_ptr, Na, Nb, D,
    s_ab, s_am, s_bb, s_bn,
    HAS_AMASK: tl.constexpr, HAS_BMASK: tl.constexpr, ROUND: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    """Row max / first argmax of ua[b] @ ub[b]^T for BM rows, streaming over column tiles.

    ROUND: 0 keeps the fp32 products; 1 / 2 round each similarity to fp16 / bf16 (the input dtype) before
    comparing, as torch's matmul does. NaN (a zero input row) behaves as in ``torch.max``: it wins, and the
    index is the first NaN column.
    """
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ua = ua_ptr + pid_b.to(tl.int64) * s_ab
    ub = ub_ptr + pid_b.to(tl.int64) * s_bb
    best = tl.full((BM,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BM,), dtype=tl.int32)
    best_nan = tl.zeros((BM,), dtype=tl.int1)
    for n0 in range(0, Nb, BN):
        cols = n0 + tl.arange(0, BN)
        s = _dot_tile(ua, ub, rows, cols, Na, Nb, D, s_am, s_bn, BM, BN, BK, USE_DOT)
        if ROUND == 1:
            s = s.to(tl.float16).to(tl.float32)
        if ROUND == 2:
            # Round to nearest even by bit arithmetic: the interpreter's bf16 cast truncates, so a cast would
            # not be exact there. Finite values only; NaN (handled below) is kept as it is.
            u = s.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            s = tl.where(s == s, u.to(tl.float32, bitcast=True), s)
        ok = cols < Nb
        if HAS_BMASK:
            ok = ok & (tl.load(bm_ptr + pid_b * Nb + cols, mask=cols < Nb, other=0) != 0)
        s = tl.where(ok[None, :], s, float("-inf"))
        is_nan = s != s
        nan_idx = tl.min(tl.where(is_nan, cols[None, :], 2147483647), axis=1)
        s = tl.where(is_nan, float("-inf"), s)
        t_max = tl.max(s, axis=1)
        # First column reaching the tile max: ties go to the lowest index.
        t_idx = tl.min(tl.where(s == t_max[:, None], cols[None, :], 2147483647), axis=1)
        # Strict '>' keeps the earlier tile on ties across tiles; the first NaN seen sticks.
        tile_nan = nan_idx < 2147483647
        take_nan = tile_nan & (~best_nan)
        better = (t_max > best) & (~best_nan) & (~tile_nan)
        best_idx = tl.where(take_nan, nan_idx, tl.where(better, t_idx, best_idx))
        best = tl.where(better, t_max, best)
        best_nan = best_nan | tile_nan
    best = tl.where(best_nan, float("nan"), best)
    if HAS_AMASK:
        keep = tl.load(am_ptr + pid_b * Na + rows, mask=rows < Na, other=0) != 0
        best = tl.where(keep, best, float("-inf"))
        best_idx = tl.where(keep, best_idx, 0)
    out = pid_b * Na + rows
    tl.store(val_ptr + out, best, mask=rows < Na)
    tl.store(idx_ptr + out, best_idx, mask=rows < Na)


@triton.jit
def _nn_kernel(u_ptr, dist_ptr, nn_ptr, M, D, s_u, s_dist, WRITE_DIST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr):  # fmt: skip
    """Nearest-neighbour cosine distance (self excluded) of BM rows; optionally store their distance rows."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    nn = tl.full((BM,), float("inf"), tl.float32)
    for n0 in range(0, M, BN):
        cols = n0 + tl.arange(0, BN)
        d = tl.maximum(1.0 - _dot_tile(u_ptr, u_ptr, rows, cols, M, M, D, s_u, s_u, BM, BN, BK, USE_DOT), 0.0)
        if WRITE_DIST:
            tl.store(dist_ptr + rows[:, None].to(tl.int64) * s_dist + cols[None, :], d,
                     mask=(rows[:, None] < M) & (cols[None, :] < M))  # fmt: skip
        excluded = (rows[:, None] == cols[None, :]) | (cols[None, :] >= M)
        nn = tl.minimum(nn, tl.min(tl.where(excluded, float("inf"), d), axis=1))
    tl.store(nn_ptr + rows, nn, mask=rows < M)


@triton.jit
def _first_argmax(ptr, M, BLOCK: tl.constexpr):
    """Index of the first maximum of ptr[0:M] (fp32)."""
    best = float("-inf")
    best_idx = 0
    for start in range(0, M, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + offs, mask=offs < M, other=float("-inf"))
        b_max = tl.max(v, axis=0)
        b_idx = tl.min(tl.where((v == b_max) & (offs < M), offs, 2147483647), axis=0)
        if b_max > best:
            best = b_max
            best_idx = b_idx
    return best_idx


@triton.jit
def _greedy_kernel(u_ptr, dist_ptr, nn_ptr, mind_ptr, sel_ptr, M, D, K, s_u, s_dist,
                   HAS_DIST: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Seed (first argmax of nn) plus K-1 farthest-point steps, all in ONE program.

    mind_ptr: [M] fp32 scratch initialised to +inf; sel_ptr: [K] int32 picks in pick order.
    """
    cur = _first_argmax(nn_ptr, M, BLOCK)
    for i in range(0, K):
        tl.store(sel_ptr + i, cur)
        best = float("-inf")
        best_idx = 0
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < M
            if HAS_DIST:
                row = tl.load(dist_ptr + cur.to(tl.int64) * s_dist + offs, mask=valid, other=0.0)
            else:
                acc = tl.zeros((BLOCK,), dtype=tl.float32)
                for k0 in range(0, D, BK):
                    ks = k0 + tl.arange(0, BK)
                    us = tl.load(u_ptr + cur.to(tl.int64) * s_u + ks, mask=ks < D, other=0.0)
                    ut = tl.load(u_ptr + offs[:, None].to(tl.int64) * s_u + ks[None, :],
                                 mask=valid[:, None] & (ks[None, :] < D), other=0.0)  # fmt: skip
                    acc += tl.sum(ut * us[None, :], axis=1)
                row = tl.maximum(1.0 - acc, 0.0)
            m = tl.minimum(tl.load(mind_ptr + offs, mask=valid, other=float("-inf")), row)
            # Selected tokens are masked to -inf and min() keeps them there: never re-picked.
            m = tl.where((offs == cur) | (~valid), float("-inf"), m)
            tl.store(mind_ptr + offs, m, mask=valid)
            b_max = tl.max(m, axis=0)
            b_idx = tl.min(tl.where(m == b_max, offs, 2147483647), axis=0)
            if b_max > best:
                best = b_max
                best_idx = b_idx
        # The next step re-reads mind written by other threads of this program.
        tl.debug_barrier()
        cur = best_idx


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """``[B, M, D] x [B, N, D] -> [B, M, N]`` fp32 cosine similarity (one launch)."""
    bsz, m, d = a.shape
    n = b.shape[1]
    out = torch.empty(bsz, m, n, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, _BM), triton.cdiv(n, _BN), bsz)
    _cosine_kernel[grid](
        a, b, out, m, n, d, *a.stride(), *b.stride(), *out.stride(), EPS, BM=_BM, BN=_BN, BK=_BK, USE_DOT=_USE_DOT
    )
    return out


def bipartite_best_match(a: Tensor, b: Tensor, a_mask: Tensor | None, b_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``[B, Na, D] x [B, Nb, D] -> (values [B, Na] in the input dtype, indices [B, Na] int64)``, no Na x Nb
    matrix. Same semantics as :func:`vtr.kernels.torch_impl.bipartite_best_match_torch`: unit rows in the input
    dtype without a norm floor, fp32 accumulation, each similarity rounded to the input dtype."""
    ua, ub = unit_rows(a).contiguous(), unit_rows(b).contiguous()
    bsz, na, d = ua.shape
    nb = ub.shape[1]
    values = torch.empty(bsz, na, device=a.device, dtype=torch.float32)
    indices = torch.empty(bsz, na, device=a.device, dtype=torch.int32)
    am = a_mask.to(torch.int8).contiguous() if a_mask is not None else values  # dummy pointer when unused
    bm = b_mask.to(torch.int8).contiguous() if b_mask is not None else values
    _best_match_kernel[(triton.cdiv(na, _BM), bsz)](
        ua, ub, am, bm, values, indices, na, nb, d, ua.stride(0), ua.stride(1), ub.stride(0), ub.stride(1),
        HAS_AMASK=a_mask is not None, HAS_BMASK=b_mask is not None, ROUND=_ROUND[a.dtype],
        BM=_BM, BN=_BN, BK=_BK, USE_DOT=_USE_DOT,
    )  # fmt: skip
    # Exact: the values were already rounded to the input dtype inside the kernel.
    return values.to(a.dtype), indices.long()


def maxmin_select(x: Tensor, k: int) -> Tensor:
    """DivPrune max-min selection for validated ``x [M, D]`` and ``1 <= k < M``: ``[k]`` ascending int64.

    Three launches whatever ``k`` (besides the torch normalisation and scratch buffers): nearest-neighbour
    distances (and the distance matrix when it fits in ``MAX_DIST_BYTES``), the single-program greedy loop,
    and the final sort.
    """
    return maxmin_greedy(maxmin_prepare(x), k)


def maxmin_prepare(x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Similarity phase: ``(u [M, D] fp32 unit rows, dist [M, M] or dummy, nn [M], has_dist)``."""
    u = normalise(x).contiguous()
    m, d = u.shape
    has_dist = m * m * 4 <= MAX_DIST_BYTES
    dist = torch.empty(m, m, device=u.device, dtype=torch.float32) if has_dist else u  # dummy if unused
    nn = torch.empty(m, device=u.device, dtype=torch.float32)
    _nn_kernel[(triton.cdiv(m, _BM),)](
        u, dist, nn, m, d, u.stride(0), dist.stride(0),
        WRITE_DIST=has_dist, BM=_BM, BN=_BN, BK=_BK, USE_DOT=_USE_DOT,
    )  # fmt: skip
    return u, dist, nn, has_dist


def maxmin_greedy(state: tuple[Tensor, Tensor, Tensor, bool], k: int) -> Tensor:
    """Greedy phase on the output of :func:`maxmin_prepare`: seed + ``k - 1`` steps in one program."""
    u, dist, nn, has_dist = state
    m, d = u.shape
    mind = torch.full((m,), float("inf"), device=u.device, dtype=torch.float32)
    sel = torch.empty(k, device=u.device, dtype=torch.int32)
    _greedy_kernel[(1,)](
        u, dist, nn, mind, sel, m, d, k, u.stride(0), dist.stride(0),
        HAS_DIST=has_dist, BLOCK=_GREEDY_BLOCK, BK=_GREEDY_BK, num_warps=16,
    )  # fmt: skip
    return torch.sort(sel.long()).values
