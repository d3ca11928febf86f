"""The Adapter protocol and the shared LLM-input splice.

An adapter knows one model family: where the visual rows sit in the LLM input, their original grid
layout, and how to splice reduced tokens back with consistent masks and positions. Operators never see
the model; they see :class:`vtr.tokens.VisualTokens`.

The splice works through two instance-level forward pre-hooks (never class patches):

* on the multimodal base model (``model.model``): remember the ``input_ids`` of the call, because
  the language model only receives ``inputs_embeds``;
* on the language model: at prefill, cut the visual rows out of the merged ``inputs_embeds``, run the
  ``pre_llm`` operators per sample, gather the kept rows, their attention-mask columns and their
  ORIGINAL position ids (or compact ones), and repack the batch; at decode, rebase the attention mask
  (``generate`` grows it from the unpruned length) and shift positions where needed.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vtr.ops.base import OpContext
from vtr.tokens import ImageLayout, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    from vtr.api import Reducer

__all__ = ["Adapter", "MetadataMismatch", "SpliceAdapter", "SpliceState", "VisionInfo", "VisualSpans"]


class MetadataMismatch(ValueError):
    """The visual rows of ``input_ids`` disagree with the captured grid metadata (counts or run lengths).

    Families raise it from :meth:`SpliceAdapter.batch_spans`; the splice then checks whether ``generate``
    repeated every sample (``num_beams`` / ``num_return_sequences``) after the metadata was captured.
    """


@dataclass
class VisualSpans:
    """Visual rows of one sample.

    Attributes:
        seq_pos: ``[N]`` long, sequence position of each visual row, in the order the layout describes
            them (grid rows of each image first, extra rows such as newlines after them). The splice
            keeps the sequence order whatever this order is.
        layout: per-image layout (``sum(n_tokens) == N``).
        drop: ``[M]`` long or ``None``, sequence positions removed before any operator runs (e.g.
            LLaVA-NeXT newline rows with ``drop_newlines=True``); they are neither candidates nor counted.
    """

    seq_pos: Tensor
    layout: tuple[ImageLayout, ...]
    drop: Tensor | None = None


@dataclass(frozen=True)
class VisionInfo:
    """What vision-stage operators (ToMe, ATS, HiRED, MustDrop) need to know about the encoder.

    Attributes:
        encoder: dotted attribute path of the vision tower from the top model (``"model.vision_tower"``).
        blocks: dotted path of the ``nn.ModuleList`` of transformer blocks (resolve with
            :meth:`Adapter.vision_blocks`).
        num_blocks: number of blocks.
        patch_size: pixels per patch side.
        unit: the token unit operators keep or merge whole: ``"patch"`` (CLIP/SigLIP), ``"merge2x2"``
            (Qwen2-VL PatchMerger: 2x2 patches -> 1 LLM token) or ``"pixel_shuffle2x2"`` (InternVL).
        unit_patches: patches per unit (1 for ``"patch"``, 4 for the 2x2 units).
        has_cls: the encoder prepends a CLS token (CLS-attention signals are available).
        feature_layer: hidden-state index the projector reads (LLaVA: -2; ``None``: the last block).
        attention: ``"full"`` (one image/tile per sequence), ``"varlen"`` (several images packed with
            ``cu_seqlens``, Qwen2-VL) or ``"window+full"`` (Qwen2.5-VL: window attention except in
            ``full_attention_blocks``).
        full_attention_blocks: blocks with full attention when ``attention == "window+full"``.
        unit_order: how rows are ordered before the LLM: ``"raster"`` (row-major grid) or
            ``"merge_blocks"`` (Qwen: the encoder sees patches grouped by 2x2 unit).
    """

    encoder: str
    blocks: str
    num_blocks: int
    patch_size: int
    unit: str = "patch"
    unit_patches: int = 1
    has_cls: bool = False
    feature_layer: int | None = None
    attention: str = "full"
    full_attention_blocks: tuple[int, ...] = ()
    unit_order: str = "raster"


def tower_vision_info(model: nn.Module, *, has_cls: bool) -> VisionInfo:
    """:class:`VisionInfo` of a LLaVA-family tower (CLIP/SigLIP at ``model.vision_tower``, one patch per token)."""
    vc = model.config.vision_config
    layer = model.config.vision_feature_layer
    return VisionInfo(
        encoder="model.vision_tower",
        blocks="model.vision_tower.encoder.layers",
        num_blocks=int(vc.num_hidden_layers),
        patch_size=int(vc.patch_size),
        unit="patch",
        unit_patches=1,
        has_cls=has_cls,
        feature_layer=int(layer) if isinstance(layer, int) else None,
        attention="full",
    )


class Adapter:
    """Base of all adapters. Subclasses set ``model_classes`` and ``supported_stages``."""

    name: ClassVar[str] = "base"
    model_classes: ClassVar[tuple[str, ...]] = ()
    supported_stages: ClassVar[tuple[str, ...]] = ()
    #: Whether the family has video inputs the ``pre_llm`` stage handles (frame groups in the layout).
    supports_video: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []

    @property
    def vision_info(self) -> VisionInfo:
        """The vision encoder description (see :class:`VisionInfo`)."""
        raise NotImplementedError(f"the {self.name} adapter does not describe its vision encoder")

    def vision_blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks (``vision_info.blocks`` resolved on this model)."""
        mod: Any = self.model
        for part in self.vision_info.blocks.split("."):
            mod = getattr(mod, part)
        return mod

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    def install(self, reducer: Reducer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class SpliceState:
    """What decoding needs to know about the last reduced prefill."""

    cache_ref: Any  # weakref to the cache object, or None
    orig_len: int  # prompt length before reduction
    new_len: int  # prompt length after reduction (= cache length after prefill)
    mask: Tensor  # [B, new_len] attention mask of the reduced prompt
    shift: Tensor  # [B] long, subtracted from original position ids (0 unless positions="compact")
    next_pos: Tensor  # [B] long, 1 + the largest ORIGINAL position id of each sample's valid prompt rows


class SpliceAdapter(Adapter):
    """Adapters whose ``pre_llm`` stage splices reduced rows into the language model's input."""

    supported_stages: ClassVar[tuple[str, ...]] = ("pre_llm",)
    #: Methods of :meth:`base_model` wrapped on the instance to see their arguments (grid metadata
    #: such as ``image_grid_thw`` or ``image_sizes``); ``generate`` calls them BEFORE the first forward.
    feature_methods: ClassVar[tuple[str, ...]] = ()
    #: Keyword arguments of the base model's forward that carry grid metadata, captured when present.
    metadata_kwargs: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ family-specific
    def base_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` (and merges visual features)."""
        return self.model.model

    def language_model(self) -> nn.Module:
        """The decoder whose forward receives the merged ``inputs_embeds``."""
        return self.model.model.language_model

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:  # pragma: no cover - abstract
        """Visual rows of one sample (``input_ids`` is ``[L]``)."""
        raise NotImplementedError

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        """Visual rows of every sample of ``input_ids`` ``[B, L]``.

        The default calls :meth:`visual_spans` per sample; families whose layout needs per-call
        metadata shared by the batch (grids listed image after image over the whole batch) override it.
        """
        return [self.visual_spans(input_ids[b]) for b in range(input_ids.shape[0])]

    def expanded_batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        """:meth:`batch_spans`, also when ``generate`` expanded the batch after capturing the metadata.

        ``generate(num_beams=E)`` / ``num_return_sequences=E`` encodes the visual inputs (and so lets the
        adapter capture their grids) BEFORE it repeats every sample ``E`` times in consecutive rows; the
        captured metadata then describes ``B / E`` samples. When the rows disagree with the metadata
        (:class:`MetadataMismatch`) and the batch consists of groups of ``E`` identical consecutive rows,
        the spans of one row per group are computed and shared by the group. ``E`` is unique: the
        metadata must be used up exactly by ``B / E`` rows.
        """
        try:
            return self.batch_spans(input_ids)
        except MetadataMismatch as err:
            bsz = input_ids.shape[0]
            for e in range(2, bsz + 1):
                if bsz % e:
                    continue
                groups = input_ids.view(bsz // e, e, -1)
                if not bool((groups == groups[:, :1]).all()):
                    continue
                try:
                    unique = self.batch_spans(input_ids[::e])
                except MetadataMismatch:
                    continue
                return [s for s in unique for _ in range(e)]
            raise err

    def default_positions(self, kwargs: dict[str, Any], batch: int, length: int, past: int, device) -> Tensor:
        """Position ids the language model would build itself when none are passed: ``[B, L]``."""
        return (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, length)

    def on_metadata(self, name: str, value: Any) -> None:
        """Record grid metadata seen in a feature-method call or a base-model kwarg (``name`` is its name)."""
        if value is not None:
            self._metadata[name] = value

    def decode_positions(self, kwargs: dict[str, Any], state: SpliceState, past: int) -> Tensor | None:
        """Position ids for a cached base-model call made with ``position_ids=None`` (``[..., B, q]``).

        Returning ``None`` lets the model build them (right for 1-D RoPE models, whose language-model
        hook rebuilds them from the unpruned length). Families that derive decode positions from state
        computed on the unpruned prompt (Qwen's ``rope_deltas``) override this.
        """
        return None

    # ------------------------------------------------------------------ hooks
    def install(self, reducer: Reducer) -> None:
        self.reducer = reducer
        self._input_ids: Tensor | None = None
        self._state: SpliceState | None = None
        self._metadata: dict[str, Any] = {}
        self._labels: Tensor | None = None
        self._label_map = None
        self._handles.append(self.model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._top_post_hook, with_kwargs=True))
        self._handles.append(self.base_model().register_forward_pre_hook(self._base_hook, with_kwargs=True))
        self._handles.append(self.language_model().register_forward_pre_hook(self._lm_hook, with_kwargs=True))
        self._handles.append(self.language_model().register_forward_hook(self._lm_post_hook))
        base = self.base_model()
        for name in self.feature_methods:
            self._handles.append(_InstanceWrapper(base, name, self.on_metadata))

    def remove(self) -> None:
        super().remove()
        self._input_ids = None
        self._state = None
        self._metadata = {}
        self._labels = None
        self._label_map = None

    def _top_hook(self, module, args, kwargs):
        # Labels are mapped onto the reduced sequence after the call (see _top_post_hook): the model must
        # not compute its loss on logits that no longer line up with them.
        self._labels = kwargs.get("labels")
        self._label_map = None
        if self._labels is None:
            return None
        out = dict(kwargs)
        out["labels"] = None
        return args, out

    def _top_post_hook(self, module, args, kwargs, output):
        labels, self._labels = self._labels, None
        if labels is None or getattr(output, "logits", None) is None:
            return None
        if self._label_map is not None:
            labels = self._label_map(labels)
        logits = output.logits
        labels = labels[:, -logits.shape[1] :].to(logits.device)
        vocab = module.config.get_text_config().vocab_size
        output.loss = module.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return output

    def _base_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = ids
        for name in self.metadata_kwargs:
            self.on_metadata(name, kwargs.get(name))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        st = self._state
        if (
            kwargs.get("position_ids") is None
            and cache is not None
            and st is not None
            and st.cache_ref is not None
            and st.cache_ref() is cache
        ):
            past = int(cache.get_seq_length())
            if past > 0:
                pos = self.decode_positions(kwargs, st, past)
                if pos is not None:
                    out = dict(kwargs)
                    out["position_ids"] = pos
                    return args, out
        return None

    def _lm_hook(self, module, args, kwargs):
        if args:
            raise TypeError("vtr expects the language model to be called with keyword arguments")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kwargs.get("cache")
        past = int(cache.get_seq_length()) if cache is not None else 0
        input_ids, self._input_ids = self._input_ids, None
        if past == 0:
            return args, self._prefill(kwargs, input_ids, cache)
        return args, self._decode(kwargs, cache, past)

    def _lm_post_hook(self, module, args, output):
        # The language model may create the cache itself (plain forward with use_cache): bind the
        # reduced-prefill state to the cache it returns, so later calls with that cache decode correctly.
        st = self._state
        cache = getattr(output, "cache", None)
        if st is not None and st.cache_ref is None and cache is not None:
            st.cache_ref = weakref.ref(cache)
        return None

    # ------------------------------------------------------------------ prefill
    def _prefill(self, kwargs: dict[str, Any], input_ids: Tensor | None, cache) -> dict[str, Any]:
        from vtr.report import Report

        embeds: Tensor = kwargs["inputs_embeds"]
        bsz, length, _ = embeds.shape
        device = embeds.device
        if input_ids is None or input_ids.shape[:2] != (bsz, length):
            raise ValueError(
                "vtr needs `input_ids` to find the visual tokens; calls with only `inputs_embeds` "
                "cannot be reduced (unwrap the model for them)"
            )
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(bsz, length, dtype=torch.long, device=device)
        elif mask.ndim != 2:
            raise ValueError("vtr needs a 2-D attention mask (or none); got a prepared 4-D mask")
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.default_positions(kwargs, bsz, length, 0, device)
        pos = pos.expand(*pos.shape[:-2], bsz, length) if pos.shape[-2] == 1 else pos

        spans = self.expanded_batch_spans(input_ids)
        self._metadata = {}
        missing = [b for b, s in enumerate(spans) if len(s.seq_pos) == 0]
        if missing:
            raise ValueError(
                f"no visual tokens found in sample(s) {missing} of this call; the {self.name} adapter looks "
                f"for token id {getattr(self, 'image_token_id', '?')}. A reduced model needs an image or "
                "video in every prompt: unwrap it (vtr.unwrap) or use `with vtr.reduced(...)` around visual "
                "calls only."
            )
        reducer = self.reducer
        report = Report(original_tokens=[len(s.seq_pos) for s in spans])
        batch = [VisualTokens.from_layout(embeds[b, s.seq_pos], s.layout) for b, s in enumerate(spans)]
        contexts = [OpContext(sample=b) for b in range(bsz)]
        batch = reducer.pipeline.run("pre_llm", batch, contexts, report)
        reducer.report = report

        compact = reducer.recipe.positions == "compact"
        rows_e, rows_m, rows_p, shifts = [], [], [], []
        kept_rows: list[Tensor] = []
        for b, (s, red) in enumerate(zip(spans, batch, strict=True)):
            red = red.sorted()
            keep = torch.ones(length, dtype=torch.bool, device=device)
            keep[s.seq_pos] = False
            if s.drop is not None:
                keep[s.drop.to(device)] = False
            kept_pos = s.seq_pos[red.index]
            keep[kept_pos] = True
            e = embeds[b].clone()
            e[kept_pos] = red.embeds.to(e.dtype)
            p = pos[..., b, :]
            removed = int(length - keep.sum())
            if compact:
                removed_before = torch.cumsum((~keep).long(), dim=0)
                p = p - removed_before
            kept_rows.append(keep.nonzero().flatten())
            rows_e.append(e[keep])
            rows_m.append(mask[b][keep])
            rows_p.append(p[..., keep])
            shifts.append(removed if compact else 0)
        new_len = max(r.shape[0] for r in rows_e)
        report.set_prompt_tokens(
            [(int(mask[b].sum()), int(rows_m[b].sum())) for b in range(bsz)],
            self.model.config.get_text_config(),
        )
        left = not bool((mask[:, -1] == 0).any())  # right padding only when some row ends in padding
        new_e = embeds.new_zeros(bsz, new_len, embeds.shape[-1])
        new_m = mask.new_zeros(bsz, new_len)
        new_p = pos.new_zeros(*pos.shape[:-2], bsz, new_len)
        for b in range(bsz):
            n = rows_e[b].shape[0]
            sl = slice(new_len - n, new_len) if left else slice(0, n)
            new_e[b, sl] = rows_e[b]
            new_m[b, sl] = rows_m[b]
            new_p[..., b, sl] = rows_p[b]
        valid = mask.bool()
        flat = pos.reshape(-1, bsz, length)
        next_pos = (flat.masked_fill(~valid, -1).amax(dim=(0, 2)) + 1).clamp_min(0)
        self._state = SpliceState(
            cache_ref=weakref.ref(cache) if cache is not None else None,
            orig_len=length,
            new_len=new_len,
            mask=new_m,
            shift=torch.tensor(shifts, device=device),
            next_pos=next_pos,
        )
        self._label_map = functools.partial(_map_labels, kept_rows=kept_rows, new_len=new_len, left=left)
        #: Sequence positions (in the unreduced prompt) each sample kept, ``[n_b]`` ascending, and the
        #: spans found: for tests, overlays and mapping labels.
        self.last_kept_rows = kept_rows
        self.last_spans = spans
        out = dict(kwargs)
        out.update(inputs_embeds=new_e, attention_mask=new_m, position_ids=new_p)
        return out

    # ------------------------------------------------------------------ decode
    def _decode(self, kwargs: dict[str, Any], cache, past: int) -> dict[str, Any]:
        st = self._state
        if st is None or st.cache_ref is None or st.cache_ref() is not cache:
            # A cache this wrapper did not fill (e.g. built before wrapping): leave the call alone.
            return kwargs
        embeds: Tensor = kwargs["inputs_embeds"]
        bsz, q = embeds.shape[:2]
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        grown = past - st.new_len  # tokens appended to the cache since the reduced prefill
        if mask is None:
            if not bool(st.mask.all()):
                # Repacking added padding the caller does not know about: the mask must stay explicit.
                ones = st.mask.new_ones(bsz, grown + q)
                out["attention_mask"] = torch.cat([st.mask, ones], dim=1)
        else:
            if mask.shape[-1] == st.orig_len + grown + q:
                out["attention_mask"] = torch.cat([st.mask.to(mask.dtype), mask[:, st.orig_len :]], dim=1)
            elif mask.shape[-1] != past + q:
                raise ValueError(
                    f"attention mask has {mask.shape[-1]} columns; expected {st.orig_len + grown + q} "
                    f"(unreduced prompt + new tokens) or {past + q} (reduced cache + new tokens)"
                )
        pos = kwargs.get("position_ids")
        shift = st.shift.to(embeds.device)
        if pos is None:
            base = self.default_positions(kwargs, bsz, q, st.orig_len + grown, embeds.device)
            out["position_ids"] = base - shift.view(bsz, 1)
        elif bool(shift.any()):
            out["position_ids"] = pos - shift.view(*([1] * (pos.ndim - 2)), -1, 1)
        return out


def _map_labels(labels: Tensor, *, kept_rows: list[Tensor], new_len: int, left: bool) -> Tensor:
    """Labels ``[B, L]`` of the unreduced prompt -> ``[B, new_len]`` on the reduced one (-100 on padding).

    Text rows keep their labels; labels of pruned visual rows disappear (they are -100 in practice: the
    next-token target of a text row is still the token that follows it).
    """
    out = labels.new_full((labels.shape[0], new_len), -100)
    for b, rows in enumerate(kept_rows):
        n = rows.shape[0]
        sl = slice(new_len - n, new_len) if left else slice(0, n)
        out[b, sl] = labels[b, rows.to(labels.device)]
    return out


class _InstanceWrapper:
    """Wrap ``module.<name>`` on the instance so ``on_call(arg_name, value)`` sees every argument.

    ``functools.wraps`` keeps the signature visible to ``inspect.signature`` (``generate`` picks the
    arguments of ``get_image_features`` from it). ``remove()`` restores the previous attribute exactly.
    """

    def __init__(self, module: nn.Module, name: str, on_call) -> None:
        import inspect

        self.module = module
        self.name = name
        self.had_instance_attr = name in module.__dict__
        self.previous = module.__dict__.get(name)
        original = getattr(module, name)
        sig = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind_partial(*args, **kwargs)
            except TypeError:
                bound = None
            if bound is not None:
                for arg, value in bound.arguments.items():
                    if arg != "kwargs":
                        on_call(arg, value)
                for arg, value in bound.arguments.get("kwargs", {}).items():
                    on_call(arg, value)
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    def remove(self) -> None:
        if self.had_instance_attr:
            setattr(self.module, self.name, self.previous)
        else:
            self.module.__dict__.pop(self.name, None)
