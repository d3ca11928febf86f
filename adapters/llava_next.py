"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP with CLS, AnyRes tiles, newline tokens.

Every ``<image>`` expands to a base view of ``g*g`` rows (``g = image_size / patch_size``), then the
AnyRes tile grid stitched into one ``(nph*g, npw*g)`` feature map, unpadded to the image's aspect ratio
(``H' x W'``), each of its ``H'`` rows closed by the learned ``image_newline`` row. The row counts
depend on ``image_sizes``, which is not in ``input_ids``: the adapter captures it from the forward
kwargs and from ``get_image_features`` (which ``generate`` calls before the first forward).

Layout per image: groups ``(1, g, g)`` (base view) and ``(1, H', W')`` (tiles), then the ``H'``
newline rows as extra rows of the tile group. With ``drop_newlines=False`` (default) newline rows are
ordinary candidates of the image's budget; with ``drop_newlines=True`` they are removed from the LLM
input before any operator runs and not counted. Set it with ``LlavaNextAdapter(model,
drop_newlines=True)``, on a wrapped model with ``model.vtr.adapter.drop_newlines = True``, or through
a recipe attribute ``drop_newlines`` (read at install time when present).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn
from vtr.adapters.base import SpliceAdapter, VisionInfo, VisualSpans

from vtr.tokens import ImageLayout

if TYPE_CHECKING:  # pragma: no cover
    from vtr.api import Reducer

__all__ = ["LlavaNextAdapter", "anyres_rows"]


def anyres_rows(image_size: tuple[int, int], pinpoints, tile: int, grid: int) -> tuple[int, int]:
    """``(H', W')``: the unpadded tile-grid size, in patches, of an image of ``(height, width)`` pixels.

    Mirrors ``pack_image_features``: the best pinpoint gives ``(nph, npw)`` tiles of ``tile`` pixels;
    the ``(nph*grid, npw*grid)`` map is unpadded to the original aspect ratio.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    nph, npw = get_anyres_image_grid_shape(list(image_size), pinpoints, tile)
    dummy = torch.empty(1, nph * grid, npw * grid)
    out = unpad_image(dummy, torch.as_tensor(image_size))
    return int(out.shape[1]), int(out.shape[2])


class LlavaNextAdapter(SpliceAdapter):
    """AnyRes images (base view + unpadded tiles + newline rows), several per prompt."""

    name: ClassVar[str] = "LLaVA-NeXT"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)
    metadata_kwargs: ClassVar[tuple[str, ...]] = ("image_sizes",)

    def __init__(self, model: nn.Module, *, drop_newlines: bool = False):
        super().__init__(model)
        cfg = model.config
        vc = cfg.vision_config
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} keeps the CLS row; the "
                f"{self.name} adapter supports 'default' (CLS dropped), which released checkpoints use"
            )
        self.image_token_id = int(cfg.image_token_id)
        self.tile = int(vc.image_size)
        self.grid = int(vc.image_size) // int(vc.patch_size)
        self.pinpoints = cfg.image_grid_pinpoints
        self.drop_newlines = bool(drop_newlines)

    def install(self, reducer: Reducer) -> None:
        opt = getattr(reducer.recipe, "drop_newlines", None)
        if opt is not None:
            self.drop_newlines = bool(opt)
        super().install(reducer)

    @property
    def vision_info(self) -> VisionInfo:
        vc = self.model.config.vision_config
        layer = self.model.config.vision_feature_layer
        return VisionInfo(
            encoder="model.vision_tower",
            blocks="model.vision_tower.encoder.layers",
            num_blocks=int(vc.num_hidden_layers),
            patch_size=int(vc.patch_size),
            unit="patch",
            unit_patches=1,
            has_cls=True,
            feature_layer=int(layer) if isinstance(layer, int) else None,
            attention="full",
        )

    def image_rows(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """``(base, H', W')`` of one image; its row count is ``base + H' * (W' + 1)``."""
        h, w = anyres_rows(image_size, self.pinpoints, self.tile, self.grid)
        return self.grid * self.grid, h, w

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        sizes = self._metadata.get("image_sizes")
        if sizes is None:
            raise ValueError(
                f"the {self.name} adapter needs `image_sizes` (from the processor) to lay out AnyRes tiles; "
                "pass the processor outputs to forward/generate"
            )
        it = iter([tuple(int(v) for v in row) for row in torch.as_tensor(sizes).tolist()])
        out = []
        for b in range(input_ids.shape[0]):
            pos = (input_ids[b] == self.image_token_id).nonzero().flatten()
            order, drop, layout = [], [], []
            start = 0
            while start < len(pos):
                try:
                    size = next(it)
                except StopIteration:
                    raise ValueError("input_ids hold more images than `image_sizes` describes") from None
                base, h, w = self.image_rows(size)
                n = base + h * (w + 1)
                rows = pos[start : start + n]
                if len(rows) != n:
                    raise ValueError(
                        f"an image of size {size} needs {n} <image> rows but input_ids hold {len(rows)}: the prompt "
                        "was not expanded by this model's LlavaNextProcessor"
                    )
                tiles = rows[base:].view(h, w + 1)
                newlines = tiles[:, -1]
                offset = sum(len(o) for o in order)
                order.append(torch.cat([rows[:base], tiles[:, :-1].flatten()]))
                if self.drop_newlines:
                    drop.append(newlines)
                    n_tok = base + h * w
                else:
                    order.append(newlines)
                    n_tok = n
                layout.append(ImageLayout(offset=offset, n_tokens=n_tok, grids=((1, self.grid, self.grid), (1, h, w))))
                start += n
            seq_pos = torch.cat(order) if order else pos
            out.append(VisualSpans(seq_pos=seq_pos, layout=tuple(layout), drop=torch.cat(drop) if drop else None))
        if next(it, None) is not None:
            raise ValueError("`image_sizes` describes more images than input_ids hold")
        return out

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:
        return self.batch_spans(input_ids.unsqueeze(0))[0]
