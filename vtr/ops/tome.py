"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): bipartite soft matching.

Official repository: facebookresearch/ToMe. Spec: ``shared/specs/tome.md``.

Functional cores, with the official call convention and semantics:

* :func:`bipartite_soft_matching` -> ``(merge, unmerge)`` closures; :func:`merge_wavg`, :func:`merge_source`
  and :func:`merge_representative` apply a ``merge`` closure to tokens, sizes, source maps and representatives;
* :func:`parse_r` (the official schedule forms) and :func:`schedule_for_keep` (a ``keep`` budget as a schedule);
* :func:`merge_to`: the ``pre_llm`` variant, repeated bipartite steps down to exactly ``K`` tokens.

dtype: all maths runs in the input dtype without promotion, as in the official code, so results are
bit-identical to the official functions (on the same device) except where the official unstable ``argsort``
breaks exact ties of the best-match scores differently: vtr sorts stably (ties keep the lower A index).

Kernel: the best match of every A token is :func:`vtr.kernels.bipartite_best_match`, whose torch path is the
official arithmetic (unit rows in the input dtype without a norm floor, ``A @ B^T`` in the input dtype). The
cores default to ``backend="torch"``, because no Triton kernel can be bit-identical to a cuBLAS matmul (the fp32
sums run in another order). ``backend="auto"`` / ``"triton"`` uses the fused kernel on CUDA: the same
semantics and the same rounding to the input dtype, so picks can differ from the official ones only when two
similarities are within one rounding of each other; worth it for large ``pre_llm`` merges, where it never
materialises the ``N/2 x N/2`` similarity matrix.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

import vtr.kernels as _kernels
from vtr.ops.base import OpContext, VisionOperator, resolve_keep, validate_keep
from vtr.tokens import SCOPES, TowerTokens, VisualTokens

__all__ = [
    "ToMe",
    "bipartite_soft_matching",
    "merge_representative",
    "merge_source",
    "merge_to",
    "merge_wavg",
    "parse_r",
    "schedule_for_keep",
]

#: ``merge(x, mode="mean") -> x`` / ``unmerge(x) -> x`` closures returned by :func:`bipartite_soft_matching`.
MergeFn = Callable[..., Tensor]


def _identity(x: Tensor, mode: str | None = None) -> Tensor:
    return x


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    *,
    backend: str = "torch",
) -> tuple[MergeFn, MergeFn]:
    """Match the alternate halves of the tokens and prepare merging the ``r`` most similar pairs.

    Tokens ``0, 2, 4, ...`` form set A and ``1, 3, 5, ...`` set B. Every A token is linked to its most similar
    B token (cosine of ``metric``); the ``r`` A tokens with the strongest links are merged into their B
    partner. ``r`` is capped at ``(N - protected) // 2`` with ``protected = class_token + distill_token``.

    Args:
        metric: ``[B, N, C]`` float similarity features (ToMe: keys averaged over heads). Read without gradients.
        r: tokens to remove; ``r <= 0`` returns identity functions.
        class_token: token 0 is a class token: never merged away (its A row is ``-inf``), and kept first.
        distill_token: token 1 is a distillation token: nothing merges into it (its B column is ``-inf``).
        backend: ``"torch"`` (default; the official arithmetic), ``"auto"`` or ``"triton"`` (fused kernel on
            CUDA, see the module docstring).

    Returns:
        ``(merge, unmerge)``.

        * ``merge(x, mode="mean")``: ``x [B, N, c] -> [B, N - r, c]``, any dtype; ``mode`` is a
          ``scatter_reduce`` reduction (``"sum"``, ``"mean"``, ``"amax"``, ...) over each destination and the
          A tokens merged into it. Output order (official): ``[unmerged A | B]``; the unmerged A tokens are in
          descending-score order, ascending original order when ``class_token``. With ``distill_token`` the
          official order is ``[A_0, B_0, other unmerged A, other B]``.
        * ``unmerge(y)``: ``y [B, N - r, c] -> [B, N, c]``: every original position takes the row of the token
          it went into. The exact inverse of ``merge``'s order, also with ``distill_token`` (where the official
          ``unmerge`` ignores the reordering).

    Raises:
        ValueError: ``metric`` not a ``[B, N, C]`` float tensor; TypeError: ``r`` not an int.
    """
    if not isinstance(metric, Tensor) or metric.ndim != 3 or not metric.is_floating_point():
        raise ValueError(f"metric must be a float tensor [B, N, C], got {_describe(metric)}")
    r = _check_int("r", r)
    protected = int(bool(class_token)) + int(bool(distill_token))
    n_tokens = metric.shape[1]
    r = min(r, (n_tokens - protected) // 2)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        a_mask = b_mask = None
        if class_token:
            a_mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            a_mask[:, 0] = False
        if distill_token:
            b_mask = torch.ones(b.shape[:2], dtype=torch.bool, device=b.device)
            b_mask[:, 0] = False
        node_max, node_idx = _kernels.bipartite_best_match(a, b, backend=backend, a_mask=a_mask, b_mask=b_mask)
        order = torch.argsort(node_max, dim=-1, descending=True, stable=True)[..., None]
        unm_idx = order[..., r:, :]  # [B, Na - r, 1]
        src_idx = order[..., :r, :]  # [B, r, 1]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-2).values  # keeps the class token (A row 0, never merged) first

    n_unm = unm_idx.shape[-2]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        side_a, side_b = x[..., ::2, :], x[..., 1::2, :]
        bsz, _, c = side_a.shape
        unm = side_a.gather(dim=-2, index=unm_idx.expand(bsz, n_unm, c))
        src = side_a.gather(dim=-2, index=src_idx.expand(bsz, r, c))
        dst = side_b.scatter_reduce(-2, dst_idx.expand(bsz, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        if distill_token:  # back to [unmerged A | B]
            y = torch.cat([y[:, :1], y[:, 2 : n_unm + 1], y[:, 1:2], y[:, n_unm + 1 :]], dim=1)
        unm, dst = y[..., :n_unm, :], y[..., n_unm:, :]
        bsz, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(bsz, r, c))
        out = torch.zeros(bsz, n_tokens, c, device=y.device, dtype=y.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(bsz, n_unm, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(bsz, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: ``x <- merge(x * size, "sum") / merge(size, "sum")``.

    Args:
        merge: a ``merge`` closure of :func:`bipartite_soft_matching` (or any with the same convention).
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` original tokens each stands for; ``None`` means ones in ``x``'s dtype.

    Returns:
        ``(x [B, N - r, C], size [B, N - r, 1])``, in the dtype of ``x * size`` (no promotion for equal dtypes).
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original tokens each current token covers.

    Args:
        merge: a ``merge`` closure.
        x: ``[B, N, C]`` current tokens (only their shape and device are read when ``source`` is ``None``).
        source: ``[B, N, N_orig]`` 0/1 map; ``None`` starts from the identity ``[B, N, N]`` (fp32, as in the
            official code).

    Returns:
        ``[B, N - r, N_orig]``: ``source`` merged with ``amax``; row ``i`` is 1 at the originals of token ``i``.
    """
    if source is None:
        bsz, n_tokens, _ = x.shape
        source = torch.eye(n_tokens, device=x.device)[None].expand(bsz, n_tokens, n_tokens)
    return merge(source, mode="amax")


def merge_representative(merge: MergeFn, rep: Tensor) -> Tensor:
    """Follow each token's representative (the B destination that absorbed the others) through ``merge``.

    Computed through the closure itself (two ``amax`` passes on index vectors, the other side set to -1), so it
    always follows the merge's output order.

    Args:
        merge: a ``merge`` closure of :func:`bipartite_soft_matching` (alternating A/B split).
        rep: ``[B, N]`` int64, non-negative; ``arange(N)`` before the first merge.

    Returns:
        ``[B, N - r]`` int64: ``concat(rep_A[unmerged], rep_B)`` in the merge's output order.
    """
    if not isinstance(rep, Tensor) or rep.ndim != 2 or rep.dtype != torch.long:
        raise ValueError(f"rep must be an int64 tensor [B, N], got {_describe(rep)}")
    if rep.numel() and int(rep.min()) < 0:
        raise ValueError(f"rep must be non-negative (original indices), got minimum {int(rep.min())}")
    col = rep[..., None]
    on_a = (torch.arange(rep.shape[1], device=rep.device) % 2 == 0)[None, :, None]
    none = torch.full_like(col, -1)
    from_a = merge(torch.where(on_a, col, none), mode="amax")  # unmerged A rows carry their own rep
    from_b = merge(torch.where(on_a, none, col), mode="amax")  # B rows carry theirs; merged A rows add -1
    return torch.where(from_b >= 0, from_b, from_a)[..., 0]


def parse_r(num_layers: int, r: int | tuple[int, float] | Sequence[int]) -> list[int]:
    """The official schedule forms: tokens removed at each of ``num_layers`` layers.

    Args:
        num_layers: layers that may merge, ``>= 1``.
        r: an int (constant ``r``); a tuple ``(r, inflect)`` with ``inflect`` in ``[-1, 1]``:
            ``lo = int(r (1 - inflect))``, ``hi = 2r - lo``, entry ``i = int(lo + step * i)`` with
            ``step = (hi - lo) / (num_layers - 1)`` (``(r, -1)`` decreases from ``2r`` to 0); or a list of ints
            taken as is, right-padded with zeros or truncated to ``num_layers``.

    Returns:
        ``num_layers`` ints (``[r]``-style single entry for one layer).

    Raises:
        ValueError / TypeError naming the bad value.
    """
    num_layers = _check_int("num_layers", num_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(r, list):
        entries = [_check_int(f"r[{i}]", v) for i, v in enumerate(r)]
        return (entries + [0] * num_layers)[:num_layers]
    inflect: float = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflect), got {r!r}")
        r, inflect = r
        if isinstance(inflect, bool) or not isinstance(inflect, numbers.Real) or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect must be a number in [-1, 1], got {inflect!r}")
    r = _check_int("r", r)
    if num_layers == 1:
        return [r]
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def schedule_for_keep(n_tokens: int, keep: int, num_layers: int, protected: int = 1) -> list[int]:
    """A per-layer ``r`` schedule that leaves exactly ``keep`` unprotected tokens after ``num_layers`` layers.

    ``D = (n_tokens - protected) - keep`` merges are spread as evenly as possible, extra merges in the
    earliest layers: layer ``l`` takes ``ceil(D_left / layers_left)``. That share never exceeds ToMe's 50% cap
    ``(N_l - protected) // 2`` before the last layer, but the caps of the LATER layers can make the remaining
    merges impossible (each layer at most halves the unprotected tokens). So a layer takes more when needed:
    at least ``N_l - protected - keep * 2^(layers_left - 1)``, the least that keeps ``keep`` reachable. Every
    reachable ``keep`` is met exactly; an unreachable one raises. When the front-loaded even split fits under
    every cap (e.g. LLaVA-1.5: 576 -> 192/128/64 in 23 layers), it is the result.

    Args:
        n_tokens: tokens entering the first merging layer, protected ones included (577 for CLIP-L/336 + CLS).
        keep: unprotected tokens to leave (e.g. 192 patches for LLaVA-1.5); ``>= n_tokens - protected``
            gives all zeros.
        num_layers: merging layers (23 for LLaVA-1.5: blocks 0..22 feed ``hidden_states[-2]``).
        protected: tokens never merged (class and distillation tokens), as in :func:`bipartite_soft_matching`.

    Returns:
        ``num_layers`` ints ``r_l`` with ``sum = D``, each within its layer's cap.

    Raises:
        ValueError: bad arguments, or ``keep`` below the fewest tokens ``num_layers`` layers can leave.
    """
    n_tokens = _check_int("n_tokens", n_tokens)
    keep = _check_int("keep", keep)
    num_layers = _check_int("num_layers", num_layers)
    protected = _check_int("protected", protected)
    if protected < 0 or n_tokens < protected:
        raise ValueError(f"need 0 <= protected <= n_tokens, got protected={protected}, n_tokens={n_tokens}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    free = n_tokens - protected
    if keep >= free:
        return [0] * num_layers
    fewest = free
    for _ in range(num_layers):
        fewest -= fewest // 2
    if keep < fewest:
        raise ValueError(
            f"keep={keep} is unreachable: {num_layers} merging layers (at most 50% each) leave at least "
            f"{fewest} of {free} unprotected tokens"
        )
    schedule, left = [], free - keep
    for layer in range(num_layers):
        layers_left = num_layers - layer
        cap = free // 2
        # After this layer the others leave at least ceil((free - r) / 2^(layers_left - 1)) tokens: r must
        # be large enough for that to be <= keep.
        must = free - keep * 2 ** (layers_left - 1)
        r = min(cap, max(-(-left // layers_left), must))
        schedule.append(r)
        free -= r
        left -= r
    return schedule


def merge_to(
    x: Tensor, k: int, size: Tensor | None = None, *, backend: str = "torch"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``pre_llm`` ToMe: repeated bipartite steps on the tokens themselves until exactly ``k`` remain.

    Each step merges ``r = min(N_cur - k, N_cur // 2)`` tokens (no protected tokens) with
    :func:`merge_wavg`, carrying sizes and representatives. Maths in ``x``'s dtype.

    Args:
        x: ``[N, C]`` or ``[B, N, C]`` float tokens (the metric is ``x`` itself, re-merged at every step).
        k: tokens to leave, ``>= 1``; ``k >= N`` returns the input unchanged.
        size: ``[N]`` / ``[B, N]`` sizes of the input tokens (default ones); the weights of the averages.
        backend: best-match backend, see :func:`bipartite_soft_matching`.

    Returns:
        ``(x, size, rep, assign)`` with ``K = min(k, N)``, outputs sorted by representative:

        * ``x``: ``[K, C]`` / ``[B, K, C]`` merged tokens (size-weighted means), in ``x``'s dtype;
        * ``size``: ``[K]`` / ``[B, K]`` summed sizes, in ``x``'s dtype (like the official ``size``; fp16/bf16
          round sizes above 2048/256);
        * ``rep``: ``[K]`` / ``[B, K]`` int64, ascending: the input index of each output's representative (the
          destination that absorbed the others);
        * ``assign``: ``[N]`` / ``[B, N]`` int64: the output token each input token went into, so that
          ``assign[rep] == arange(K)``.

    Raises:
        ValueError: bad shapes or ``k < 1``; TypeError: ``k`` not an int.
    """
    if not isinstance(x, Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [N, C] or [B, N, C], got {_describe(x)}")
    k = _check_int("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batched = x.ndim == 3
    x3 = x if batched else x[None]
    bsz, n_tokens, _ = x3.shape
    if size is not None:
        if not isinstance(size, Tensor) or tuple(size.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"size must have shape {tuple(x.shape[:-1])}, got {_describe(size)}")
        size3 = (size if batched else size[None])[..., None].to(x.dtype)
    else:
        size3 = torch.ones_like(x3[..., :1])
    rep = torch.arange(n_tokens, device=x.device).expand(bsz, n_tokens)
    assign = rep
    while x3.shape[1] > k:
        n_cur = x3.shape[1]
        r = min(n_cur - k, n_cur // 2)
        merge, unmerge = bipartite_soft_matching(x3, r, backend=backend)
        n_out = n_cur - r
        x3, size3 = merge_wavg(merge, x3, size3)
        rep = merge_representative(merge, rep)
        # unmerge(arange) maps every current token to the output it went into.
        where = unmerge(torch.arange(n_out, device=x.device).expand(bsz, n_out)[..., None])[..., 0]
        assign = where.gather(1, assign)
    rep, order = rep.sort(dim=1)
    x3 = x3.gather(1, order[..., None].expand(-1, -1, x3.shape[-1]))
    size3 = size3.gather(1, order[..., None])
    assign = torch.argsort(order, dim=1).gather(1, assign)
    out = (x3, size3[..., 0], rep, assign)
    return out if batched else tuple(t[0] for t in out)  # type: ignore[return-value]


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"


# ---- operator


def _merge_assignment(merge: MergeFn, unmerge: MergeFn, n_out: int, like: Tensor) -> Tensor:
    """``[B, N]`` long: the output row each input row went into (``unmerge`` of the output indices)."""
    out_idx = torch.arange(n_out, device=like.device, dtype=torch.float32).expand(like.shape[0], n_out)
    return unmerge(out_idx.unsqueeze(-1)).squeeze(-1).round().long()


PLACEMENTS = ("auto", "vision", "pre_llm")


@dataclass
class ToMe(VisionOperator):
    """Token merging (ToMe). In the vision tower of CLIP/SigLIP (LLaVA family) and timm ViTs; on the
    LLM-input tokens of Qwen2-VL/2.5-VL and InternVL, whose 2x2 mergers need an intact grid in the tower.

    Args:
        r: tokens merged per block (vision placement): an int, ``(r, inflect)`` or a list (official forms,
            :func:`parse_r`), over the blocks that feed the features.
        keep: alternative budget, per image/tile (vision) or per ``scope`` unit (pre_llm): an int count or a
            ratio in (0, 1]. Vision: an even schedule reaching exactly ``keep`` (:func:`schedule_for_keep`).
        prop_attn: proportional attention (``log(size)`` key bias) in later blocks (vision placement).
        placement: ``"auto"`` (vision where the family's tower has patch units, else pre_llm), ``"vision"``
            or ``"pre_llm"``.
        scope: budget unit of the pre_llm placement (``"frame"``: each frame/tile separately).
        backend: best-match backend of the pre_llm placement (``"torch"``, ``"auto"``, ``"triton"``).

    Exactly one of ``r`` and ``keep`` is given (``keep`` only for pre_llm).
    """

    r: int | tuple[int, float] | list[int] | None = None
    keep: int | float | None = None
    prop_attn: bool = True
    placement: str = "auto"
    scope: str = "frame"
    backend: str = "torch"

    needs_keys: ClassVar[bool] = True
    units: ClassVar[tuple[str, ...]] = ("patch",)

    def validate(self) -> None:
        if (self.r is None) == (self.keep is None):
            raise ValueError(
                f"ToMe needs exactly one of r (merges per block) and keep (tokens left); got r={self.r!r}, "
                f"keep={self.keep!r}"
            )
        if self.keep is not None:
            self.keep = validate_keep(self.keep, "ToMe.keep")
        if self.r is not None:
            parse_r(1, self.r)  # validates the form
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ToMe.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "pre_llm" and self.keep is None:
            raise ValueError("ToMe after the projector (placement='pre_llm') needs keep (tokens left per unit), not r")
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"ToMe.prop_attn must be True or False, got {self.prop_attn!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"ToMe.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.backend not in _kernels.BACKENDS:
            raise ValueError(f"ToMe.backend must be one of {_kernels.BACKENDS}, got {self.backend!r}")

    @property
    def stage(self) -> str:  # type: ignore[override]
        return "pre_llm" if self.placement == "pre_llm" else "vision"

    def bind(self, adapter) -> ToMe:
        if self.placement != "auto":
            if self.placement == "vision":
                facts = adapter.tower()
                if facts is None or facts.info.unit != "patch":
                    raise ValueError(
                        f"ToMe cannot merge inside the {adapter.name} encoder (its 2x2 units need an intact grid): "
                        "use placement='pre_llm' (or 'auto')"
                    )
            return self
        facts = adapter.tower() if "vision" in adapter.supported_stages else None
        in_tower = facts is not None and facts.info.unit == "patch" and facts.refuse is None
        if not in_tower and self.keep is None:
            raise ValueError(
                f"ToMe on {adapter.name} merges the LLM-input tokens (pre_llm), which needs keep (tokens left per "
                f"{self.scope}), not r={self.r!r}"
            )
        return dataclasses.replace(self, placement="vision" if in_tower else "pre_llm")

    # ---------------------------------------------------------------- vision placement
    def _schedule(self, info, n_units: int, prefix: int) -> list[int]:
        layers = info.feature_block + 1
        if self.r is not None:
            return parse_r(layers, self.r)
        k = resolve_keep(self.keep, n_units)
        return schedule_for_keep(n_units + prefix, k, layers, protected=prefix)

    def points(self, info) -> list[tuple[int, str]]:
        return [(b, "mid") for b in range(info.feature_block + 1)]

    def apply_tower(self, tokens: TowerTokens, ctx: OpContext) -> TowerTokens:
        info = ctx.extras["vision_info"]
        block = tokens.block
        p = tokens.prefix.shape[1]
        n_units0 = tokens.owner.shape[1]
        sched = ctx.extras.setdefault("tome_schedule", {}).get(id(self))
        if sched is None:
            sched = self._schedule(info, n_units0, p)
            ctx.extras["tome_schedule"][id(self)] = sched
        r = sched[block] if block < len(sched) else 0
        if self.prop_attn:
            tokens.size_bias = True
        if r <= 0 or not bool(tokens.valid.all()):
            if r > 0:
                raise ValueError("ToMe in the tower needs equal token counts in every sequence (no padding)")
            return tokens
        s, _, c = tokens.x.shape
        x = torch.cat([tokens.prefix, tokens.x], 1)
        metric = torch.cat([tokens.prefix_keys, tokens.keys], 1)
        size = torch.cat([tokens.sizes.new_ones(s, p), tokens.sizes], 1).unsqueeze(-1).to(x.dtype)
        merge, unmerge = bipartite_soft_matching(metric, r, class_token=info.has_cls, distill_token=p > 1)
        x_new, _ = merge_wavg(merge, x, size)
        n_out = x_new.shape[1]
        assign = _merge_assignment(merge, unmerge, n_out, x)
        rep = merge_representative(merge, torch.arange(x.shape[1], device=x.device).expand(s, -1))
        # Prefix tokens (CLS first, never merged) stay in front; the rest keep the official order.
        is_prefix_out = torch.zeros(s, n_out, dtype=torch.bool, device=x.device)
        is_prefix_out.scatter_(1, assign[:, :p], True)
        order = torch.argsort((~is_prefix_out).long(), dim=1, stable=True)
        x_new = torch.gather(x_new, 1, order.unsqueeze(-1).expand(-1, -1, c))
        rep = torch.gather(rep, 1, order)
        inv = torch.argsort(order, dim=1)
        assign = torch.gather(inv, 1, assign)
        tokens.prefix = x_new[:, :p]
        return tokens.merge(assign[:, p:] - p, x_new[:, p:], rep[:, p:] - p)

    # ---------------------------------------------------------------- pre_llm placement
    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        if self.placement != "pre_llm":
            raise TypeError("this ToMe acts inside the vision encoder: use it through vtr.wrap")
        parts = []
        for _, pos in tokens.units(self.scope):
            unit = tokens.take(pos)
            k = min(resolve_keep(self.keep, max(round(float(unit.sizes.sum())), len(unit))), len(unit))
            if k >= len(unit):
                parts.append(unit)
                continue
            x, _, rep, assign = merge_to(unit.embeds, k, unit.sizes.to(unit.embeds.dtype), backend=self.backend)
            parts.append(unit.merge(assign, x, rep))
        if not parts:
            return tokens
        return VisualTokens.cat(parts).sorted()
