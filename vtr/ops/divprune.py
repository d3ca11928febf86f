"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens (max-min cosine distance).

Functional core: :func:`divprune_select`. Spec: ``shared/specs/divprune.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import vtr.kernels as _kernels
from vtr.kernels.torch_impl import BLOCK_ROWS, maxmin_select_torch
from vtr.ops.base import BudgetOperator, OpContext
from vtr.tokens import VisualTokens

__all__ = ["DENSE_MAX_TOKENS", "DivPrune", "divprune_select"]

#: Above this many tokens the M x M distance matrix is never materialised (read at call time).
DENSE_MAX_TOKENS = _kernels.DENSE_MAX_TOKENS
_BLOCK_ROWS = BLOCK_ROWS


def divprune_select(x: Tensor, k: int, backend: str = "torch") -> Tensor:
    """Greedy max-min (farthest-point) selection on cosine distance: the one entry point of DivPrune.

    ``backend="torch"`` runs the reference implementation, :func:`vtr.kernels.torch_impl.maxmin_select_torch`;
    ``"auto"``/``"triton"`` dispatch through :func:`vtr.kernels.maxmin_select` (the Triton kernel on CUDA returns
    the same indices).

    Args:
        x: ``[M, D]`` token features (any float dtype; all distance work is fp32).
        k: number of tokens to keep, ``k >= 1``.
        backend: ``"torch"`` (default), ``"auto"`` (Triton on CUDA, torch elsewhere) or ``"triton"``.

    Returns:
        ``[min(k, M)]`` long tensor of distinct, ascending indices. The seed is the most isolated token
        (largest nearest-neighbour distance); each step adds the token farthest from the selected set;
        ties go to the lowest index. ``k >= M`` returns ``arange(M)``.
    """
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"divprune_select expects a 2-D tensor [M, D], got {getattr(x, 'shape', type(x))}")
    _kernels.validate_maxmin(x, k)
    if _kernels.resolve_backend(backend, x) == "torch" or k >= x.shape[0]:
        return maxmin_select_torch(x, k, dense_max=DENSE_MAX_TOKENS, block_rows=_BLOCK_ROWS)
    return _kernels.maxmin_select(x, k, backend=backend)


@dataclass
class DivPrune(BudgetOperator):
    """Keep the ``keep`` most diverse tokens of each ``scope`` unit (``pre_llm``, no attention needed).

    Args:
        keep: int count or float ratio in (0, 1]; default 0.098 (56 of LLaVA-1.5's 576).
        scope: ``"image"`` (default), ``"frame"`` or ``"sample"``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``; all give the
            same indices.
    """

    keep: int | float = 0.098
    scope: str = "image"
    backend: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.backend not in _kernels.BACKENDS:
            raise ValueError(f"{self.name}.backend must be one of {_kernels.BACKENDS}, got {self.backend!r}")

    def select(self, unit: VisualTokens, k: int, ctx: OpContext) -> Tensor:
        return divprune_select(unit.embeds, k, backend=self.backend)
