"""InternVL (``InternVLForConditionalGeneration``, transformers-native InternVL2.5/3 checkpoints).

InternViT (with CLS, dropped by the ``default`` strategy) encodes each tile; pixel shuffle (0.5) turns
each 2x2 block of patches into one LLM token (the token unit), then an MLP projects it. An image is
``<img>`` + ``n_tiles * tokens_per_tile`` ``<IMG_CONTEXT>`` rows + ``</img>``; with dynamic tiling the
``n_tiles - 1`` crops come first (row-major) and the global thumbnail LAST (a single-tile image has
no thumbnail). The tile count is recovered from ``input_ids`` (no processor metadata needed). The LLM
(Qwen2/Llama) uses 1-D RoPE: kept rows keep their original ids.

Videos: the InternVL processor expands a video into one ``<img>...</img>`` block per frame, which
``input_ids`` cannot tell apart from images; each frame is therefore one "image" unit here
(``scope="image"`` budgets each frame). Grouping frames into one video is not possible from what the
model receives (transformers 5.24): the processor pops ``num_patches`` and ``pixel_values_videos`` and
merges the frames into ``pixel_values``, the config has no video token id, and the frame blocks are
separated only by the plain text ``Frame{i}:`` (one line per frame), whose token ids depend on the tokenizer (the
adapter has none), so a video is indistinguishable from single-tile images written one after another.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch
from torch import Tensor, nn

from vtr.adapters.base import Adapter, VisionInfo, VisualSpans
from vtr.adapters.towers import internvit_parts
from vtr.adapters.vision import TowerFacts, image_rows, pixel_grids
from vtr.tokens import ImageLayout

__all__ = ["InternVLAdapter"]


class InternVLAdapter(Adapter):
    """Layout per image: one ``(1, g, g)`` group per tile in model order (crops, then the thumbnail)."""

    name: ClassVar[str] = "InternVL"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    picture: ClassVar[str] = "tiles"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        vc = cfg.vision_config
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} feeds the CLS row to the "
                "pixel shuffle; the InternVL adapter supports 'default' (CLS dropped), which released models use"
            )
        self.image_token_id = int(cfg.image_token_id)
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        self.patch_size = int(patch)
        self.grid = int(int(size) // int(patch) * cfg.downsample_ratio)
        self.tokens_per_tile = self.grid * self.grid
        if self.tokens_per_tile != int(cfg.image_seq_length):
            raise ValueError(
                f"config.image_seq_length={cfg.image_seq_length} but the vision config gives "
                f"{self.tokens_per_tile} tokens per tile"
            )

    @property
    def vision_info(self) -> VisionInfo:
        vc = self.model.config.vision_config
        return VisionInfo(
            encoder="model.vision_tower",
            blocks="model.vision_tower.encoder.layer",
            num_blocks=int(vc.num_hidden_layers),
            patch_size=self.patch_size,
            unit="pixel_shuffle2x2",
            unit_patches=4,
            has_cls=True,
            feature_layer=int(self.model.config.vision_feature_layer),
            attention="full",
        )

    def tower(self) -> TowerFacts:
        info = self.vision_info
        g = self.grid * 2  # patches per tile side

        def units(grid: tuple[int, int]) -> torch.Tensor:
            # The model's own pixel shuffle applied to patch indices: each unit's 4 patches, in the order their
            # features are concatenated.
            idx = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(1, grid[0], grid[1], 1)
            shuffled = self.model.model.pixel_shuffle(idx, scale_factor=self.model.config.downsample_ratio)
            return shuffled.reshape(-1, 4).long()

        del g
        return TowerFacts(
            info=info,
            encoder=self.model.model.vision_tower,
            blocks=self.vision_blocks(),
            parts=internvit_parts,
            prefix=1,
            sequences=pixel_grids(info.patch_size),
            unit_patches=units,
        )

    def tower_rows(self, spans, results):
        return image_rows(spans, results, "image", lambda im: [(self.tokens_per_tile, len(im.grids))])

    @staticmethod
    def thumbnail_group(layout: ImageLayout) -> int | None:
        """Group (tile) index of the global thumbnail of an image: the last tile, or ``None`` if untiled."""
        return len(layout.grids) - 1 if len(layout.grids) > 1 else None

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:
        """Runs of ``<IMG_CONTEXT>``; each run is one image of ``run / tokens_per_tile`` tiles."""
        is_img = input_ids == self.image_token_id
        seq_pos = is_img.nonzero().flatten()
        layout: list[ImageLayout] = []
        if len(seq_pos):
            breaks = (seq_pos[1:] - seq_pos[:-1] != 1).nonzero().flatten() + 1
            bounds = [0, *breaks.tolist(), len(seq_pos)]
            for a, b in itertools.pairwise(bounds):
                n = b - a
                if n % self.tokens_per_tile:
                    raise ValueError(
                        f"an image has {n} <IMG_CONTEXT> tokens, not a multiple of {self.tokens_per_tile} per tile: "
                        "the prompt was not expanded by this model's InternVLProcessor"
                    )
                tiles = n // self.tokens_per_tile
                layout.append(ImageLayout(offset=a, n_tokens=n, grids=((1, self.grid, self.grid),) * tiles))
        return VisualSpans(seq_pos=seq_pos, layout=tuple(layout))
