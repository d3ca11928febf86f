"""Per-call state: each sample's visual tokens from stage to stage, the report, what decoding needs.

A reduced call runs the stages in order, possibly spread over several module calls: ``generate``
encodes the images (``vision`` stage) before the first forward, the first forward runs ``pre_llm``
and ``prefill``, later forwards decode with the cache the prefill filled. :class:`CallTracker` links
them: vision results wait in :attr:`CallTracker.pending` until the next prefill consumes them; the
prefill creates a :class:`CallState`, which decoding finds again through the cache it is bound to.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vtr.adapters.base import SpliceState, VisualSpans
from vtr.report import Report
from vtr.tokens import VisualTokens

__all__ = ["CallState", "CallTracker", "LayerState"]


@dataclass
class LayerState:
    """The visual rows one decoder layer saw during prefill (after the ``prefill`` operators before it).

    Attributes:
        rows: per sample, ``[n_b]`` long positions of the rows this layer saw, in the reduced LLM input
            (the ``pre_llm`` output), ascending; text rows included.
        length: padded sequence length this layer saw (= its KV-cache length after prefill).
        mask: ``[B, length]`` long, valid (1) and padding (0) columns of this layer's cache.
    """

    rows: list[Tensor]
    length: int
    mask: Tensor


@dataclass
class CallState:
    """What one reduced call did, sample by sample.

    Attributes:
        report: the report of this call (``model.vtr.report`` after it).
        spans: per sample, the visual rows of the unreduced prompt.
        expand: ``generate``'s repeat factor (beams / returned sequences) applied after the metadata.
        tokens: per sample, the visual tokens at the LLM input (after ``pre_llm``).
        kept_rows: per sample, ``[n_b]`` long, positions in the UNREDUCED prompt of the rows the LLM saw.
        visual: per sample, ``[n_b]`` bool over ``kept_rows``: which kept rows are visual.
        splice: the LLM-input splice result decoding needs.
        layers: per decoder layer, what it saw in prefill; ``None`` when no ``prefill`` operator ran
            (every layer saw the LLM input).
        left: the reduced batch is left-padded.
    """

    report: Report
    spans: list[VisualSpans] = field(default_factory=list)
    expand: int = 1
    tokens: list[VisualTokens] = field(default_factory=list)
    kept_rows: list[Tensor] = field(default_factory=list)
    visual: list[Tensor] = field(default_factory=list)
    splice: SpliceState | None = None
    layers: list[LayerState] | None = None
    left: bool = True
    #: The rebased 2-D mask of the latest cached (decode) call, for per-layer decode masks.
    decode_mask: Tensor | None = None


class CallTracker:
    """Links the module calls of one reduced call (see the module docstring).

    Attributes:
        pending: vision-stage results produced since the last prefill, in tower-call order (images,
            then videos, as the model encodes them); the next prefill consumes them.
        current: the state of the prefill in progress (set by the splice, read by decoder hooks).
        last: the state of the latest finished prefill.
    """

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.current: CallState | None = None
        self.last: CallState | None = None
        # Every cache a reduced prefill filled -> its state (weak: a cache the caller drops frees its entry).
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def bind(self, state: CallState, cache: Any) -> None:
        """Attach ``state`` to the cache its prefill filled, so cached calls find it (also after later calls)."""
        if state.splice is not None and cache is not None:
            state.splice.cache_ref = weakref.ref(cache)
            self._by_cache[cache] = state

    def for_cache(self, cache: Any) -> CallState | None:
        """The state whose prefill filled ``cache`` (``None`` for a cache vtr did not fill)."""
        if cache is None:
            return None
        try:
            return self._by_cache.get(cache)
        except TypeError:  # an unhashable cache object
            st = self.last
            ok = st is not None and st.splice is not None and st.splice.cache_ref is not None
            return st if ok and st.splice.cache_ref() is cache else None
