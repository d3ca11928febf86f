"""Decoder-layer hooks: ``prefill`` operators between LLM layers, per-layer caches while decoding.

During prefill, a forward pre-hook on every decoder layer

* captures the attention signals operators declared for that layer (``text_attn@L``,
  ``text_rows_attn@L``), recomputed from the layer's own q/k projections with its RoPE — never by
  switching the model to eager attention;
* before layer ``K`` of a ``prefill`` operator, runs the operator per sample on the visual rows the
  layer would see, gathers the kept rows of the hidden states, their positions (``position_embeddings``
  and ``position_ids``) and builds a fresh attention mask; every later layer gets the shrunk inputs.

Each layer's KV cache therefore holds exactly the rows that layer saw. While decoding, layers whose
cache is shorter than layer 0's get their own 4-D mask (the model builds one for layer 0's length);
positions continue as if nothing had been pruned, for every layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vtr.adapters.state import CallState, LayerState
from vtr.ops.base import OpContext

if TYPE_CHECKING:  # pragma: no cover
    from vtr.adapters.base import Adapter

__all__ = ["DecoderFacts", "DecoderHooks", "additive_mask", "parse_signal"]


def parse_signal(name: str) -> tuple[str, int]:
    """``"text_attn@2"`` -> ``("text_attn", 2)``; raises naming the signal when it is malformed."""
    kind, _, layer = name.partition("@")
    try:
        return kind, int(layer)
    except ValueError:
        raise ValueError(f"malformed signal name {name!r}: expected '<kind>@<layer index>'") from None


@dataclass
class DecoderFacts:
    """The decoder layers of a Llama/Qwen2-style language model and how their attention computes q/k.

    Attributes:
        layers: the ``nn.ModuleList`` of decoder layers (each with ``input_layernorm`` and ``self_attn``
            holding ``q_proj``/``k_proj`` and optional ``q_norm``/``k_norm``).
        rope: the ``apply_rotary_pos_emb(q, k, cos, sin)`` of the model's own module (M-RoPE models pass
            their recomposed ``cos``/``sin``, so the same call applies).
    """

    layers: nn.ModuleList
    rope: Any

    @classmethod
    def from_language_model(cls, lm: nn.Module) -> DecoderFacts:
        layers = getattr(lm, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise TypeError(f"{type(lm).__name__} has no decoder `layers`: vtr cannot host prefill operators")
        attn = layers[0].self_attn
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        for name in ("q_proj", "k_proj"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} has no {name}: vtr cannot recompute its attention rows")
        if rope is None:
            raise TypeError(f"{type(attn).__module__} has no apply_rotary_pos_emb: cannot recompute attention rows")
        return cls(layers=layers, rope=rope)

    def qk(self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated queries ``[B, H, L, d]`` and keys ``[B, H, L, d]`` (KV heads repeated) of ``layer``."""
        mod = self.layers[layer]
        attn = mod.self_attn
        x = mod.input_layernorm(hidden)
        bsz, length, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x).view(bsz, length, -1, hd)
        k = attn.k_proj(x).view(bsz, length, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        return q, k

    def attention_rows(
        self, layer: int, hidden: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, key_valid: Tensor
    ) -> Tensor:
        """Softmax attention of query ``rows`` over all keys, averaged over heads, for ONE sample.

        Args:
            hidden: ``[1, L, D]`` the layer's input for this sample; ``cos``/``sin`` its position embeddings.
            rows: ``[Q]`` query positions; each attends to the valid keys at or before it (causal).
            key_valid: ``[L]`` bool, non-padding keys.

        Returns:
            ``[Q, L]`` fp32 attention probabilities (0 on masked keys).
        """
        q, k = self.qk(layer, hidden, cos, sin)
        attn = self.layers[layer].self_attn
        scale = getattr(attn, "scaling", attn.head_dim**-0.5)
        logits = torch.einsum("hqd,hkd->hqk", q[0, :, rows].float(), k[0].float()) * scale
        pos = torch.arange(k.shape[2], device=k.device)
        allowed = key_valid.view(1, -1) & (pos.view(1, -1) <= rows.view(-1, 1))
        logits = logits.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        return torch.softmax(logits, dim=-1).mean(0)


def additive_mask(key_valid: Tensor, q_len: int, dtype: torch.dtype, causal_offset: int | None = None) -> Tensor:
    """4-D additive attention mask ``[B, 1, q, K]`` (0 = attend, ``finfo.min`` = masked).

    ``key_valid`` is ``[B, K]`` bool. With ``causal_offset = K - q`` (the default) query ``i`` sees keys
    ``j <= causal_offset + i``. A query row with no visible key (a padding row) sees itself, so padded
    rows never produce NaN.
    """
    bsz, k_len = key_valid.shape
    off = k_len - q_len if causal_offset is None else causal_offset
    qpos = torch.arange(q_len, device=key_valid.device).view(-1, 1) + off
    kpos = torch.arange(k_len, device=key_valid.device).view(1, -1)
    allowed = key_valid.view(bsz, 1, 1, k_len) & (kpos <= qpos).view(1, 1, q_len, k_len)
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & (kpos == qpos).view(1, 1, q_len, k_len))
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class DecoderHooks:
    """Pre-hooks on every decoder layer: signals, ``prefill`` operators, per-layer decode masks."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.facts = adapter.decoder()
        self.handles: list[Any] = []
        pipeline = adapter.reducer.pipeline
        self.ops = pipeline.for_stage("prefill")
        self.cache_ops = pipeline.for_stage("decode")
        n = len(self.facts.layers)
        for op in self.cache_ops:
            for i in op.cache_layers(n):
                if not 1 <= i < n:
                    raise ValueError(
                        f"{op.name} compacts layer {i}; allowed: layers 1..{n - 1} (layer 0's cache length is what "
                        "generate counts positions from)"
                    )
        self.op_layers: dict[int, list] = {}
        for op in self.ops:
            layers = list(op.layer_indices(n))
            if not layers or layers != sorted(set(layers)) or not all(0 <= i < n for i in layers):
                raise ValueError(
                    f"{op.name} acts before decoder layers {layers}; expected ascending, distinct layers in "
                    f"0..{n - 1} (the language model has {n} layers)"
                )
            for layer in layers:
                self.op_layers.setdefault(layer, []).append(op)
        self.signal_layers: dict[int, set[str]] = {}
        for op in self.ops:
            for sig in op.required_signals(n):
                kind, layer = parse_signal(sig)
                if kind not in ("text_attn", "text_rows_attn"):
                    raise ValueError(
                        f"{op.name} asks for signal {sig!r}; decoder layers provide 'text_attn@L' and "
                        "'text_rows_attn@L'"
                    )
                if not 0 <= layer < n:
                    raise ValueError(f"{op.name} asks for {sig!r} but the language model has layers 0..{n - 1}")
                self.signal_layers.setdefault(layer, set()).add(sig)
        impl = getattr(adapter.language_model().config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"prefill/decode-stage operators support the 'sdpa' and 'eager' attention implementations; "
                f"this model uses {impl!r}"
            )
        self._prefill: _Prefill | None = None

    def install(self) -> None:
        for i, layer in enumerate(self.facts.layers):
            self.handles.append(
                layer.register_forward_pre_hook(lambda m, a, k, i=i: self._pre(i, a, k), with_kwargs=True)
            )
        if self.cache_ops:
            self.handles.append(self.adapter.language_model().register_forward_hook(self._lm_post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._prefill = None

    # ------------------------------------------------------------------ dispatch
    def _pre(self, i: int, args: tuple, kwargs: dict[str, Any]):
        if self.adapter.paused:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls = self.adapter.calls
        state = calls.current
        if state is not None and i == 0:
            self._prefill = _Prefill(state, hidden.shape[1])
        if self._prefill is not None and self._prefill.state is state and state is not None:
            return self._prefill_layer(i, args, kwargs, hidden, cache)
        st = calls.for_cache(cache)
        if st is not None and st.layers is not None:
            return self._decode_layer(i, st, args, kwargs, hidden, cache)
        return None

    # ------------------------------------------------------------------ prefill
    def _prefill_layer(self, i: int, args, kwargs, hidden: Tensor, cache):
        pf = self._prefill
        state = pf.state
        if i in self.op_layers:
            hidden, kwargs = self._apply_ops(i, hidden, kwargs)
        elif pf.kwargs is not None:
            kwargs = {**kwargs, **pf.kwargs}
        if i in self.signal_layers:
            self._capture(i, hidden, kwargs)
        pf.record(i, hidden.shape[1])
        if i == len(self.facts.layers) - 1:
            state.layers = pf.layers if pf.changed else None
            visual, total = pf.layer_counts()
            state.report.set_layer_tokens(visual, total, self.adapter.language_model().config, hidden.dtype)
            if self.cache_ops:
                self._compact = (pf, hidden)
            self._prefill = None
        new_args = (hidden, *args[1:]) if args else args
        if not args:
            kwargs = {**kwargs, "hidden_states": hidden}
        return new_args, kwargs

    def _capture(self, i: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        """Fill the signals declared for layer ``i`` into ``pf.scores`` (per sample, visual rows only)."""
        pf = self._prefill
        cos, sin = kwargs["position_embeddings"]
        for b in range(hidden.shape[0]):
            rows, vis = pf.sample_rows(b)
            valid = pf.row_valid(b)
            vis = vis & valid
            if not bool(vis.any()):
                continue
            sl = pf.slot(b)
            h, c, s = hidden[b : b + 1, sl], cos[b : b + 1, sl], sin[b : b + 1, sl]
            names = self.signal_layers[i]
            if any(n.startswith("text_attn@") for n in names):
                last = valid.nonzero()[-1]
                att = self.facts.attention_rows(i, h, c, s, last, valid)[0]
                pf.scores[b][f"text_attn@{i}"] = att[vis]
            if any(n.startswith("text_rows_attn@") for n in names):
                first_vis = int(vis.nonzero()[0])
                text = (valid & ~vis).nonzero().flatten()
                text = text[text > first_vis]
                att = self.facts.attention_rows(i, h, c, s, text, valid) if len(text) else h.new_zeros(0, len(rows))
                pf.scores[b][f"text_rows_attn@{i}"] = att[:, vis].T.contiguous()

    def _apply_ops(self, i: int, hidden: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Run the ``prefill`` operators acting before layer ``i``; return the shrunk inputs."""
        import time

        pf = self._prefill
        state = pf.state
        if pf.kwargs is not None:
            kwargs = {**kwargs, **pf.kwargs}
        new_rows: list[Tensor] = []
        for b in range(hidden.shape[0]):
            rows, vis = pf.sample_rows(b)
            tokens = pf.visual_tokens(b, hidden)
            ctx = OpContext(sample=b, extras={"layer": i, "model": self.adapter.model})
            for op in self.op_layers[i]:
                t0 = time.perf_counter()
                out = op.apply(tokens, ctx)
                dt = time.perf_counter() - t0
                if not _is_subset(out, tokens):
                    raise ValueError(f"{op.name} merged or invented tokens in the prefill stage: only subsets allowed")
                state.report.add(sample=b, stage="prefill", operator=op.name, before=tokens, after=out, seconds=dt)
                tokens = out
            keep_vis = torch.isin(pf.vis_index[b][rows][vis], tokens.index)
            keep = ~vis.clone()
            keep[vis] = keep_vis
            new_rows.append(rows[keep])
            pf.tokens[b] = tokens
            pf.scores[b] = {k: v for k, v in tokens.scores.items() if k in pf.scores[b]}
        return pf.shrink(new_rows, hidden, kwargs)

    # ------------------------------------------------------------------ decode stage
    def _lm_post(self, module, args, output):
        pending, self._compact = getattr(self, "_compact", None), None
        if pending is None or self.adapter.paused:
            return None
        cache = getattr(output, "cache", None)
        if cache is None:
            return None  # no cache to compact (a forward without use_cache)
        pf, hidden = pending
        self._compact_cache(pf, cache, hidden)
        return None

    def _compact_cache(self, pf: _Prefill, cache, hidden: Tensor) -> None:
        """Run the ``decode`` operators: each compacts its layers' caches to text rows + the visual subset."""
        import time

        state = pf.state
        n_layers = len(self.facts.layers)
        layers = pf.layers
        dtype = hidden.dtype
        for op in self.cache_ops:
            keep_index: list[Tensor] = []
            for b in range(pf.bsz):
                tokens = pf.visual_tokens(b, hidden)
                t0 = time.perf_counter()
                out = op.apply(tokens, OpContext(sample=b, extras={"model": self.adapter.model}))
                state.report.add(
                    sample=b,
                    stage="decode",
                    operator=op.name,
                    before=tokens,
                    after=out,
                    seconds=time.perf_counter() - t0,
                )
                keep_index.append(out.index)
            for i in op.cache_layers(n_layers):
                layers[i] = _compact_layer(cache.layers[i], layers[i], pf, keep_index, state.left)
        state.layers = layers
        visual, total = [], []
        for b in range(pf.bsz):
            vis = state.visual[b]
            visual.append([int(vis[lay.rows[b]].sum()) for lay in layers])
            total.append([int(lay.mask[b].sum()) for lay in layers])
        state.report.set_layer_tokens(state.report.layer_tokens, total, self.adapter.language_model().config, dtype)
        del visual

    # ------------------------------------------------------------------ decode
    def _decode_layer(self, i: int, st: CallState, args, kwargs, hidden: Tensor, cache):
        lay = st.layers[i]
        base = st.layers[0]
        # The model's mask fits layer 0's cache: a layer with another length or other padding columns (a sample
        # that kept all its rows can keep the batch length while the others shrank) needs its own.
        if lay.length == base.length and torch.equal(lay.mask.to(base.mask.device), base.mask):
            return None
        past = int(cache.get_seq_length(i)) if cache is not None else lay.length
        q = hidden.shape[1]
        grown = past - lay.length
        # Columns added since the prompt: from the model's 2-D mask when we can see it, else all valid.
        bsz = hidden.shape[0]
        # Columns added since the prompt: validity from the (rebased) 2-D mask of this call, when given.
        new_cols = torch.ones(bsz, grown + q, dtype=torch.bool, device=hidden.device)
        twod = st.decode_mask
        if twod is not None and twod.shape[-1] >= grown + q:
            new_cols = twod[:, twod.shape[-1] - (grown + q) :].bool().to(hidden.device)
        keys = torch.cat([lay.mask.bool().to(hidden.device), new_cols], dim=1)
        out = dict(kwargs)
        out["attention_mask"] = additive_mask(keys, q, hidden.dtype)
        return args, out


def _is_subset(out, tokens) -> bool:
    """``out`` holds some of ``tokens``' tokens unchanged (each once, same sizes): no token merged or invented.
    Tokens merged by earlier stages (``owner`` set) may pass through."""
    if len(out) > len(tokens) or len(torch.unique(out.index)) != len(out):
        return False
    if not bool(torch.isin(out.index, tokens.index).all()):
        return False
    if out.owner is None or len(out) == 0:
        return True
    order = torch.argsort(tokens.index)
    where = order[torch.searchsorted(tokens.index[order], out.index)]
    return torch.equal(out.sizes, tokens.sizes[where])


def _compact_layer(layer_cache, lay: LayerState, pf: _Prefill, keep_index: list[Tensor], left: bool) -> LayerState:
    """Keep, per sample, the text rows and the visual rows whose original index is in ``keep_index[b]``."""
    keys, values = layer_cache.keys, layer_cache.values
    bsz = keys.shape[0]
    new_rows, picks = [], []
    for b in range(bsz):
        rows = lay.rows[b]
        n = len(rows)
        slot0 = lay.length - n if left else 0
        vis_idx = pf.vis_index[b][rows]
        keep = (vis_idx < 0) | torch.isin(vis_idx, keep_index[b].to(vis_idx.device))
        new_rows.append(rows[keep])
        picks.append(keep.nonzero().flatten() + slot0)
    new_len = max(len(r) for r in new_rows)
    k_out = keys.new_zeros(bsz, keys.shape[1], new_len, keys.shape[-1])
    v_out = values.new_zeros(bsz, values.shape[1], new_len, values.shape[-1])
    mask = torch.zeros(bsz, new_len, dtype=torch.long, device=keys.device)
    for b in range(bsz):
        n = len(new_rows[b])
        sl = slice(new_len - n, new_len) if left else slice(0, n)
        k_out[b, :, sl] = keys[b, :, picks[b]]
        v_out[b, :, sl] = values[b, :, picks[b]]
        mask[b, sl] = lay.mask[b, picks[b]].to(mask.device)
    layer_cache.keys, layer_cache.values = k_out, v_out
    return LayerState(rows=new_rows, length=new_len, mask=mask)


class _Prefill:
    """Bookkeeping of one prefill while it runs through the decoder layers."""

    def __init__(self, state: CallState, length: int) -> None:
        self.state = state
        self.bsz = len(state.kept_rows)
        self.length = length
        # Per sample: positions (into the LLM input, unpadded) of the rows currently present.
        self.rows = [torch.arange(len(r), device=r.device) for r in state.kept_rows]
        self.tokens = list(state.tokens)
        self.scores: list[dict[str, Tensor]] = [{} for _ in range(self.bsz)]
        self.kwargs: dict[str, Any] | None = None  # replacement layer kwargs once rows were removed
        self.cur_len = length
        self.layers: list[LayerState] = []
        self.changed = False
        self.vis_index = []
        for b in range(self.bsz):
            idx = torch.full((len(state.kept_rows[b]),), -1, dtype=torch.long, device=state.kept_rows[b].device)
            idx[state.visual[b]] = state.tokens[b].index.to(idx.device)
            self.vis_index.append(idx)

    def slot(self, b: int) -> slice:
        n = len(self.rows[b])
        return slice(self.cur_len - n, self.cur_len) if self.state.left else slice(0, n)

    def sample_rows(self, b: int) -> tuple[Tensor, Tensor]:
        """``(rows, visual)``: present rows of sample ``b`` and which of them are visual."""
        rows = self.rows[b]
        return rows, self.state.visual[b][rows]

    def visual_tokens(self, b: int, hidden: Tensor):
        """The sample's current visual tokens with this layer's hidden states and captured signals."""
        rows, vis = self.sample_rows(b)
        idx = self.vis_index[b][rows][vis]
        tokens = self.tokens[b].sorted()
        pos = torch.searchsorted(tokens.index, idx) if len(idx) else idx
        tokens = tokens.take(pos)
        tokens.embeds = hidden[b, self.slot(b)][vis]
        if self.scores[b]:
            tokens.scores = {**tokens.scores, **self.scores[b]}
        return tokens

    def shrink(self, new_rows: list[Tensor], hidden: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Gather the kept rows of every sample, repack, and build the inputs of the following layers."""
        left = self.state.left
        new_len = max(len(r) for r in new_rows)
        bsz, _, dim = hidden.shape
        cos, sin = kwargs["position_embeddings"]
        pos_ids = kwargs.get("position_ids")
        out_h = hidden.new_zeros(bsz, new_len, dim)
        out_c = cos.new_zeros(cos.shape[0], new_len, cos.shape[-1]) if cos.shape[0] == bsz else None
        out_s = sin.new_zeros(sin.shape[0], new_len, sin.shape[-1]) if sin.shape[0] == bsz else None
        out_p = None if pos_ids is None else pos_ids.new_zeros(*pos_ids.shape[:-1], new_len)
        valid = torch.zeros(bsz, new_len, dtype=torch.bool, device=hidden.device)
        for b in range(bsz):
            old = self.slot(b)
            # Positions of the kept rows within this sample's current slice.
            local = torch.searchsorted(self.rows[b], new_rows[b])
            n = len(new_rows[b])
            sl = slice(new_len - n, new_len) if left else slice(0, n)
            out_h[b, sl] = hidden[b, old][local]
            if out_c is not None:
                out_c[b, sl] = cos[b, old][local]
                out_s[b, sl] = sin[b, old][local]
            if out_p is not None:
                src = pos_ids[..., b, old] if pos_ids.shape[-2] == bsz else pos_ids[..., 0, old]
                out_p[..., b, sl] = src[..., local]
            valid[b, sl] = True
        if out_c is None:  # position embeddings shared by the batch (no padding): expand then gather
            raise ValueError("vtr expects per-sample position embeddings [B, L, d] in prefill")
        self.rows = new_rows
        self.cur_len = new_len
        self.changed = True
        mask_valid = self.valid_mask(valid)
        self.kwargs = {
            "attention_mask": additive_mask(mask_valid, new_len, hidden.dtype),
            "position_embeddings": (out_c, out_s),
        }
        if out_p is not None:
            self.kwargs["position_ids"] = out_p
        self._valid = mask_valid
        return out_h, {**kwargs, **self.kwargs}

    def row_valid(self, b: int) -> Tensor:
        """``[n]`` bool over sample ``b``'s present rows: non-padding in the caller's mask."""
        st = self.state
        n0 = len(st.kept_rows[b])
        offset0 = st.splice.new_len - n0 if st.left else 0
        return st.splice.mask[b][offset0 + self.rows[b]].bool()

    def valid_mask(self, present: Tensor) -> Tensor:
        """Present rows that are also non-padding in the caller's mask."""
        valid = present.clone()
        for b in range(self.bsz):
            valid[b, self.slot(b)] = self.row_valid(b)
        return valid

    def record(self, i: int, length: int) -> None:
        mask = getattr(self, "_valid", None)
        if mask is None:
            mask = self.state.splice.mask.bool()
        self.layers.append(LayerState(rows=list(self.rows), length=length, mask=mask.long()))

    def layer_counts(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per sample: the visual rows and all valid rows (its KV-cache entries) each layer saw."""
        st = self.state
        visual, total = [], []
        for b in range(self.bsz):
            n0 = len(st.kept_rows[b])
            offset0 = st.splice.new_len - n0 if st.left else 0
            valid = st.splice.mask[b][offset0 : offset0 + n0].bool()
            vis = st.visual[b] & valid
            visual.append([int(vis[lay.rows[b]].sum()) for lay in self.layers])
            total.append([int(valid[lay.rows[b]].sum()) for lay in self.layers])
        return visual, total
