"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Native-resolution ViT without CLS; a 2x2 PatchMerger turns each 2x2 block of patches into one LLM
token (the token unit). Every image is ``<|vision_start|>`` + ``t*h*w/4`` ``<|image_pad|>`` rows +
``<|vision_end|>``; a video uses ``<|video_pad|>`` and has ``t`` temporal steps (2 input frames each).
The LLM uses M-RoPE: every row has (t, h, w) position ids computed on the unpruned prompt
(``get_rope_index``); the splice gathers them, so kept rows keep their original positions.

Grid metadata (``image_grid_thw``, ``video_grid_thw``) is not in ``input_ids``. Under ``generate`` it
is consumed by ``get_image_features`` / ``get_video_features`` before the first forward, so the adapter
wraps those two methods on the instance (signature preserved) and also reads the kwargs of plain
forward calls.

Decoding: ``generate`` passes unpruned decode ids (last + 1 on every row); they pass through. A forward
call with a cache and ``position_ids=None`` would make the model add ``rope_deltas`` to a count of the
attention-mask columns; the adapter computes those ids itself from the unpruned prompt (see
:meth:`Qwen2VLAdapter.decode_positions`), so they equal the unreduced run's whatever mask length the
caller passes. ``model.model.rope_deltas`` is left as the model computed it on the unpruned prompt.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtr.adapters.base import Adapter, MetadataMismatch, SpliceState, VisionInfo, VisualSpans
from vtr.adapters.towers import qwen_vit_parts, unit_grid_2x2
from vtr.adapters.vision import TowerFacts, image_rows
from vtr.tokens import ImageLayout

__all__ = ["Qwen2VLAdapter"]


def _unit_windows(grid: tuple[int, int], *, merge: int, window: int) -> Tensor:
    """Window id of every unit (raster over the unit grid) of a ``grid`` patch grid (Qwen2.5-VL windows)."""
    hh, ww = grid[0] // merge, grid[1] // merge
    r = torch.arange(hh).view(-1, 1) // window
    c = torch.arange(ww).view(1, -1) // window
    return (r * ((ww + window - 1) // window) + c).flatten()


def _window_order_units(grid: tuple[int, int], *, merge: int, window: int) -> Tensor:
    """``[U, 4]``: the native rows of each unit when the encoder sees units in window order (Qwen2.5-VL)."""
    win = _unit_windows(grid, merge=merge, window=window)
    order = torch.argsort(win, stable=True)  # native position -> unit (windows in raster order, raster inside)
    pos = torch.argsort(order)  # unit -> its native position
    return (pos * merge * merge).unsqueeze(1) + torch.arange(merge * merge)


class Qwen2VLAdapter(Adapter):
    """Adapter for Qwen2-VL and Qwen2.5-VL: images and videos, several per prompt, M-RoPE positions.

    Layout per image: one group ``(1, h/2, w/2)`` in merge units; per video: ``t`` groups (one per
    temporal grid step, i.e. a "frame" for ``scope="frame"``), ``kind="video"``.
    """

    name: ClassVar[str] = "Qwen2-VL"
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
    )
    supports_video: ClassVar[bool] = True
    picture: ClassVar[str] = "whole"
    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features", "get_video_features")
    metadata_kwargs: ClassVar[tuple[str, ...]] = ("image_grid_thw", "video_grid_thw")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.vision_start_token_id = int(cfg.vision_start_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        if type(model).__name__.startswith("Qwen2_5"):
            self.name = "Qwen2.5-VL"  # type: ignore[misc]

    # ------------------------------------------------------------------ vision encoder
    @property
    def vision_info(self) -> VisionInfo:
        vc = self.model.config.vision_config
        window = hasattr(vc, "fullatt_block_indexes")
        return VisionInfo(
            encoder="model.visual",
            blocks="model.visual.blocks",
            num_blocks=int(vc.depth),
            patch_size=int(vc.patch_size),
            unit="merge2x2",
            unit_patches=self.merge * self.merge,
            has_cls=False,
            feature_layer=None,
            attention="window+full" if window else "varlen",
        )

    def tower(self) -> TowerFacts:
        info = self.vision_info
        visual = self.model.model.visual

        def sequences(args: tuple, kwargs: dict) -> list[tuple[int, int]]:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            return [(int(h), int(w)) for t, h, w in torch.as_tensor(grid).tolist() for _ in range(int(t))]

        facts = TowerFacts(
            info=info,
            encoder=visual,
            blocks=visual.blocks,
            parts=qwen_vit_parts,
            prefix=0,
            sequences=sequences,
            unit_patches=unit_grid_2x2,
            packed=True,
            merger=visual.merger,
        )
        if info.attention == "window+full":
            # Qwen2.5-VL: the blocks see units in window order, and all but the full-attention blocks attend within
            # windows of `ws x ws` units; windows stay those of the units' original locations.
            vc = self.model.config.vision_config
            ws = int(vc.window_size) // self.merge // int(vc.patch_size)
            full = {int(b) for b in vc.fullatt_block_indexes}
            facts.window_blocks = frozenset(b for b in range(info.num_blocks) if b not in full)
            facts.unit_windows = functools.partial(_unit_windows, merge=self.merge, window=ws)
            facts.unit_patches = functools.partial(_window_order_units, merge=self.merge, window=ws)
        return facts

    def video_frames(self, processor) -> list[Tensor]:
        """Frames of every video of the call, un-patchified and un-normalised from ``pixel_values_videos``."""
        pv = self.metadata.get("pixel_values_videos")
        grid = self.metadata.get("video_grid_thw")
        if pv is None or grid is None:
            raise ValueError(f"the {self.name} adapter saw no `pixel_values_videos` with `video_grid_thw` in this call")
        vp = getattr(processor, "video_processor", None) or processor.image_processor
        p, tp, m = int(vp.patch_size), int(vp.temporal_patch_size), int(vp.merge_size)
        mean = torch.tensor(vp.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(vp.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        out, off = [], 0
        for t, h, w in torch.as_tensor(grid).tolist():
            n = t * h * w
            x = pv[off : off + n].float().view(t, h // m, w // m, m, m, -1, tp, p, p)
            # The processor flattens (t, h/m, w/m, m, m, C, tp, p, p): undo it to (t*tp, C, h*p, w*p).
            x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, -1, h * p, w * p)
            out.append((x * std + mean).clamp(0, 1))
            off += n
        return out

    def tower_rows(self, spans, results):
        def seqs(im):
            (_, hh, ww) = im.grids[0]
            return [(hh * ww, len(im.grids))]

        images = image_rows(spans, results, "image", seqs)
        videos = image_rows(spans, results, "video", seqs)
        return [
            (torch.where(ri >= 0, ri, rv), torch.where(ri >= 0, si, sv), torch.where(ri >= 0, ui, uv))
            for (ri, si, ui), (rv, sv, uv) in zip(images, videos, strict=True)
        ]

    # ------------------------------------------------------------------ spans
    def _grids(self, name: str, needed: int) -> list[tuple[int, int, int]]:
        grid = self.metadata.get(name)
        if needed == 0:
            return []
        if grid is None:
            raise ValueError(
                f"the {self.name} adapter found {needed} {name.split('_')[0]}(s) in input_ids but no `{name}`: "
                "pass the processor outputs (pixel values with their grid) to forward/generate"
            )
        rows = [tuple(int(v) for v in row) for row in torch.as_tensor(grid).tolist()]
        return rows  # type: ignore[return-value]

    def batch_spans(self, input_ids: Tensor) -> list[VisualSpans]:
        """Spans of every sample: runs of image/video pad tokens matched to the captured grids in order.

        ``image_grid_thw`` lists the images of the whole batch in order (sample after sample), and
        ``video_grid_thw`` the videos; each grid covers ``t*h*w/merge**2`` consecutive pad rows.
        """
        ids = input_ids
        is_img = ids == self.image_token_id
        is_vid = ids == self.video_token_id
        starts = (ids == self.vision_start_token_id).roll(1, dims=1)
        starts[:, 0] = False
        # Every image/video begins right after <|vision_start|>: count them per kind.
        n_img = int((starts & is_img).sum())
        n_vid = int((starts & is_vid).sum())
        grids = {"image": self._grids("image_grid_thw", n_img), "video": self._grids("video_grid_thw", n_vid)}
        it = {k: iter(v) for k, v in grids.items()}
        used = {"image": 0, "video": 0}
        m2 = self.merge * self.merge
        out = []
        for b in range(ids.shape[0]):
            vis = (is_img[b] | is_vid[b]).nonzero().flatten()
            layout: list[ImageLayout] = []
            offset = 0
            while offset < len(vis):
                p = int(vis[offset])
                kind = "image" if bool(is_img[b, p]) else "video"
                try:
                    t, h, w = next(it[kind])
                except StopIteration:
                    raise MetadataMismatch(
                        f"input_ids hold more {kind}s than `{kind}_grid_thw` describes ({len(grids[kind])})"
                    ) from None
                used[kind] += 1
                n = t * h * w // m2
                run = vis[offset : offset + n]
                tok = self.image_token_id if kind == "image" else self.video_token_id
                if len(run) != n or not bool((ids[b, run] == tok).all()) or int(run[-1] - run[0]) != n - 1:
                    raise MetadataMismatch(
                        f"{kind} {used[kind] - 1} has grid {(t, h, w)} = {n} tokens, but input_ids hold a different "
                        f"run of {kind} tokens: the prompt was not expanded by this model's processor"
                    )
                hh, ww = h // self.merge, w // self.merge
                groups = ((1, hh, ww),) * t
                layout.append(ImageLayout(offset=offset, n_tokens=n, grids=groups, kind=kind))
                offset += n
            out.append(VisualSpans(seq_pos=vis, layout=tuple(layout)))
        for kind, rows in grids.items():
            if used[kind] != len(rows):
                raise MetadataMismatch(
                    f"`{kind}_grid_thw` describes {len(rows)} {kind}(s) but input_ids hold {used[kind]}"
                )
        return out

    def visual_spans(self, input_ids: Tensor) -> VisualSpans:
        """Spans of one sample (``[L]``); uses the captured grids like :meth:`batch_spans`."""
        return self.batch_spans(input_ids.unsqueeze(0))[0]

    # ------------------------------------------------------------------ decode
    def decode_positions(self, kwargs: dict[str, Any], state: SpliceState, past: int) -> Tensor | None:
        """``[3, B, q]`` M-RoPE ids of new tokens, as the unreduced model would build them.

        Unreduced, the model uses ``cumsum(mask) - 1 + rope_deltas`` (or ``cache_length + arange(q) +
        rope_deltas`` without a mask), i.e. 1 + the largest prompt position, plus the valid columns added
        since the prompt. ``state.next_pos`` holds that first value per sample; the mask may have the
        unreduced (``orig_len + grown + q``) or the reduced (``past + q``) length.
        """
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        bsz, q = ref.shape[:2]
        device = ref.device
        grown = past - state.new_len
        mask = kwargs.get("attention_mask")
        nxt = state.next_pos.to(device).view(bsz, 1)
        if mask is None or mask.ndim != 2:
            pos = nxt + grown + torch.arange(q, device=device).view(1, q)
        else:
            start = state.orig_len if mask.shape[-1] == state.orig_len + grown + q else state.new_len
            added = mask[:, start:].long()
            pos = nxt + added.cumsum(-1) - 1
            pos = pos.masked_fill(added == 0, 0)[:, -q:]
        # Compact mode: the language-model hook subtracts ``state.shift`` from these ids.
        return pos.unsqueeze(0).expand(3, bsz, q)
