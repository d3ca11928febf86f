"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP with CLS, AnyRes tiles, newline tokens.

Every ``<image>`` expands to a base view of ``g*g`` rows (``g = image_size / patch_size``), then the
AnyRes tile grid stitched into one ``(nph*g, npw*g)`` feature map, unpadded to the image's aspect ratio
(``H' x W'``), each of its ``H'`` rows closed by the learned ``image_newline`` row. The row counts
depend on ``image_sizes``, which is not in ``input_ids``: the adapter captures it from the forward
kwargs and from ``get_image_features`` (which ``generate`` calls before the first forward).

Layout per image: groups ``(1, g, g)`` (base view) and ``(1, H', W')`` (tiles), then the ``H'``
newline rows as extra rows of the tile group. With ``drop_newlines=False`` (default) newline rows are
ordinary candidates of the image's budget; with ``drop_newlines=True`` they are removed from the LLM
input before any operator runs and not counted. It is a family option: ``vtr.wrap(model, recipe,
drop_newlines=True)`` or ``options: {drop_newlines: true}`` in a YAML recipe; this adapter validates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vtr.adapters.base import Adapter, MetadataMismatch, VisionInfo, VisualSpans, tower_vision_info
from vtr.adapters.towers import clip_parts, patch_units
from vtr.adapters.vision import TowerFacts, check_sequences_used, pixel_grids
from vtr.tokens import ImageLayout

__all__ = ["LlavaNextAdapter", "SpanPart", "anyres_rows", "pack_parts"]


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


@dataclass(frozen=True)
class SpanPart:
    """One packed image or video of a sample, as sequence positions.

    Attributes:
        grid_rows: ``[sum(t*h*w over grids)]`` long, positions of the grid tokens in layout order
            (group after group, row-major within a group).
        newline_rows: ``[M]`` long, positions of its newline rows.
        grids: ``(t, h, w)`` per group (base view / canvas, or video frames).
        kind: ``"image"`` or ``"video"``.
        newlines: ``"candidate"``: newline rows are extra rows of the unit (budgeted with it, like the
            official LLaVA-NeXT code); ``"keep"``: they stay in the LLM input outside every budget (they are
            neither candidates nor counted). With ``drop_newlines=True`` both are removed.
    """

    grid_rows: Tensor
    newline_rows: Tensor
    grids: tuple[tuple[int, int, int], ...]
    kind: str = "image"
    newlines: str = "candidate"


def pack_parts(parts: list[SpanPart], drop_newlines: bool, empty: Tensor) -> VisualSpans:
    """Visual spans of one sample from its packed units (``empty``: the ``[0]`` positions to use if none)."""
    order: list[Tensor] = []
    drop: list[Tensor] = []
    layout: list[ImageLayout] = []
    offset = 0
    for part in parts:
        rows = [part.grid_rows]
        if drop_newlines:
            drop.append(part.newline_rows)
        elif part.newlines == "candidate":
            rows.append(part.newline_rows)
        n_tok = sum(len(r) for r in rows)
        order += rows
        layout.append(ImageLayout(offset=offset, n_tokens=n_tok, grids=part.grids, kind=part.kind))
        offset += n_tok
    seq_pos = torch.cat(order) if order else empty
    return VisualSpans(seq_pos=seq_pos, layout=tuple(layout), drop=torch.cat(drop) if drop else None)


class LlavaNextAdapter(Adapter):
    """AnyRes images (base view + unpadded tiles + newline rows), several per prompt."""

    name: ClassVar[str] = "LLaVA-NeXT"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    options: ClassVar[tuple[str, ...]] = ("drop_newlines",)
    picture: ClassVar[str] = "anyres"
    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)
    metadata_kwargs: ClassVar[tuple[str, ...]] = ("image_sizes",)
    #: The ``vision_feature_select_strategy`` the layout assumes (``"default"``: CLIP's CLS row dropped).
    feature_select_strategy: ClassVar[str] = "default"

    def __init__(self, model: nn.Module, *, drop_newlines: bool = False):
        super().__init__(model)
        cfg = model.config
        vc = cfg.vision_config
        if cfg.vision_feature_select_strategy != self.feature_select_strategy:
            raise NotImplementedError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: the {self.name} adapter "
                f"supports {self.feature_select_strategy!r}, which released checkpoints use"
            )
        self.image_token_id = int(cfg.image_token_id)
        self.tile = int(vc.image_size)
        self.grid = int(vc.image_size) // int(vc.patch_size)
        self.pinpoints = cfg.image_grid_pinpoints
        self.drop_newlines = bool(drop_newlines)

    def set_options(self, recipe) -> None:
        value = recipe.options.get("drop_newlines", False)
        if not isinstance(value, bool):
            raise TypeError(f"drop_newlines must be True or False, got {value!r}")
        super().set_options(recipe)

    @property
    def vision_info(self) -> VisionInfo:
        return tower_vision_info(self.model, has_cls=True)

    # ------------------------------------------------------------------ vision stage
    def tower(self) -> TowerFacts:
        info = self.vision_info
        return TowerFacts(
            info=info,
            encoder=self.model.model.vision_tower,
            blocks=self.vision_blocks(),
            parts=clip_parts,
            prefix=1 if info.has_cls else 0,
            sequences=pixel_grids(info.patch_size),
            unit_patches=patch_units,
            refuse_video="the model pools every frame's full grid (use a pre_llm recipe for videos)",
        )

    def image_plan(self) -> list[tuple[tuple[int, int], bool]]:
        """``(size, tiled)`` of every image of the call, in batch order (NeXT tiles every image)."""
        sizes = self.metadata.get("image_sizes")
        return [] if sizes is None else [((int(h), int(w)), True) for h, w in torch.as_tensor(sizes).tolist()]

    def canvas_units(self, image_size: tuple[int, int]) -> tuple[int, Tensor]:
        """``(tiles, codes)``: the encoder sequences of one tiled image (base view + AnyRes tiles), and for every
        row of its unpadded canvas the code ``tile * g*g + unit`` of the patch it shows (``tile`` 0 = base view).

        Computed by the model's own ``unpad_image`` on a canvas of codes, so it is exact by construction.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        g = self.grid
        nph, npw = get_anyres_image_grid_shape(list(image_size), self.pinpoints, self.tile)
        yy, xx = torch.meshgrid(torch.arange(nph * g), torch.arange(npw * g), indexing="ij")
        tile = 1 + (yy // g) * npw + xx // g
        codes = (tile * g * g + (yy % g) * g + xx % g).double().unsqueeze(0)
        return 1 + nph * npw, unpad_image(codes, torch.as_tensor(image_size)).reshape(-1).long()

    def tower_rows(self, spans, results):
        plan = self.image_plan()
        n_images = sum(im.kind == "image" for s in spans for im in s.layout)
        if n_images != len(plan):
            raise MetadataMismatch(f"{n_images} images in the LLM input, {len(plan)} in the captured image sizes")
        which = [i for i, r in enumerate(results) if r.kind == "image"]
        g2 = self.grid * self.grid
        out, cursor, img, lines = [], 0, 0, 0
        for s in spans:
            n = len(s.seq_pos)
            res, seq, unit, line = (torch.full((n,), -1, dtype=torch.long) for _ in range(4))
            for im in s.layout:
                if im.kind != "image":
                    continue
                size, tiled = plan[img]
                img += 1
                sl = slice(im.offset, im.offset + g2)
                res[sl], seq[sl], unit[sl] = which[0], cursor, torch.arange(g2)
                if not tiled:
                    cursor += 1
                    continue
                tiles, codes = self.canvas_units(size)
                _, hh, ww = im.grids[1]
                if len(codes) != hh * ww:
                    raise ValueError(
                        f"vision-stage results cannot be placed on the {self.name} canvas of an image of size {size}: "
                        f"the model resized it ({hh}x{ww} rows from {len(codes)} patches)"
                    )
                sl = slice(im.offset + g2, im.offset + g2 + hh * ww)
                res[sl], seq[sl], unit[sl] = which[0], cursor + codes // g2, codes % g2
                # Canvas line y and the newline row closing it share a line id: the newline stays only while a
                # token of its line does (the spec's packing rule for in-tower reduction).
                line[sl] = lines + torch.arange(hh).repeat_interleave(ww)
                n_newlines = im.n_tokens - g2 - hh * ww
                if n_newlines == hh:
                    line[im.offset + g2 + hh * ww : im.offset + im.n_tokens] = lines + torch.arange(hh)
                lines += hh
                cursor += tiles
            out.append((res, seq, unit, line))
        check_sequences_used(results, which, cursor)
        return out

    def image_rows(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """``(base, H', W')`` of one image; its row count is ``base + H' * (W' + 1)``."""
        h, w = anyres_rows(image_size, self.pinpoints, self.tile, self.grid)
        return self.grid * self.grid, h, w

    def image_part(self, rows: Tensor, base: int, h: int, w: int, tail: int = 0) -> SpanPart:
        """Split the ``base + h * (w + 1) + tail`` sequence positions ``rows`` of one packed image.

        ``base`` rows of the ``(g, g)`` base view, then ``h`` canvas rows of ``w`` tokens each closed by
        a newline, then ``tail`` trailing newline rows (OneVision closes an untiled image with one).
        """
        n_canvas = h * (w + 1)
        canvas = rows[base : base + n_canvas].view(h, w + 1)
        grid_rows = torch.cat([rows[:base], canvas[:, :-1].flatten()])
        newline_rows = torch.cat([canvas[:, -1], rows[base + n_canvas : base + n_canvas + tail]])
        grids = ((1, self.grid, self.grid),) + (((1, h, w),) if h * w else ())
        return SpanPart(grid_rows=grid_rows, newline_rows=newline_rows, grids=grids)

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        sizes = self.metadata.get("image_sizes")
        if sizes is None:
            raise ValueError(
                f"the {self.name} adapter needs `image_sizes` (from the processor) to lay out AnyRes tiles; "
                "pass the processor outputs to forward/generate"
            )
        it = iter([tuple(int(v) for v in row) for row in torch.as_tensor(sizes).tolist()])
        out = []
        for b in range(input_ids.shape[0]):
            pos = (input_ids[b] == self.image_token_id).nonzero().flatten()
            parts: list[SpanPart] = []
            start = 0
            while start < len(pos):
                try:
                    size = next(it)
                except StopIteration:
                    raise MetadataMismatch("input_ids hold more images than `image_sizes` describes") from None
                base, h, w = self.image_rows(size)
                n = base + h * (w + 1)
                rows = pos[start : start + n]
                if len(rows) != n:
                    raise MetadataMismatch(
                        f"an image of size {size} needs {n} <image> rows but input_ids hold {len(rows)}: the prompt "
                        "was not expanded by this model's LlavaNextProcessor"
                    )
                parts.append(self.image_part(rows, base, h, w))
                start += n
            out.append(pack_parts(parts, self.drop_newlines, empty=pos))
        if next(it, None) is not None:
            raise MetadataMismatch("`image_sizes` describes more images than input_ids hold")
        return out

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:
        return self.batch_spans(input_ids.unsqueeze(0))[0]
