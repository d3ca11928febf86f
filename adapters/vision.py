"""Vision-block hooks: ``vision``-stage operators and attention signals inside the vision encoder.

From the first block where an operator acts or a signal is needed, the encoder's blocks run through a
shared block runner (an instance-level ``forward``, removed exactly by ``unwrap``), composed from the
family's block parts (:class:`BlockParts`: norms, q/k/v, output projection, LayerScale, MLP):

* attention is computed with ``scaled_dot_product_attention`` on the block's own q/k/v, with a key mask
  for sequences that kept fewer tokens than others and, when an operator asks for it, ToMe's
  ``log(size)`` key bias; rotary embeddings (Qwen2-VL) are gathered for the rows that remain;
* signals (``cls_attn@L``, ``mean_received@L``, ``value_norm@L``) are computed from the same q/k/v, for
  the rows needed only (the column mean is accumulated over query chunks, never kept per head);
* operators run at ``"mid"`` (after the attention residual, before the MLP) and ``"post"`` points on
  :class:`~vtr.tokens.TowerTokens`, one row per token unit.

Inside the runner a sequence is laid out as ``[prefix | unit 0 patches | unit 1 patches | ...]``. Where
the model's own code continues (the encoder output for CLIP/SigLIP/InternViT, the PatchMerger input for
Qwen2-VL), hidden states are re-expanded to the native layout: kept units at their ORIGINAL place, rows
of removed or merged-away units as zero placeholders. The model's projector, tiles, newlines, merger and
pixel shuffle then run unchanged, and the LLM-input splice removes the placeholder rows
(:func:`fold_vision_results` maps units to LLM rows through the family's token unit).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtr.adapters.base import VisionInfo
from vtr.ops.base import OpContext
from vtr.tokens import TowerTokens, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    from vtr.adapters.base import Adapter, VisualSpans
    from vtr.report import Report

__all__ = [
    "VISION_SIGNALS",
    "BlockParts",
    "TowerFacts",
    "TowerResult",
    "VisionHooks",
    "fold_vision_results",
]

#: Signal kinds the vision stage provides (``kind@block``).
VISION_SIGNALS = ("cls_attn", "mean_received", "value_norm")
_QUERY_CHUNK = 256  # query rows per chunk when accumulating the column mean of the attention


@dataclass
class BlockParts:
    """One encoder block, taken apart so the runner can stop between its attention and its MLP.

    Attributes:
        norm1: pre-attention norm.
        qkv: ``(h [S, L, C], cos, sin) -> (q, k, v)``, each ``[S, H, L, d]``, with the block's q/k norms and
            rotary embedding applied (``cos``/``sin`` are ``[S, L, d]`` or ``None``).
        out: ``[S, L, H * d] -> [S, L, C]`` (output projection and any post-attention norm/gate).
        scale: softmax scale.
        ls1: LayerScale/residual scaling of the attention branch (``None``: identity).
        norm2: pre-MLP norm.
        mlp: the MLP.
        ls2: LayerScale of the MLP branch (``None``: identity).
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor, Tensor | None, Tensor | None], tuple[Tensor, Tensor, Tensor]]
    out: Callable[[Tensor], Tensor]
    scale: float
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls1: Callable[[Tensor], Tensor] | None = None
    ls2: Callable[[Tensor], Tensor] | None = None


@dataclass
class TowerFacts:
    """How one family's vision encoder runs, for the vision hook set.

    Attributes:
        info: the encoder description.
        encoder: the module called once per encoding (its pre-hook starts a run, its post-hook re-expands
            the outputs when ``merger`` is ``None``).
        blocks: the encoder blocks.
        parts: ``block -> BlockParts``.
        prefix: special tokens at the start of every sequence (1 for CLS, 2 for CLS + distillation).
        sequences: ``(args, kwargs) of the encoder call -> [(h, w)]`` native patch grid of each sequence.
        unit_patches: ``(h, w) patch grid -> [U, k]`` long, the native patch rows (prefix excluded) of each
            unit, units in raster order of the unit grid.
        packed: the encoder packs its sequences into one ``[T, C]`` tensor (Qwen2-VL: ``cu_seqlens`` and
            per-row ``position_embeddings``).
        merger: module whose INPUT is re-expanded (Qwen2-VL's PatchMerger), or ``None``.
        refuse: a message when this encoder cannot host operators in the current configuration.
        refuse_video: a message when operators cannot act on videos (the model pools full frame grids).
        reexpand: restore the native layout where the model's code continues (``False`` for models whose
            head reads the reduced tokens directly, e.g. timm ViTs).
        window_blocks: blocks with window attention (Qwen2.5-VL): a unit attends only to the units of its window.
        unit_windows: ``(h, w) patch grid -> [U]`` long, the window of every unit (by its ORIGINAL location, so
            units that remain keep their window; a merged unit takes its representative's).
    """

    info: VisionInfo
    encoder: nn.Module
    blocks: nn.ModuleList
    parts: Callable[[nn.Module], BlockParts]
    prefix: int
    sequences: Callable[[tuple, dict], list[tuple[int, int]]]
    unit_patches: Callable[[tuple[int, int]], Tensor]
    packed: bool = False
    merger: nn.Module | None = None
    refuse: str | None = None
    refuse_video: str | None = None
    reexpand: bool = True
    window_blocks: frozenset[int] = frozenset()
    unit_windows: Callable[[tuple[int, int]], Tensor] | None = None

    @property
    def k(self) -> int:
        return self.info.unit_patches


@dataclass
class TowerResult:
    """What the vision stage did in one encoder call (one per ``get_image_features`` / video call).

    Attributes:
        tokens: the final :class:`~vtr.tokens.TowerTokens` (``x`` dropped), one row per kept unit.
        grids: unit grid of each sequence.
        records: ``(operator, counts per sequence after it, seconds)`` in application order.
    """

    tokens: TowerTokens
    grids: list[tuple[int, int]]
    records: list[tuple[str, Tensor, float]] = field(default_factory=list)
    kind: str = "image"  # "image" or "video": which feature method encoded it
    #: Per encoder block: ``(tokens entering its attention, tokens entering its MLP)`` per sequence, ``[S]`` each
    #: (prefix tokens included); blocks before the runner took over saw every token.
    block_tokens: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class VisionHooks:
    """Runs vision-stage operators and captures vision signals (see the module docstring)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        facts = adapter.tower()
        if facts is None:
            raise ValueError(f"the {adapter.name} adapter cannot host vision-stage operators or signals")
        self.facts = facts
        info = facts.info
        pipeline = adapter.reducer.pipeline
        self.ops = pipeline.for_stage("vision")
        n = info.num_blocks
        self.points: dict[tuple[int, str], list[Any]] = {}
        for op in self.ops:
            if facts.refuse is not None:
                raise ValueError(f"{op.name} cannot act in the {adapter.name} encoder: {facts.refuse}")
            if info.unit not in op.units:
                raise ValueError(
                    f"{op.name} works on token units {op.units}; the {adapter.name} encoder's unit is {info.unit!r}"
                )
            for block, point in op.points(info):
                if not 0 <= block < n or point not in ("mid", "post"):
                    raise ValueError(f"{op.name} asks for point {(block, point)}; the encoder has blocks 0..{n - 1}")
                if block > info.feature_block:
                    raise ValueError(
                        f"{op.name} acts in block {block}, after the feature layer (block {info.feature_block}): "
                        "its tokens would never reach the LLM"
                    )
                self.points.setdefault((block, point), []).append(op)
        self.signals: dict[int, set[str]] = {}
        for op in pipeline.ops:
            if op.stage not in ("vision", "pre_llm"):  # their signals come from the language model
                continue
            for sig in op.required_signals(n):
                kind, _, layer = sig.partition("@")
                if kind not in VISION_SIGNALS:
                    continue
                block = int(layer) % n if layer.lstrip("-").isdigit() else None
                if block is None:
                    raise ValueError(f"malformed signal {sig!r} of {op.name}: expected e.g. 'cls_attn@-2'")
                if kind == "cls_attn" and not info.has_cls:
                    raise ValueError(
                        f"{op.name} needs CLS attention ({sig}); the {adapter.name} encoder has no CLS token: use "
                        "score='mean_received'"
                    )
                if facts.refuse is not None:
                    raise ValueError(
                        f"{op.name} needs vision signals, which the {adapter.name} encoder cannot give: {facts.refuse}"
                    )
                self.signals.setdefault(block, set()).add(f"{kind}@{block}")
        starts = [b for b, _ in self.points] + list(self.signals)
        self.start = min(starts) if starts else None
        self.handles: list[Any] = []
        self.run: _Run | None = None

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        if self.start is None:
            return
        from vtr.adapters.metadata import InstanceWrapper

        f = self.facts
        self.handles.append(f.encoder.register_forward_pre_hook(self._encoder_pre, with_kwargs=True))
        if f.merger is None:
            self.handles.append(f.encoder.register_forward_hook(self._encoder_post))
        else:
            self.handles.append(f.merger.register_forward_pre_hook(self._merger_pre))
        for i in range(self.start, len(f.blocks)):
            block = f.blocks[i]
            self.handles.append(InstanceWrapper(block, "forward", around=self._block_call(i, block)))

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()
        self.run = None

    # ------------------------------------------------------------------ encoder
    def _encoder_pre(self, module, args, kwargs):
        if self.adapter.paused:
            self.run = None
            return None
        kind = "video" if self.adapter.encoding == "get_video_features" else "image"
        if kind == "video" and self.ops and self.facts.refuse_video is not None:
            raise ValueError(
                f"vision-stage operators cannot act on {self.adapter.name} videos: {self.facts.refuse_video}"
            )
        self.run = _Run(self, self.facts.sequences(args, kwargs), kind)
        return None

    def _encoder_post(self, module, args, output):
        run, self.run = self.run, None
        if run is None or not run.started:
            return None
        if not self.facts.reexpand:
            run.finish()
            return None
        for name in ("last_hidden_state",):
            value = getattr(output, name, None)
            if value is not None:
                setattr(output, name, run.reexpand(value))
        hs = getattr(output, "hidden_states", None)
        if hs is not None:
            output.hidden_states = tuple(run.reexpand(h) if h is not None else None for h in hs)
        run.finish()
        return output

    def _merger_pre(self, module, args):
        run, self.run = self.run, None
        if run is None or not run.started:
            return None
        out = run.reexpand(args[0])
        run.finish()
        return (out, *args[1:])

    def _block_call(self, i: int, block: nn.Module):
        def around(original, *args, **kwargs):
            run = self.run
            if run is None:  # the block is called outside an encoder call: leave it alone
                return original(*args, **kwargs)
            return run.block(i, block, args, kwargs)

        return around


class _Run:
    """One encoder call through the runner."""

    def __init__(self, hooks: VisionHooks, grids: list[tuple[int, int]], kind: str = "image") -> None:
        self.hooks = hooks
        self.kind = kind
        self.facts = hooks.facts
        self.patch_grids = grids
        k = self.facts.k
        side = math.isqrt(k)
        self.unit_grids = [(h // side, w // side) for h, w in grids]
        self.started = False
        # One context per encoder call: operators may keep per-call state in it (e.g. a merge schedule).
        self.ctx = OpContext(extras={"vision_info": self.facts.info})
        self.records: list[tuple[str, Tensor, float]] = []
        # id(output) -> (weakref(output), valid, index): the layout of each block output (ids of freed tensors are
        # reused, so the weak reference confirms the match).
        self.snapshots: dict[int, tuple[Any, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ layout
    def _start(self, x_native: Tensor, kwargs: dict[str, Any]) -> None:
        """Native layout -> runner layout; builds the initial TowerTokens state."""
        f = self.facts
        full = torch.tensor([f.prefix + h * w for h, w in self.patch_grids])
        self.block_tokens = {b: (full, full) for b in range(len(f.blocks))}
        k, p = f.k, f.prefix
        dev = x_native.device
        units = [f.unit_patches(g).to(dev) for g in self.patch_grids]  # [U_s, k]
        n_units = [len(u) for u in units]
        umax = max(n_units)
        s = len(units)
        self.native_units = units
        if f.packed:
            sizes = [h * w for h, w in self.patch_grids]
            offsets = torch.tensor([0, *sizes], device=dev).cumsum(0)[:-1]
            self.offsets = offsets
            cos, sin = kwargs["position_embeddings"]
            rows = torch.zeros(s, umax * k, dtype=torch.long, device=dev)
            valid_rows = torch.zeros(s, umax * k, dtype=torch.bool, device=dev)
            for i, u in enumerate(units):
                rows[i, : len(u) * k] = u.flatten() + offsets[i]
                valid_rows[i, : len(u) * k] = True
            x = x_native[rows] * valid_rows.unsqueeze(-1)
            self.cos0, self.sin0 = cos[rows], sin[rows]  # [S, U*k, d] in the initial runner layout
        else:
            idx = torch.stack([u.flatten() for u in units]) + p  # equal grids in a padded batch
            gathered = torch.gather(x_native, 1, idx.unsqueeze(-1).expand(-1, -1, x_native.shape[-1]))
            x = torch.cat([x_native[:, :p], gathered], 1)
            self.cos0 = self.sin0 = None
        valid = torch.zeros(s, umax, dtype=torch.bool, device=dev)
        for i, n in enumerate(n_units):
            valid[i, :n] = True
        index = torch.where(valid, torch.arange(umax, device=dev).expand(s, umax), -1)
        self.tokens = TowerTokens(
            x=x.new_zeros(s, umax, 0),
            prefix=x[:, :p],
            valid=valid,
            index=index,
            sizes=valid.to(x.dtype if x.is_floating_point() else torch.float32),
            owner=torch.where(valid, index, -1),
            protected=torch.zeros_like(valid),
            grid=tuple(self.unit_grids),
        )
        self.x = x
        self.started = True

    def _row_index(self) -> Tensor:
        """``[S, P + U*k]`` long: each runner row's initial-layout row (for rotary gathering)."""
        t, k, p = self.tokens, self.facts.k, self.facts.prefix
        base = (t.index.clamp_min(0) * k).unsqueeze(-1) + torch.arange(k, device=t.index.device)
        return torch.cat([torch.arange(p, device=base.device).expand(len(base), p), base.flatten(1) + p], 1)

    def _row_valid(self) -> Tensor:
        t, k, p = self.tokens, self.facts.k, self.facts.prefix
        pre = torch.ones(t.valid.shape[0], p, dtype=torch.bool, device=t.valid.device)
        return torch.cat([pre, t.valid.repeat_interleave(k, dim=1)], 1)

    # ------------------------------------------------------------------ blocks
    def block(self, i: int, block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        x_in = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not self.started:
            self._start(x_in, kwargs)
        parts = self.facts.parts(block)
        x = self.x
        valid = self._row_valid()
        cos = sin = None
        if self.cos0 is not None:
            rows = self._row_index() - self.facts.prefix
            cos = torch.gather(self.cos0, 1, rows.unsqueeze(-1).expand(-1, -1, self.cos0.shape[-1]))
            sin = torch.gather(self.sin0, 1, rows.unsqueeze(-1).expand(-1, -1, self.sin0.shape[-1]))
        n_in = self.tokens.valid.sum(1) * self.facts.k + self.facts.prefix
        h = parts.norm1(x)
        q, k, v = parts.qkv(h, cos, sin)
        bias = self._key_bias(valid, x.dtype)
        if i in self.facts.window_blocks:
            bias = self._window_bias(valid, bias, x.dtype)
        names = self.hooks.signals.get(i)
        if names:
            self._signals(i, names, q, k, v, valid, bias, parts.scale)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)
        a = parts.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        x = x + (parts.ls1(a) if parts.ls1 is not None else a)
        ops = self.hooks.points.get((i, "mid"))
        if ops:
            keys = k.mean(1)  # [S, L, d], ToMe's metric: keys averaged over heads
            x = self._apply(ops, x, i, "mid", keys)
        self.block_tokens[i] = (n_in, self.tokens.valid.sum(1) * self.facts.k + self.facts.prefix)
        m = parts.mlp(parts.norm2(x))
        x = x + (parts.ls2(m) if parts.ls2 is not None else m)
        ops = self.hooks.points.get((i, "post"))
        if ops:
            x = self._apply(ops, x, i, "post", None)
        self.x = x
        self.snapshots[id(x)] = (weakref.ref(x), self.tokens.valid, self.tokens.index)
        return x

    def _key_bias(self, valid: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Additive ``[S, 1, 1, L]`` key mask: padding rows hidden, ``log(size)`` added when asked for."""
        pad = not bool(valid.all())
        size_bias = self.tokens.size_bias
        if not pad and not size_bias:
            return None
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        if size_bias:
            k, p = self.facts.k, self.facts.prefix
            sizes = self.tokens.sizes.clamp_min(1).repeat_interleave(k, dim=1).to(dtype)
            bias[:, p:] = sizes.log()
        bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
        return bias[:, None, None, :]

    def _window_bias(self, valid: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``[S, 1, L, L]``: the key mask plus window attention (keys outside a query's window hidden)."""
        t, k, p = self.tokens, self.facts.k, self.facts.prefix
        win = torch.full(t.index.shape, -1, dtype=torch.long, device=t.index.device)
        for s, grid in enumerate(self.patch_grids):
            w = self.facts.unit_windows(grid).to(win.device)
            sel = t.valid[s]
            win[s, sel] = w[t.index[s, sel]]
        rows = torch.cat(
            [torch.full((len(win), p), -2, device=win.device, dtype=torch.long), win.repeat_interleave(k, dim=1)], 1
        )
        same = rows.unsqueeze(2) == rows.unsqueeze(1)
        out = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)
        out = out.unsqueeze(1)
        return out + (bias if bias is not None else 0)

    def _signals(self, i: int, names: set[str], q, k, v, valid: Tensor, bias: Tensor | None, scale: float) -> None:
        t, kk, p = self.tokens, self.facts.k, self.facts.prefix
        s, _, L, _ = q.shape

        def per_unit(col: Tensor) -> Tensor:  # [S, L] -> [S, U, k] (patch slots of each unit)
            return col[:, p:].reshape(s, -1, kk)

        qf, kf = q.float(), k.float()
        b = None if bias is None else bias.float()
        if f"cls_attn@{i}" in names:
            logits = torch.einsum("shd,shld->shl", qf[:, :, 0], kf) * scale
            if b is not None:
                logits = logits + b[:, :, 0]  # [S, 1, L]: the key mask of query 0
            t.scores[f"cls_attn@{i}"] = per_unit(torch.softmax(logits, -1).mean(1))
        if f"mean_received@{i}" in names:
            # Column mean over the valid queries that can attend to each key (all of them under full attention,
            # the key's window under window attention), averaged over heads.
            acc = torch.zeros(s, L, device=q.device)
            seen = torch.zeros(s, L, device=q.device)
            for c in range(0, L, _QUERY_CHUNK):
                logits = torch.einsum("shqd,shkd->shqk", qf[:, :, c : c + _QUERY_CHUNK], kf) * scale
                rows = b[:, :, c : c + _QUERY_CHUNK] if b is not None and b.shape[2] > 1 else b
                if rows is not None:
                    logits = logits + rows
                probs = torch.softmax(logits, -1).mean(1)  # [S, q, L], averaged over heads
                vq = valid[:, c : c + _QUERY_CHUNK, None]
                acc += (probs * vq).sum(1)
                visible = vq & valid[:, None, :]
                if rows is not None and rows.shape[2] > 1:
                    visible = visible & (rows[:, 0] > torch.finfo(rows.dtype).min / 2)
                seen += visible.sum(1)
            t.scores[f"mean_received@{i}"] = per_unit(acc / seen.clamp_min(1))
        if f"value_norm@{i}" in names:
            norm = v.float().transpose(1, 2).reshape(s, L, -1).norm(dim=-1)
            t.scores[f"value_norm@{i}"] = per_unit(norm)

    def _apply(self, ops: list[Any], x: Tensor, block: int, point: str, keys: Tensor | None) -> Tensor:
        f = self.facts
        kk, p = f.k, f.prefix
        t = self.tokens
        s, _, c = x.shape
        t.x = x[:, p:].reshape(s, -1, kk * c)
        t.prefix = x[:, :p]
        if keys is not None:
            t.keys = keys[:, p:].reshape(s, -1, kk, keys.shape[-1]).sum(2)
            t.prefix_keys = keys[:, :p]
        t.block, t.point = block, point
        self.ctx.extras.update(block=block, point=point)
        for op in ops:
            t0 = time.perf_counter()
            t = op.apply_tower(t, self.ctx)
            self.records.append((op.name, t.counts, time.perf_counter() - t0))
        self.tokens = t
        out = torch.cat([t.prefix, t.x.reshape(s, -1, c)], 1)
        t.x = t.x.new_zeros(s, t.x.shape[1], 0)  # the runner keeps x itself
        t.keys = t.prefix_keys = None
        return out

    # ------------------------------------------------------------------ outputs
    def reexpand(self, y: Tensor) -> Tensor:
        """A runner-layout hidden state -> the native layout (placeholders where units are gone)."""
        entry = self.snapshots.get(id(y))
        snap = entry[1:] if entry is not None and entry[0]() is y else None
        f = self.facts
        if f.packed:
            native_len = sum(h * w for h, w in self.patch_grids)
            is_native = y.ndim == 2 and y.shape[0] == native_len
        else:
            native_len = f.prefix + self.patch_grids[0][0] * self.patch_grids[0][1]
            is_native = y.shape[1] == native_len
        if snap is None:
            if is_native:
                return y  # captured before the runner took over: already native
            snap = (self.tokens.valid, self.tokens.index)  # a row-wise function of the last block's output
        valid, index = snap
        kk, p = f.k, f.prefix
        s = y.shape[0]
        c = y.shape[-1]
        units = y[:, p:].reshape(s, -1, kk, c)
        if f.packed:
            total = sum(h * w for h, w in self.patch_grids)
            out = y.new_zeros(total, c)
            for i in range(s):
                sel = valid[i]
                rows = self.native_units[i][index[i, sel]] + self.offsets[i]  # [n, k]
                out[rows.flatten()] = units[i, sel].reshape(-1, c)
            return out
        out = y.new_zeros(s, native_len, c)
        out[:, :p] = y[:, :p]
        for i in range(s):
            sel = valid[i]
            rows = self.native_units[i][index[i, sel]] + p
            out[i, rows.flatten()] = units[i, sel].reshape(-1, c)
        return out

    def finish(self) -> None:
        t = self.tokens
        t.x = t.x[:, :, :0]
        blocks = [self.block_tokens[b] for b in sorted(self.block_tokens)]
        self.hooks.adapter.on_tower_result(TowerResult(t, list(self.unit_grids), self.records, self.kind, blocks))


# ---------------------------------------------------------------------- folding into LLM rows
def fold_vision_results(
    adapter: Adapter,
    batch: list[VisualTokens],
    spans: list[VisualSpans],
    pending: list[TowerResult],
    input_ids: Tensor,
    report: Report,
) -> list[VisualTokens]:
    """Apply what the encoder did to each sample's LLM-row tokens.

    ``adapter.tower_rows(spans, pending)`` gives, per sample, the ``(result, sequence, unit)`` of every
    visual row (``-1`` for rows that do not come from a unit, e.g. newlines), optionally with a ``line`` id:
    a row from no unit that shares a line id with unit rows (a newline closing a canvas line) stays only while
    one of them does. A unit row stays iff its unit is the representative of a kept unit; its ``sizes``,
    ``scores`` (summed per unit) and ``protected`` come from that unit, and the units merged into it are
    recorded in ``owner``.
    """
    return _fold(batch, vision_rows(adapter, spans, pending, input_ids), pending, report)


def vision_rows(adapter: Adapter, spans: list[VisualSpans], pending: list[TowerResult], input_ids: Tensor):
    """``adapter.tower_rows`` for every sample, also when ``generate`` repeated the samples (beams) after the
    encoder ran on them: then consecutive groups of identical rows share their group's mapping."""
    from vtr.adapters.base import MetadataMismatch

    bsz = len(spans)
    try:
        return adapter.tower_rows(spans, pending)
    except MetadataMismatch as err:
        for e in range(2, bsz + 1):
            if bsz % e:
                continue
            groups = input_ids.view(bsz // e, e, -1)
            if not bool((groups == groups[:, :1]).all()):
                continue
            try:
                unique = adapter.tower_rows(spans[::e], pending)
            except MetadataMismatch:
                continue
            return [r for r in unique for _ in range(e)]
        raise err


def _fold(batch, rows, pending, report):
    out = []
    for b, (tokens, mapping) in enumerate(zip(batch, rows, strict=True)):
        res_id, seq, unit = mapping[:3]
        line = mapping[3] if len(mapping) > 3 else None
        n = len(tokens)
        if n == 0:
            out.append(tokens)
            continue
        dev = tokens.embeds.device
        from_tower = res_id >= 0
        keep = ~from_tower.clone()
        owner_unit = torch.full((n,), -1, dtype=torch.long, device=dev)  # LLM row of each row's owning token
        sizes = torch.ones(n, device=dev)
        protected = torch.zeros(n, dtype=torch.bool, device=dev)
        scores: dict[str, Tensor] = {}
        # Rows of tower units: look up the unit's token in its result.
        key_to_row: dict[tuple[int, int, int], int] = {}
        for r in from_tower.nonzero().flatten().tolist():
            key_to_row[(int(res_id[r]), int(seq[r]), int(unit[r]))] = r
        for r in from_tower.nonzero().flatten().tolist():
            res = pending[int(res_id[r])].tokens
            s, u = int(seq[r]), int(unit[r])
            j = int(res.owner[s, u])
            if j < 0:
                continue  # dropped
            rep = int(res.index[s, j])
            owner_unit[r] = key_to_row.get((int(res_id[r]), s, rep), -1)
            if rep == u:
                keep[r] = True
                sizes[r] = float(res.sizes[s, j])
                protected[r] = bool(res.protected[s, j])
                for name, val in res.scores.items():
                    if name not in scores:
                        scores[name] = torch.zeros(n, device=dev)
                    scores[name][r] = val[s, j].float().sum()
        if line is not None:
            # Rows from no unit that close a line (LLaVA-NeXT newlines) stay only while their line keeps a token.
            lid = line.to(dev)
            closers = (~from_tower & (lid >= 0)).nonzero().flatten()
            if len(closers):
                live = torch.zeros(int(lid.max()) + 1, dtype=torch.bool, device=dev)
                live[lid[from_tower & keep & (lid >= 0)]] = True
                keep[closers] = live[lid[closers]]
        for name, val in scores.items():
            tokens.scores[name] = val
        tokens.sizes = sizes
        tokens.protected = protected
        # Encoder provenance: the sequence within the row's image (its first sequence is 0) and the unit.
        first = torch.zeros(n, dtype=torch.long)
        for im in tokens.layout:
            sl = slice(im.offset, im.offset + im.n_tokens)
            mine = from_tower[sl]
            if bool(mine.any()):
                first[sl] = seq[sl][mine].min()
        tokens.encoder = torch.stack([torch.where(from_tower, seq - first, -1), torch.where(from_tower, unit, -1)], 1)
        tokens.encoder = tokens.encoder.to(dev)
        rows_idx = torch.arange(n, device=dev)
        if bool((from_tower & (owner_unit >= 0) & (owner_unit != rows_idx)).any()):
            tokens.owner = torch.where(from_tower, owner_unit, rows_idx)
        kept = tokens.take(keep.nonzero().flatten())
        report.details.setdefault("tower_tokens", []).append(_sample_block_tokens(pending, res_id, seq))
        records = _op_records(pending, res_id, seq, extra=int((~from_tower & keep).sum()))
        prev = n
        for i, (name, count, seconds) in enumerate(records):
            if i == len(records) - 1:
                report.add(sample=b, stage="vision", operator=name, before=tokens, after=kept, seconds=seconds)
            else:
                report.add_counts(
                    sample=b, stage="vision", operator=name, tokens_in=prev, tokens_out=count, seconds=seconds
                )
            prev = count
        out.append(kept)
    return out


def _sample_block_tokens(pending: list[TowerResult], res_id: Tensor, seq: Tensor) -> list[tuple[int, int]]:
    """Per encoder block: the tokens the sample's sequences had entering its attention and its MLP."""
    used = {(int(a), int(b)) for a, b in zip(res_id.tolist(), seq.tolist(), strict=True) if a >= 0}
    out: list[tuple[int, int]] = []
    for ri, res in enumerate(pending):
        for b, (n_in, n_mid) in enumerate(res.block_tokens):
            a = sum(int(n_in[s]) for (r, s) in used if r == ri)
            m = sum(int(n_mid[s]) for (r, s) in used if r == ri)
            if b < len(out):
                out[b] = (out[b][0] + a, out[b][1] + m)
            else:
                out.append((a, m))
    return out


def _op_records(pending: list[TowerResult], res_id: Tensor, seq: Tensor, extra: int) -> list[tuple[str, int, float]]:
    """Per vision operator, in order: the sample's visual rows after its last application, and its time.

    ``extra`` rows (newlines) come from no unit and always count.
    """
    used = {(int(a), int(b)) for a, b in zip(res_id.tolist(), seq.tolist(), strict=True) if a >= 0}
    order: list[str] = []
    last: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for ri, res in enumerate(pending):
        final: dict[str, Tensor] = {}
        for name, counts, sec in res.records:
            if name not in seconds:
                order.append(name)
                seconds[name] = 0.0
            seconds[name] += sec
            final[name] = counts
        for name, counts in final.items():
            last[name] = last.get(name, 0) + sum(int(counts[s]) for (r, s) in used if r == ri)
    return [(name, last[name] + extra, seconds[name]) for name in order]


def report_tower_result(result: TowerResult) -> Report:
    """A report with one sample per encoder sequence (models whose output is the encoder's, e.g. timm)."""
    from vtr.report import Report
    from vtr.tokens import ImageLayout

    t = result.tokens
    s, n0 = t.owner.shape
    report = Report(original_tokens=[n0] * s)
    for i in range(s):
        h, w = result.grids[i]
        layout = (ImageLayout(offset=0, n_tokens=n0, grids=((1, h, w),)),)
        before = VisualTokens.from_layout(t.owner.new_zeros(n0, 0).float(), layout)
        idx = t.index[i][t.valid[i]]
        after = before.take(idx)
        o = t.owner[i]
        rank = torch.full((t.valid.shape[1],), -1, dtype=torch.long, device=o.device)
        rank[t.valid[i].nonzero().flatten()] = torch.arange(len(idx), device=o.device)
        owner = torch.where(o >= 0, rank[o.clamp_min(0)], -1)
        if not torch.equal(owner, after.owner_map()):
            after.owner = owner
        after.sizes = t.sizes[i][t.valid[i]].float()
        recs = result.records
        for j, (name, counts, seconds) in enumerate(recs):
            final = all(r[0] != name for r in recs[j + 1 :])
            if not final:
                continue
            if name == recs[-1][0]:
                report.add(sample=i, stage="vision", operator=name, before=before, after=after, seconds=seconds)
            else:
                report.add_counts(
                    sample=i, stage="vision", operator=name, tokens_in=n0, tokens_out=int(counts[i]), seconds=seconds
                )
    return report


def pixel_grids(patch_size: int) -> Callable[[tuple, dict], list[tuple[int, int]]]:
    """``sequences`` for encoders called with ``pixel_values`` ``[S, 3, H, W]``: one ``(H/p, W/p)`` per image."""

    def grids(args: tuple, kwargs: dict) -> list[tuple[int, int]]:
        pv = kwargs.get("pixel_values", args[0] if args else None)
        if pv is None or pv.ndim != 4:
            shape = getattr(pv, "shape", pv)
            raise ValueError(f"vtr expected pixel_values [S, 3, H, W] in the vision encoder, got {shape}")
        return [(pv.shape[-2] // patch_size, pv.shape[-1] // patch_size)] * pv.shape[0]

    return grids


def image_rows(
    spans: list[VisualSpans], results: list[TowerResult], kind: str, seqs_of: Callable[[Any], list[tuple[int, int]]]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Row mapping for families whose every image/video maps its layout groups to consecutive sequences.

    ``seqs_of(layout)`` gives, for one image (or video) of ``kind``, ``(n_rows_per_sequence, n_sequences)``
    pairs in layout order — the rows of a group are the units of one sequence in raster order. Images
    (videos) take the sequences of the result of that kind in batch order; rows beyond the grids
    (newlines) map to ``-1``.
    """
    which = [i for i, r in enumerate(results) if r.kind == kind]
    out = []
    cursor = 0
    res_i = which[0] if which else -1
    for s in spans:
        n = len(s.seq_pos)
        res = torch.full((n,), -1, dtype=torch.long)
        seq = torch.full((n,), -1, dtype=torch.long)
        unit = torch.full((n,), -1, dtype=torch.long)
        for im in s.layout:
            if im.kind != kind:
                continue
            if res_i < 0:
                raise ValueError(f"no vision-stage result for the {kind}s of this call (were they encoded?)")
            row = im.offset
            for per_seq, n_seq in seqs_of(im):
                for _ in range(n_seq):
                    sl = slice(row, row + per_seq)
                    res[sl], seq[sl], unit[sl] = res_i, cursor, torch.arange(per_seq)
                    row += per_seq
                    cursor += 1
        out.append((res, seq, unit))
    check_sequences_used(results, which, cursor)
    return out


def check_sequences_used(results: list[TowerResult], which: list[int], used: int) -> None:
    """Raise ``MetadataMismatch`` unless the rows used exactly the encoder sequences of the result ``which[0]``
    (``generate`` may have repeated the samples after encoding them: the splice then retries per group)."""
    from vtr.adapters.base import MetadataMismatch

    have = results[which[0]].tokens.owner.shape[0] if which else 0
    if used != have:
        raise MetadataMismatch(f"the LLM input holds visual rows of {used} encoder sequences, the encoder ran {have}")
