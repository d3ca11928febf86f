"""FastV (Chen et al., ECCV 2024): drop the visual tokens the prompt attends to least, inside the LLM.

At decoder layer ``K`` the visual tokens are ranked by the attention they receive from the last prompt
token in layer ``K - 1`` (averaged over heads); the top ``1 - R`` are kept for layers ``K`` and later.
Layers before ``K`` see everything; every layer's KV cache holds exactly what that layer saw.

Functional core: :func:`fastv_select`. The attention row is recomputed by the adapter from layer
``K - 1``'s q/k projections (signal ``text_attn@{K-1}``), never by switching to eager attention.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from vtr.ops.base import LayerOperator, OpContext, resolve_keep, resolve_layer, validate_keep
from vtr.tokens import VisualTokens

__all__ = ["FastV", "fastv_select"]


def fastv_select(attn: Tensor, k: int) -> Tensor:
    """The ``k`` tokens with the largest attention, as ascending indices (ties to the lowest index).

    Args:
        attn: ``[N]`` attention each visual token receives (any float dtype; compared in fp32).
        k: tokens to keep; ``k >= N`` keeps all, ``k <= 0`` raises ``ValueError``.
    """
    if attn.ndim != 1:
        raise ValueError(f"fastv_select expects a 1-D score vector [N], got shape {tuple(attn.shape)}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    n = attn.shape[0]
    if k >= n:
        return torch.arange(n, device=attn.device)
    # Stable descending sort: equal scores keep index order, so ties go to the lowest index.
    order = torch.sort(attn.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


@dataclass
class FastV(LayerOperator):
    """Keep the visual tokens the last prompt token attends to most, from decoder layer ``k`` on.

    Args:
        k: the first layer that sees the reduced set (>= 1; ranking uses layer ``k - 1``'s attention).
            Negative values count from the end.
        r: fraction of the visual tokens removed (0 <= r < 1); default 0.5 as in the paper.
        keep: alternative budget: an int count or a ratio in (0, 1] of the visual tokens entering layer
            ``k`` (overrides ``r`` when given). Protected tokens (e.g. a key set) always survive.
    """

    k: int = 2
    r: float = 0.5
    keep: int | float | None = None

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"FastV.k must be an int (a decoder layer index >= 1), got {self.k!r}")
        if self.k == 0:
            raise ValueError("FastV.k must be >= 1 (layer k - 1 provides the attention ranking), got 0")
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Real) or not 0.0 <= float(self.r) < 1.0:
            raise ValueError(f"FastV.r must be a float in [0, 1) (the fraction removed), got {self.r!r}")
        self.r = float(self.r)
        if self.keep is not None:
            self.keep = validate_keep(self.keep)

    def layer_index(self, n_layers: int) -> int:
        i = resolve_layer(f"FastV.k={self.k}", self.k, n_layers)
        if i == 0:
            raise ValueError("FastV.k resolves to layer 0: it needs a previous layer's attention")
        return i

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        return (f"text_attn@{self.layer_index(n_layers) - 1}",)

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        n = len(tokens)
        if n == 0:
            return tokens
        keep = self.keep if self.keep is not None else 1.0 - self.r
        k = resolve_keep(keep, n) if keep < 1.0 or isinstance(keep, int) else n
        if k >= n:
            return tokens
        layer = ctx.extras.get("layer")
        name = f"text_attn@{layer - 1}" if layer is not None else None
        if name not in tokens.scores:
            raise ValueError(
                f"FastV needs the signal {name or 'text_attn@<k-1>'!r}, which the adapter captures: run it through "
                "vtr.wrap on a supported model"
            )
        idx = fastv_select(tokens.scores[name], k)
        if bool(tokens.protected.any()):
            idx = torch.unique(torch.cat([idx, tokens.protected.nonzero().flatten()]))
        return tokens.take(idx)
