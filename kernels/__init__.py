"""vtr.kernels: Triton kernels with exact torch fallbacks (DESIGN section 7).

Every function takes ``backend="auto" | "triton" | "torch"``. ``"auto"`` runs Triton on CUDA tensors and
torch elsewhere; ``"triton"`` on CPU tensors requires ``TRITON_INTERPRET=1`` (the Triton CPU interpreter).
The cosine and max-min kernels work in fp32 (fp16/bf16 inputs are upcast, dot products accumulate in fp32
without TF32); the best-match kernel follows ToMe's official dtype semantics (unit rows and similarities in the
input dtype, fp32 accumulation, no norm floor). Either way the Triton kernels pick the same indices as the
torch fallbacks, up to the summation order of the dot products.

* :func:`cosine_similarity`: pairwise cosine similarity of one or two token sets.
* :func:`bipartite_best_match`: best match (max cosine, first argmax) of each row of ``a`` in ``b`` (ToMe).
* :func:`maxmin_select`: DivPrune's greedy max-min selection in a constant number of launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtr.kernels.dispatch import BACKENDS, interpreter_enabled, load_triton, resolve_backend
from vtr.kernels.torch_impl import (
    DENSE_MAX_TOKENS,
    bipartite_best_match_torch,
    cosine_similarity_torch,
    maxmin_select_torch,
)

__all__ = [
    "BACKENDS",
    "DENSE_MAX_TOKENS",
    "bipartite_best_match",
    "cosine_similarity",
    "interpreter_enabled",
    "maxmin_select",
    "resolve_backend",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def cosine_similarity(a: Tensor, b: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Fused normalised similarity ``cos(a_i, b_j)`` (norm floor ``1e-12``), fp32 result.

    Args:
        a: ``[M, D]`` or ``[B, M, D]``, fp16/bf16/fp32.
        b: ``[N, D]`` or ``[B, N, D]`` with the same rank, batch and ``D`` as ``a``; ``None`` means ``a``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[M, N]`` or ``[B, M, N]`` fp32.
    """
    _check_tokens("a", a)
    if b is not None:
        _check_tokens("b", b)
        _check_pair(a, b)
    if resolve_backend(backend, a, b) == "torch":
        return cosine_similarity_torch(a, b)
    a3, b3 = _batched(a), _batched(a if b is None else b)
    out = load_triton().cosine_similarity(a3, b3)
    return out if a.ndim == 3 else out[0]


def bipartite_best_match(
    a: Tensor,
    b: Tensor,
    backend: str = "auto",
    *,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """For each row of ``a`` the max cosine similarity over rows of ``b`` and its first argmax (ToMe).

    Dtype semantics are those of the official ToMe ``bipartite_soft_matching`` (spec ``tome.md`` section 3):
    rows are normalised in the input dtype without a norm floor (``x / ||x||``; a zero row gives NaN) and every
    similarity is a value of the input dtype (fp32 accumulation, then rounded, as torch's matmul does), so the
    torch path is bit-identical to the official operations. The ``Na x Nb`` matrix is never materialised by the
    Triton kernel, whose dot products differ from torch's only in summation order.

    Masked entries count as ``-inf``: ToMe's ``class_token`` is ``a_mask[..., 0] = False`` and
    ``distill_token`` is ``b_mask[..., 0] = False``.

    Args:
        a: ``[Na, D]`` or ``[B, Na, D]``; b: ``[Nb, D]`` or ``[B, Nb, D]`` (same rank, batch, ``D`` and dtype;
            fp16/bf16/fp32, or fp64 with the torch backend).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        a_mask: bool ``[Na]`` or ``[B, Na]``; ``False`` rows get value ``-inf`` and index 0.
        b_mask: bool ``[Nb]`` or ``[B, Nb]``; ``False`` columns are never matched (unless all are masked,
            then the row gets ``-inf`` and index 0).

    Returns:
        ``values`` in the input dtype and ``indices`` int64, both ``[Na]`` or ``[B, Na]``. Ties go to the lowest
        index; as in ``torch.max``, a row with a NaN similarity gets NaN and the index of its first NaN.
    """
    _check_tokens("a", a, (*_FLOATS, torch.float64))
    _check_tokens("b", b, (*_FLOATS, torch.float64))
    _check_pair(a, b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    am = _check_mask("a_mask", a_mask, a)
    bm = _check_mask("b_mask", b_mask, b)
    a3, b3 = _batched(a), _batched(b)
    use = resolve_backend(backend, a, b)
    if use == "triton" and a.dtype not in _FLOATS:
        raise TypeError(f"backend 'triton' needs float16, bfloat16 or float32 inputs, got {a.dtype}")
    if use == "torch":
        values, indices = bipartite_best_match_torch(a3, b3, am, bm)
    else:
        values, indices = load_triton().bipartite_best_match(a3, b3, am, bm)
    return (values, indices) if a.ndim == 3 else (values[0], indices[0])


def maxmin_select(x: Tensor, k: int, backend: str = "auto") -> Tensor:
    """DivPrune's greedy max-min (farthest-point) selection on cosine distance.

    Same result as :func:`vtr.ops.divprune.divprune_select` (spec ``divprune.md`` section 3), whose math
    lives in :func:`vtr.kernels.torch_impl.maxmin_select_torch`. The Triton path uses a constant number of
    launches whatever ``k``.

    Args:
        x: ``[M, D]`` token features, any float dtype (distance work is fp32).
        k: number of tokens to keep, ``k >= 1``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[min(k, M)]`` int64, distinct and ascending; ``k >= M`` returns ``arange(M)``.

    Raises:
        ValueError: ``x`` not 2-D or ``k <= 0``; TypeError: ``k`` not an int.
    """
    validate_maxmin(x, k)
    use = resolve_backend(backend, x)
    if use == "torch" or k >= x.shape[0]:
        return maxmin_select_torch(x, k)
    return load_triton().maxmin_select(x, k)


def validate_maxmin(x: Tensor, k: int) -> None:
    """Check ``x`` is a 2-D tensor ``[M, D]`` and ``k`` an int ``>= 1`` (spec section 3, step 1)."""
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"maxmin selection expects a 2-D tensor [M, D], got {getattr(x, 'shape', type(x))}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r} of type {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")


def _check_tokens(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> None:
    if not isinstance(t, Tensor) or t.ndim not in (2, 3):
        raise ValueError(f"{name} must be a tensor [N, D] or [B, N, D], got {getattr(t, 'shape', type(t))}")
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {t.dtype}")


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != b.ndim or a.shape[-1] != b.shape[-1] or (a.ndim == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(f"a and b must share rank, batch and feature dim, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")


def _check_mask(name: str, mask: Tensor | None, t: Tensor) -> Tensor | None:
    """Validate a bool mask over the rows of ``t`` and return it as ``[B, N]``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(t.shape[:-1]):
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(t.shape[:-1])}, got "
            f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}"
        )
    return (mask if mask.ndim == 2 else mask[None]).to(t.device)


def _batched(t: Tensor) -> Tensor:
    return t if t.ndim == 3 else t[None]
