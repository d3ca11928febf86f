"""Operator base classes, budget resolution and the per-call operator context."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtr.tokens import SCOPES, TowerTokens, VisualTokens

__all__ = [
    "STAGES",
    "BudgetOperator",
    "CacheOperator",
    "LayerOperator",
    "OpContext",
    "Operator",
    "VisionOperator",
    "resolve_keep",
    "resolve_layer",
    "validate_keep",
]

#: Stages in execution order (see DESIGN §2).
STAGES = ("vision", "pre_llm", "prefill", "decode")


def validate_keep(keep: Any, name: str = "keep") -> int | float:
    """Check a budget: an int >= 1 (count) or a float in (0, 1] (ratio). Returns it unchanged."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(
            f"{name} must be an int >= 1 (a token count) or a float in (0, 1] (a ratio), "
            f"got {keep!r} of type {type(keep).__name__}"
        )
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {keep!r}")
        return int(keep)
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{name} must be a float in (0, 1] (a ratio) or an int >= 1 (a count), got {keep!r}")
    return keep


def resolve_keep(keep: int | float, n: int) -> int:
    """Number of tokens to keep out of ``n``.

    An int is a count (``>= n`` keeps everything); a float ratio resolves to
    ``clamp(round(keep * n), 1, n)`` with Python rounding. ``n == 0`` gives 0.
    """
    keep = validate_keep(keep)
    if n <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n)
    return max(1, min(n, round(keep * n)))


@dataclass
class OpContext:
    """What an operator may know about the current call besides the tokens.

    Attributes:
        sample: index of the sample in the batch (for messages only: results must not depend on it).
        query: the text of the sample's prompt, when the adapter can recover it.
        extras: adapter-provided extras (e.g. the tokenizer), keyed by name.
    """

    sample: int = 0
    query: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Operator:
    """Base of every token-reduction operator.

    Subclasses are dataclasses with typed, validated hyper-parameters; they declare the ``stage`` they
    act in and the named ``signals`` they need the adapter to capture (e.g. ``"cls_attn@-2"``).
    ``apply`` is pure with respect to the model: ``VisualTokens -> VisualTokens`` for one sample.
    """

    stage: ClassVar[str] = "pre_llm"
    signals: ClassVar[tuple[str, ...]] = ()
    #: The operator reads ``OpContext.query`` (the prompt text): ``wrap`` then needs a tokenizer.
    needs_query: ClassVar[bool] = False
    #: Position conventions (``Recipe.positions``) the operator supports; ``wrap`` refuses the others.
    position_modes: ClassVar[tuple[str, ...]] = ("original", "compact")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad field, its value and what is allowed."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        """Named signals the adapter must capture (``kind@layer``).

        ``n_layers`` is the depth of the module the signals come from, to resolve negative layers: the vision
        encoder's blocks for ``vision`` and ``pre_llm`` operators, the language model's layers for ``prefill`` and
        ``decode`` operators.
        """
        return self.signals

    def bind(self, adapter) -> Operator:
        """The operator to run on ``adapter``'s model (e.g. the family's placement); raise if it cannot act."""
        return self

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __call__(self, tokens: VisualTokens, ctx: OpContext | None = None) -> VisualTokens:
        return self.apply(tokens, ctx or OpContext())


@dataclass
class BudgetOperator(Operator):
    """An operator that reduces each budget unit (``scope``) to ``keep`` tokens.

    Subclasses implement ``select`` (return kept positions, the default path) or override ``reduce``
    (return new tokens, e.g. for pooling or merging).
    """

    keep: int | float = 0.25
    scope: str = "image"

    def validate(self) -> None:
        self.keep = validate_keep(self.keep)
        if self.scope not in SCOPES:
            raise ValueError(f"{self.name}.scope must be one of {SCOPES}, got {self.scope!r}")

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        parts = []
        for _, pos in tokens.units(self.scope):
            unit = tokens.take(pos)
            # Ratios refer to the ORIGINAL count of the unit (merged tokens carry their sizes).
            n_orig = round(float(unit.sizes.sum()))
            k = min(resolve_keep(self.keep, max(n_orig, len(unit))), len(unit))
            parts.append(unit if k >= len(unit) else self.reduce(unit, k, ctx))
        if not parts:
            return tokens
        return VisualTokens.cat(parts).sorted()

    def reduce(self, unit: VisualTokens, k: int, ctx: OpContext) -> VisualTokens:
        """Reduce one unit of ``len(unit) > k`` tokens to (about) ``k`` tokens."""
        idx = self.select(unit, k, ctx)
        # Protected tokens (e.g. MustDrop's key set) always survive.
        if bool(unit.protected.any()):
            idx = torch.unique(torch.cat([idx.to(unit.protected.device), unit.protected.nonzero().flatten()]))
        return unit.take(idx)

    def select(self, unit: VisualTokens, k: int, ctx: OpContext) -> Tensor:  # pragma: no cover
        """Ascending positions (into ``unit``) of the ``k`` tokens to keep."""
        raise NotImplementedError


@dataclass
class LayerOperator(Operator):
    """An operator acting between decoder layers (``prefill`` stage), before :meth:`layer_index`.

    ``apply`` gets the sample's visual tokens as that layer would see them (``embeds`` = the hidden
    states entering the layer, ``scores`` = the signals it declared) and returns a subset of them.
    """

    stage: ClassVar[str] = "prefill"

    def layer_index(self, n_layers: int) -> int:  # pragma: no cover - abstract
        """The decoder layer before which the operator acts, for a decoder of ``n_layers`` layers."""
        raise NotImplementedError

    def layer_indices(self, n_layers: int) -> list[int]:
        """Every decoder layer before which the operator acts (ascending); ``ctx.extras["layer"]`` tells
        ``apply`` which one it runs before. Default: the single :meth:`layer_index`; operators that prune at
        several layers (MustDrop) override this instead."""
        return [self.layer_index(n_layers)]


@dataclass
class CacheOperator(Operator):
    """An operator on the KV cache after prefill (``decode`` stage): it compacts the caches of some layers.

    ``apply`` gets the sample's visual tokens as the LAST decoder layer saw them in prefill (with the signals
    the prefill captured) and returns the subset every layer of :meth:`cache_layers` keeps (text rows always
    stay). Keys were rotated at their original positions, so selecting rows is exact; decoding continues at
    the unreduced positions.
    """

    stage: ClassVar[str] = "decode"

    def cache_layers(self, n_layers: int) -> list[int]:  # pragma: no cover - abstract
        """Decoder layers whose caches are compacted."""
        raise NotImplementedError


def resolve_layer(name: str, layer: int, n_layers: int) -> int:
    """``layer`` (negative counts from the end) as an index into ``n_layers``; raises naming both when outside."""
    i = layer + n_layers if layer < 0 else layer
    if not 0 <= i < n_layers:
        raise ValueError(f"{name}: layer {layer} is outside the language model's layers 0..{n_layers - 1}")
    return i


@dataclass
class VisionOperator(Operator):
    """An operator acting inside the vision encoder (``vision`` stage) on :class:`~vtr.tokens.TowerTokens`.

    The adapter calls :meth:`apply_tower` at every ``(block, point)`` of :meth:`points`: ``"mid"`` is after
    the block's attention residual and before its MLP (ToMe, ATS: the MLP already runs on fewer tokens),
    ``"post"`` after the block (MustDrop's window merge). Signals declared with :meth:`required_signals`
    (``cls_attn@L``, ``mean_received@L``, ``value_norm@L``) are in ``tokens.scores`` from block ``L`` on.
    """

    stage: ClassVar[str] = "vision"
    #: ``tokens.keys`` (the block's keys averaged over heads) is needed at mid-block points.
    needs_keys: ClassVar[bool] = False
    #: Token units this operator supports (``"patch"``, ``"merge2x2"``, ``"pixel_shuffle2x2"``).
    units: ClassVar[tuple[str, ...]] = ("patch", "merge2x2", "pixel_shuffle2x2")

    def points(self, info) -> list[tuple[int, str]]:  # pragma: no cover - abstract
        """``(block, "mid" | "post")`` pairs where the operator acts, for an encoder described by ``info``
        (a :class:`vtr.adapters.base.VisionInfo`)."""
        raise NotImplementedError

    def apply_tower(self, tokens: TowerTokens, ctx: OpContext) -> TowerTokens:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, tokens: VisualTokens, ctx: OpContext) -> VisualTokens:
        raise TypeError(f"{self.name} acts inside the vision encoder: use it through vtr.wrap, not on VisualTokens")
