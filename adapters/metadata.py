"""Metadata capture: grid metadata and ``input_ids`` of the current call, seen where they are available.

``generate`` encodes images before the first forward, so grid metadata (``image_grid_thw``,
``image_sizes``, ...) is captured from instance wrappers around the base model's feature methods, and
from the base model's forward kwargs for plain calls. The language model only receives
``inputs_embeds``: the base-model pre-hook remembers the call's ``input_ids`` for the splice.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from vtr.adapters.base import Adapter

__all__ = ["InstanceWrapper", "MetadataHooks"]


class InstanceWrapper:
    """Wrap ``module.<name>`` on the instance so ``on_call(arg_name, value)`` sees every argument.

    ``functools.wraps`` keeps the signature visible to ``inspect.signature`` (``generate`` picks the
    arguments of ``get_image_features`` from it). ``remove()`` restores the previous attribute exactly.
    ``around(original, *args, **kwargs)``, when given, replaces the call itself.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        on_call: Callable[[str, Any], None] | None = None,
        around: Callable[..., Any] | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.had_instance_attr = name in module.__dict__
        self.previous = module.__dict__.get(name)
        original = getattr(module, name)
        sig = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if on_call is not None:
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
            if around is not None:
                return around(original, *args, **kwargs)
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    def remove(self) -> None:
        if self.had_instance_attr:
            setattr(self.module, self.name, self.previous)
        else:
            self.module.__dict__.pop(self.name, None)


class MetadataHooks:
    """Captures grid metadata (feature methods and base-model kwargs) and the ``input_ids`` of each call."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.handles: list[Any] = []
        #: ``input_ids`` of the base-model call in progress (consumed by the splice at the LLM input).
        self.input_ids = None

    def install(self) -> None:
        base = self.adapter.base_model()
        self.handles.append(base.register_forward_pre_hook(self._base_hook, with_kwargs=True))
        for name in self.adapter.feature_methods:
            self.handles.append(InstanceWrapper(base, name, self._on_metadata, around=self._feature(name)))

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()
        self.input_ids = None

    def _on_metadata(self, name: str, value: Any) -> None:
        if not self.adapter.paused:
            self.adapter.on_metadata(name, value)

    def _feature(self, name: str):
        def around(original, *args, **kwargs):
            if self.adapter.paused:
                return original(*args, **kwargs)
            # Vision-stage results are tagged with the method that encoded them (images or videos).
            previous, self.adapter.encoding = self.adapter.encoding, name
            try:
                return original(*args, **kwargs)
            finally:
                self.adapter.encoding = previous

        return around

    def _base_hook(self, module, args, kwargs):
        if self.adapter.paused:
            return None
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)
        for name in self.adapter.metadata_kwargs:
            self.adapter.on_metadata(name, kwargs.get(name))
        return None
