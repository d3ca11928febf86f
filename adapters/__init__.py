"""Model-specific adapters (installed as ``vtr.adapters``); selected automatically from the model class."""

from __future__ import annotations

from torch import nn

from vtr.adapters.base import Adapter, VisionInfo, VisualSpans
from vtr.adapters.internvl import InternVLAdapter
from vtr.adapters.llava import LlavaAdapter
from vtr.adapters.llava_next import LlavaNextAdapter
from vtr.adapters.llava_onevision import LlavaOnevisionAdapter
from vtr.adapters.qwen2_vl import Qwen2VLAdapter
from vtr.adapters.timm_vit import TimmViTAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2VLAdapter",
    "TimmViTAdapter",
    "VisionInfo",
    "VisualSpans",
    "adapter_for",
    "family_options",
    "supported_classes",
]

ADAPTERS: list[type[Adapter]] = [
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    InternVLAdapter,
    TimmViTAdapter,
]


def family_options() -> tuple[str, ...]:
    """Names of the family-only wrap options any adapter accepts (e.g. ``drop_newlines``)."""
    return tuple(dict.fromkeys(o for a in ADAPTERS for o in a.options))


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """Instantiate the adapter for ``model`` or raise listing the supported classes."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise TypeError(
        f"vtr has no adapter for {type(model).__name__}; supported model classes: {', '.join(supported_classes())}"
    )
