"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-L/336 tower with CLS, 576 patch tokens per image."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from vtr.adapters.base import Adapter, VisionInfo, VisualSpans, tower_vision_info
from vtr.adapters.towers import clip_parts, patch_units
from vtr.adapters.vision import TowerFacts, image_rows, pixel_grids
from vtr.tokens import ImageLayout

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    """Each ``<image>`` expands to ``grid * grid`` rows (CLS dropped by the ``default`` strategy).

    Spans are runs of the image token in ``input_ids``; adjacent images are split by the fixed
    per-image count, so several images per prompt work wherever they appear.
    """

    name: ClassVar[str] = "LLaVA-1.5"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    picture: ClassVar[str] = "crop"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        vc = cfg.vision_config
        strategy = cfg.vision_feature_select_strategy
        if strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={strategy!r} keeps the CLS row in the LLM input; the LLaVA "
                "adapter supports 'default' (CLS dropped), which every released LLaVA-1.5 uses"
            )
        self.image_token_id = int(cfg.image_token_id)
        self.grid = int(vc.image_size) // int(vc.patch_size)
        self.tokens_per_image = self.grid * self.grid
        self.has_cls = True

    @property
    def vision_info(self) -> VisionInfo:
        return tower_vision_info(self.model, has_cls=True)

    def tower(self) -> TowerFacts:
        info = self.vision_info
        return TowerFacts(
            info=info,
            encoder=self.model.model.vision_tower,
            blocks=self.vision_blocks(),
            parts=clip_parts,
            prefix=1,
            sequences=pixel_grids(info.patch_size),
            unit_patches=patch_units,
        )

    def tower_rows(self, spans, results):
        return image_rows(spans, results, "image", lambda im: [(self.tokens_per_image, 1)])

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:
        seq_pos = torch.nonzero(input_ids == self.image_token_id, as_tuple=False).flatten()
        n = len(seq_pos)
        if n % self.tokens_per_image:
            raise ValueError(
                f"found {n} image tokens, not a multiple of {self.tokens_per_image} per image: the prompt was not "
                "expanded by the model's processor (use the LlavaProcessor that matches this model)"
            )
        layout = tuple(
            ImageLayout(
                offset=i * self.tokens_per_image, n_tokens=self.tokens_per_image, grids=((1, self.grid, self.grid),)
            )
            for i in range(n // self.tokens_per_image)
        )
        return VisualSpans(seq_pos=seq_pos, layout=layout)
