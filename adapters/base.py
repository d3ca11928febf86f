"""The adapter: facts about one model family. The work is done by shared hook sets.

A family adapter states facts only:

* where the visual rows sit in the LLM input and how they are laid out (:meth:`Adapter.batch_spans`),
  from ``input_ids`` plus grid metadata captured from the call (:attr:`Adapter.feature_methods`,
  :attr:`Adapter.metadata_kwargs`);
* how the language model builds positions (:meth:`Adapter.default_positions`,
  :meth:`Adapter.decode_positions`) and where its decoder layers are (:meth:`Adapter.decoder`);
* the vision encoder: its blocks, token unit, CLS token and feature layer (:class:`VisionInfo`) and,
  when the family can host vision-stage operators, how to run and re-expand it (:meth:`Adapter.tower`);
* family-only options (e.g. ``drop_newlines``), validated here, never in the core.

The hook sets in :mod:`vtr.adapters.metadata`, :mod:`vtr.adapters.splice`, :mod:`vtr.adapters.decoder`
and :mod:`vtr.adapters.vision` do the work; a per-call :class:`vtr.adapters.state.CallState` carries each
sample's tokens from stage to stage and owns the report. Everything is installed on the model instance
(hooks and instance attributes), never on a class, and removed exactly by :meth:`Adapter.remove`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vtr.tokens import ImageLayout

if TYPE_CHECKING:  # pragma: no cover
    from vtr.adapters.decoder import DecoderFacts
    from vtr.adapters.vision import TowerFacts
    from vtr.api import Reducer
    from vtr.recipes import Recipe

__all__ = ["Adapter", "MetadataMismatch", "SpliceState", "VisionInfo", "VisualSpans", "tower_vision_info"]


class MetadataMismatch(ValueError):
    """The visual rows of ``input_ids`` disagree with the captured grid metadata (counts or run lengths).

    Families raise it from :meth:`Adapter.batch_spans`; the splice then checks whether ``generate``
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
    """What vision-stage operators need to know about the encoder.

    Attributes:
        encoder: dotted attribute path of the vision tower from the top model (``"model.vision_tower"``).
        blocks: dotted path of the ``nn.ModuleList`` of transformer blocks.
        num_blocks: number of blocks.
        patch_size: pixels per patch side.
        unit: the token unit operators keep or merge whole: ``"patch"`` (CLIP/SigLIP/timm), ``"merge2x2"``
            (Qwen2-VL PatchMerger: 2x2 patches -> 1 LLM token) or ``"pixel_shuffle2x2"`` (InternVL).
        unit_patches: patches per unit (1 for ``"patch"``, 4 for the 2x2 units).
        has_cls: the encoder prepends a CLS token (CLS-attention signals are available).
        feature_layer: hidden-state index the projector reads (LLaVA: -2; ``None``: the last block).
        attention: ``"full"`` (one image/tile per sequence), ``"varlen"`` (several images packed with
            ``cu_seqlens``, Qwen2-VL) or ``"window+full"`` (Qwen2.5-VL: window attention in most blocks).
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

    @property
    def feature_block(self) -> int:
        """Index of the last block whose output reaches the features (blocks after it never matter)."""
        if self.feature_layer is None:
            return self.num_blocks - 1
        # hidden_states[0] is the embedding output, hidden_states[i] the output of block i - 1.
        return (self.feature_layer % (self.num_blocks + 1)) - 1


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


@dataclass
class SpliceState:
    """What decoding needs to know about the last reduced prefill (per call, see ``CallState``).

    Attributes:
        cache_ref: weak reference to the cache the prefill filled (``None`` until bound).
        orig_len: prompt length before reduction.
        new_len: prompt length at the LLM input after the ``pre_llm`` stage (= cache length of layer 0).
        mask: ``[B, new_len]`` attention mask of the reduced prompt.
        shift: ``[B]`` long, subtracted from original position ids (0 unless ``positions="compact"``).
        next_pos: ``[B]`` long, 1 + the largest ORIGINAL position id of each sample's valid prompt rows.
    """

    cache_ref: Any
    orig_len: int
    new_len: int
    mask: Tensor
    shift: Tensor
    next_pos: Tensor


def resolve_path(root: nn.Module, dotted: str) -> Any:
    """``root.a.b.c`` for ``dotted == "a.b.c"``."""
    mod: Any = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


class Adapter:
    """Facts about one model family; subclasses set the class attributes and the span/position facts.

    Class attributes:
        name: family name used in messages.
        model_classes: Hugging Face class names this adapter handles.
        supports_video: the family has video inputs laid out as frame groups.
        feature_methods: methods of :meth:`base_model` wrapped on the instance to see their arguments
            (grid metadata such as ``image_grid_thw``); ``generate`` calls them BEFORE the first forward.
        metadata_kwargs: keyword arguments of the base model's forward that carry grid metadata.
        options: family-only wrap options (e.g. ``("drop_newlines",)``), validated by :meth:`set_options`.
        picture: how the processor maps a picture onto the grids (see the attribute).
    """

    name: ClassVar[str] = "base"
    model_classes: ClassVar[tuple[str, ...]] = ()
    supports_video: ClassVar[bool] = False
    feature_methods: ClassVar[tuple[str, ...]] = ()
    metadata_kwargs: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()
    #: How the processor turns an uploaded picture into the visual grids (for drawing kept tokens on it):
    #: ``"crop"`` (resize + centre crop to one square grid), ``"anyres"`` (a resized base view + AnyRes tiles),
    #: ``"whole"`` (the whole picture resized to the grid), ``"tiles"`` (dynamic tiles, thumbnail last);
    #: ``None`` when not described.
    picture: ClassVar[str | None] = None
    #: Token id of the visual placeholder (used in messages).
    image_token_id: int | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        #: Grid metadata captured from the current call (``image_grid_thw``, ``image_sizes``, ...).
        self.metadata: dict[str, Any] = {}
        self.hooks: list[Any] = []  # installed hook sets (see vtr.adapters.*), removed by remove()
        self.reducer: Reducer | None = None
        #: The feature method encoding right now (``"get_image_features"``, ``"get_video_features"``), if any.
        self.encoding: str | None = None
        #: While True (see :meth:`unreduced`) every hook passes calls through untouched.
        self.paused = False

    # ------------------------------------------------------------------ selection
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # ------------------------------------------------------------------ stages
    @property
    def supported_stages(self) -> tuple[str, ...]:
        """Stages this family can host (the vision stage only where :meth:`tower` describes the encoder)."""
        stages = ["pre_llm", "prefill", "decode"]
        if self.tower() is not None:
            stages.insert(0, "vision")
        return tuple(stages)

    def tower(self) -> TowerFacts | None:
        """How to run vision-stage operators in this family's encoder, or ``None`` when it cannot host them."""
        return None

    def tower_rows(self, spans: list[VisualSpans], results: list[Any]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per sample, for every visual row (layout order): ``(result, sequence, unit)`` of the encoder unit
        it comes from, ``-1`` for rows that come from no unit (newlines). ``results`` are the vision-stage
        results of this call in encoding order (``TowerResult.kind`` tells images from videos)."""
        raise NotImplementedError(f"the {self.name} adapter does not map encoder units to LLM rows")

    def decoder(self) -> DecoderFacts:
        """The language model's decoder layers and attention (standard Llama/Qwen2-style decoders)."""
        from vtr.adapters.decoder import DecoderFacts

        return DecoderFacts.from_language_model(self.language_model())

    # ------------------------------------------------------------------ options
    def set_options(self, recipe: Recipe) -> None:
        """Apply family-only wrap options from ``recipe``; raise naming an option this family lacks."""
        for name, value in recipe.options.items():
            if name not in self.options:
                raise ValueError(
                    f"option {name}={value!r} does not apply to the {self.name} adapter"
                    + (f" (its options: {', '.join(self.options)})" if self.options else " (it has no options)")
                )
            setattr(self, name, value)

    # ------------------------------------------------------------------ modules
    def base_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` (and merges visual features)."""
        return self.model.model

    def language_model(self) -> nn.Module:
        """The decoder whose forward receives the merged ``inputs_embeds``."""
        return self.model.model.language_model

    @property
    def vision_info(self) -> VisionInfo:
        """The vision encoder description (see :class:`VisionInfo`)."""
        raise NotImplementedError(f"the {self.name} adapter does not describe its vision encoder")

    def vision_blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks (``vision_info.blocks`` resolved on this model)."""
        return resolve_path(self.model, self.vision_info.blocks)

    # ------------------------------------------------------------------ spans
    def visual_spans(self, input_ids: Tensor) -> VisualSpans:  # pragma: no cover - abstract
        """Visual rows of one sample (``input_ids`` is ``[L]``)."""
        raise NotImplementedError

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        """Visual rows of every sample of ``input_ids`` ``[B, L]``.

        The default calls :meth:`visual_spans` per sample; families whose layout needs per-call
        metadata shared by the batch (grids listed image after image over the whole batch) override it.
        """
        return [self.visual_spans(input_ids[b]) for b in range(input_ids.shape[0])]

    def expanded_batch_spans(self, input_ids: Tensor) -> tuple[list[VisualSpans], int]:
        """:meth:`batch_spans`, also when ``generate`` expanded the batch after capturing the metadata.

        ``generate(num_beams=E)`` / ``num_return_sequences=E`` encodes the visual inputs (and so lets the
        adapter capture their grids) BEFORE it repeats every sample ``E`` times in consecutive rows; the
        captured metadata then describes ``B / E`` samples. When the rows disagree with the metadata
        (:class:`MetadataMismatch`) and the batch consists of groups of ``E`` identical consecutive rows,
        the spans of one row per group are computed and shared by the group. ``E`` is unique: the
        metadata must be used up exactly by ``B / E`` rows. Returns ``(spans, E)`` (``E = 1`` unexpanded).
        """
        try:
            return self.batch_spans(input_ids), 1
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
                return [s for s in unique for _ in range(e)], e
            raise err

    @contextlib.contextmanager
    def unreduced(self):
        """Inside this block the wrapped model runs without any vtr hook acting (operators that call the model,
        e.g. QuoTA's scorer, use it); the state of the call in progress is left untouched."""
        previous, self.paused = self.paused, True
        try:
            yield self.model
        finally:
            self.paused = previous

    def video_frames(self, processor: Any) -> list[Tensor]:
        """The frames of every video of the current call, in call order, ``[F, 3, H, W]`` float in [0, 1],
        recovered from the processor outputs (for query-aware operators that score frames)."""
        raise NotImplementedError(f"the {self.name} adapter cannot recover video frames")

    def on_tower_result(self, result: Any) -> None:
        """A vision-stage result of one encoder call: it waits for the next prefill, which folds it in."""
        self.calls.pending.append(result)

    def visual_token_ids(self) -> set[int]:
        """Token ids of visual placeholder rows (image and video tokens)."""
        ids = {getattr(self, "image_token_id", None), getattr(self, "video_token_id", None)}
        return {int(i) for i in ids if i is not None}

    def on_metadata(self, name: str, value: Any) -> None:
        """Record grid metadata seen in a feature-method call or a base-model kwarg (``name`` is its name)."""
        if value is not None:
            self.metadata[name] = value

    # ------------------------------------------------------------------ positions
    def default_positions(self, kwargs: dict[str, Any], batch: int, length: int, past: int, device) -> Tensor:
        """Position ids the language model would build itself when none are passed: ``[B, L]``."""
        return (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, length)

    def decode_positions(self, kwargs: dict[str, Any], state: SpliceState, past: int) -> Tensor | None:
        """Position ids for a cached base-model call made with ``position_ids=None`` (``[..., B, q]``).

        Returning ``None`` lets the model build them (right for 1-D RoPE models, whose language-model
        hook rebuilds them from the unpruned length). Families that derive decode positions from state
        computed on the unpruned prompt (Qwen's ``rope_deltas``) override this.
        """
        return None

    # ------------------------------------------------------------------ install
    def prepare(self, reducer: Reducer) -> None:
        """Plan the hook sets the reducer's pipeline needs, validating it; the model is not touched yet."""
        from vtr.adapters.decoder import DecoderHooks
        from vtr.adapters.metadata import MetadataHooks
        from vtr.adapters.splice import SpliceHooks
        from vtr.adapters.state import CallTracker

        self.reducer = reducer
        self.calls = CallTracker()
        self.metadata = {}
        from vtr.adapters.vision import VISION_SIGNALS, VisionHooks

        stages = reducer.pipeline.stages
        hooks: list[Any] = [MetadataHooks(self), SpliceHooks(self)]
        if "prefill" in stages or "decode" in stages:
            hooks.append(DecoderHooks(self))
        n_blocks = self.vision_info.num_blocks if "vision" in self.supported_stages else 0
        encoder_ops = [op for op in reducer.pipeline.ops if op.stage in ("vision", "pre_llm")]
        signals = [sig for op in encoder_ops for sig in op.required_signals(n_blocks)]
        wants_signals = any(sig.partition("@")[0] in VISION_SIGNALS for sig in signals)
        if "vision" in stages or wants_signals:
            if "vision" not in self.supported_stages:
                raise ValueError(f"the {self.name} adapter cannot capture vision-encoder signals")
            hooks.append(VisionHooks(self))
        self.hooks = hooks

    def install(self) -> None:
        """Install the planned hook sets on the model instance."""
        for h in self.hooks:
            h.install()

    def remove(self) -> None:
        for h in reversed(self.hooks):
            h.remove()
        self.hooks = []
        self.metadata = {}
        self.reducer = None

    # ------------------------------------------------------------------ results of the last call
    @property
    def last(self):
        """The :class:`~vtr.adapters.state.CallState` of the latest reduced prefill (``None`` before)."""
        calls = getattr(self, "calls", None)
        return None if calls is None else calls.last
