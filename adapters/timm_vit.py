"""timm Vision Transformers (``timm.models.vision_transformer.VisionTransformer``): ToMe and ATS as in their papers.

Only the ``vision`` stage exists: operators act between the blocks through the shared block runner
(:mod:`vtr.adapters.vision`), built from each ``Block``'s own modules — LayerScale included, which the
official ToMe timm patch skips. The head reads the reduced tokens directly (the class token, or the mean
of the tokens for average-pooled models), as in the official patches. ``model.vtr.report`` has one sample
per image.

The class token is a protected prefix row; a distillation token is kept right after it (the official ToMe
patch lets it move and then protects the wrong token). Register tokens are not supported.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from vtr.adapters.base import Adapter, VisionInfo
from vtr.adapters.towers import patch_units, timm_parts
from vtr.adapters.vision import TowerFacts, pixel_grids

__all__ = ["TimmViTAdapter"]


class TimmViTAdapter(Adapter):
    """timm ``VisionTransformer`` with plain ``Block`` s (ViT, DeiT, AugReg, ...)."""

    name: ClassVar[str] = "timm ViT"
    model_classes: ClassVar[tuple[str, ...]] = ("VisionTransformer",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.models.vision_transformer import Block

        bad = [type(b).__name__ for b in model.blocks if type(b) is not Block]
        if bad:
            raise TypeError(f"the timm ViT adapter supports plain timm Blocks, this model has {sorted(set(bad))}")
        n_cls = 0 if getattr(model, "cls_token", None) is None else 1
        n_dist = 0 if getattr(model, "dist_token", None) is None else 1
        self.prefix = int(getattr(model, "num_prefix_tokens", n_cls + n_dist))
        if self.prefix != n_cls + n_dist:
            raise NotImplementedError(
                f"{self.prefix - n_cls - n_dist} register token(s): timm ViTs with register tokens are not supported"
            )
        self.has_cls = bool(n_cls)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes and type(model).__module__.startswith("timm.")

    @property
    def supported_stages(self) -> tuple[str, ...]:
        return ("vision",)

    @property
    def vision_info(self) -> VisionInfo:
        patch = self.model.patch_embed.patch_size
        return VisionInfo(
            encoder="",
            blocks="blocks",
            num_blocks=len(self.model.blocks),
            patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            unit="patch",
            unit_patches=1,
            has_cls=self.has_cls,
            feature_layer=None,
        )

    def tower(self) -> TowerFacts:
        info = self.vision_info
        return TowerFacts(
            info=info,
            encoder=self.model,
            blocks=self.model.blocks,
            parts=timm_parts,
            prefix=self.prefix,
            sequences=pixel_grids(info.patch_size),
            unit_patches=patch_units,
            reexpand=False,
        )

    def language_model(self) -> nn.Module:
        raise TypeError("a timm ViT has no language model")

    def prepare(self, reducer: Any) -> None:
        from vtr.adapters.state import CallTracker
        from vtr.adapters.vision import VisionHooks

        self.reducer = reducer
        self.calls = CallTracker()
        self.hooks = [VisionHooks(self)]

    def on_tower_result(self, result: Any) -> None:
        """No LLM: the vision result is the call's result; report one sample per image."""
        from vtr.adapters.vision import report_tower_result

        self.reducer.report = report_tower_result(result)

    def visual_spans(self, input_ids: Tensor):  # pragma: no cover - no LLM input
        raise TypeError("a timm ViT has no LLM input")
