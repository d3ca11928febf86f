"""Train the bundled tiny Qwen2-VL (``assets/tiny-synth-vl``) on :mod:`vtr.bench.synthqa`. CPU, seeded, resumable.

One model for images and videos:

* vision: Qwen2-VL ViT (patch 14, temporal patch 2, depth 4, width 128) + 2x2 PatchMerger: a 224-px image
  is 8x8 = 64 LLM tokens, a 16-frame 112-px clip 8 frame groups x 4x4 = 128 tokens;
* LLM: 4-layer Qwen2 decoder (hidden 192, 4 heads, 2 KV heads) with M-RoPE. The rotary frequencies are
  assigned to (t, h, w) INTERLEAVED (``mrope_section = [1] * 24``): with Qwen2-VL's default contiguous
  sections the width axis gets only the lowest frequencies, which barely rotate over an 8-token grid
  (angles < 0.02 rad), so the LLM cannot tell left from right. Interleaving gives every axis high and
  low frequencies; the model code is stock (``recomposition_frequencies`` cycles over the sections).

Three stages, because on two CPU cores the expensive part is not seeing but binding: a fresh LLM needs
thousands of steps to learn to look up "the star" among 64 visual tokens, and paying the tower's forward and
backward on every one of those steps is what made the previous recipe miss its goals.

1. ``reader`` (``--reader-steps``): the LLM alone, on every task (image QA, descriptions, clip QA, clip
   descriptions), reading :class:`Symbols` -- one learned vector per cell label (colour, shape of the object
   under each 28-px cell, per frame group for clips) -- in place of the visual tokens, at the real M-RoPE
   positions. No pixels, no tower: several times cheaper per step.
2. ``seer`` (``--seer-steps``): the tower (ViT + merger) alone, taught to output for every cell the vector of
   its label (squared distance plus cross-entropy over distances to all label vectors), on images and clips.
3. ``joint`` (``--joint-steps``): everything end to end on pixels at a low LR, the seer loss kept as an
   anchor, so the LLM also uses what the labels do not say (e.g. where in a cell an object sits).

Conversations: several questions per image (or one description) packed behind one shared image prefix
(``USER: <image> q1 ASSISTANT: a1</s> q2 ASSISTANT: a2</s> ...``), each turn masked from the others and given
the positions it would have alone (:func:`packed_positions_and_mask`); cross-entropy on every answer token and
its end token.

The batch of step ``s`` of a stage is a pure function of ``(--seed, stage, s)``, so ``--resume`` continues
exactly; ``--stage-min`` caps a stage by wall clock (then the run depends on the machine's speed). Checkpoints
go to ``--work`` every ``--ckpt-every`` steps, each stage's end model to ``--work/<stage>``; the final model is
exported with ``save_pretrained`` to ``--out``.

    nohup python scripts/train_tiny_vlm.py > /tmp/tiny_vlm.log 2>&1 &

The bundled checkpoint came from two runs (a resumed reader and ``--seer-init`` with the previous bundled
model's tower); the README's Results section has the exact commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting burn most of this process's time
# slice (measured here: 8x slower steps with 2 threads); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtr.bench import synthqa
from vtr.testing import QWEN_CHAT_TEMPLATE

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PATCH = 14
MERGE = 2
TEMPORAL = 2
GRID_IMG = synthqa.IMAGE_SIZE // (PATCH * MERGE)  # visual tokens per side of an image: 8
GRID_VID = synthqa.VIDEO_SIZE // (PATCH * MERGE)  # per side of a clip frame group: 4
MAX_NEW_TOKENS = 64  # the longest description (6 objects) is 43 tokens with its end token
IMAGE_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.3, "exist": 1.2, "left_right": 1.6, "top_bottom": 1.2}
VIDEO_WEIGHTS = {"few_frames": 1.5, "exist": 1.0, "when": 1.5}
#: The order in which the reader stage meets its tasks, ``--curriculum-steps`` apart. Learnt together from the
#: start, the six image question types sat at their answer priors for 500 steps (perfect symbolic input);
#: learnt one after another, each lookup builds on the last (colour alone: 0.89 after 300 steps).
CURRICULUM = (
    "colour",
    "shape",
    "exist",
    "count",
    "left_right",
    "top_bottom",
    "describe",
    "video:few_frames",
    "video:exist",
    "video:when",
    "video:describe",
)


def mixture(step: int, every: int, args) -> tuple[dict[str, float], float, dict[str, float], float]:
    """Image question weights, description share, clip question weights and clip description share at ``step``
    of the reader stage (the full mixture from step ``every * (len(CURRICULUM) - 1)`` on, and whenever
    ``every`` is 0)."""
    met = CURRICULUM if every <= 0 else CURRICULUM[: 1 + step // every]
    img = {k: w for k, w in IMAGE_WEIGHTS.items() if k in met}
    vid = {k: w for k, w in VIDEO_WEIGHTS.items() if f"video:{k}" in met}
    p_desc = args.p_desc if "describe" in met else 0.0
    p_vdesc = args.p_vdesc if "video:describe" in met else 0.0
    return img, p_desc, vid, p_vdesc


def build_model(seed: int):
    """The untrained model and its ``Qwen2VLProcessor`` (word-level tokenizer over :data:`synthqa.WORDS`)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from vtr.testing import qwen_tokenizer

    tok = qwen_tokenizer(synthqa.WORDS)  # the tiny test Qwens' word tokenizer, over the synthetic vocabulary
    ids = tok.convert_tokens_to_ids
    hidden, heads = 192, 4
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=4,
            embed_dim=128,
            hidden_size=hidden,
            num_heads=4,
            mlp_ratio=4,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        ),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1] * (hidden // heads // 2),
            },
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gc.max_new_tokens = MAX_NEW_TOKENS
    gc.do_sample = False
    img_px = synthqa.IMAGE_SIZE**2
    vid_px = synthqa.VIDEO_SIZE**2
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": img_px, "longest_edge": img_px},
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL,
            merge_size=MERGE,
        ),
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": vid_px, "longest_edge": vid_px},
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL,
            merge_size=MERGE,
            do_sample_frames=False,
            cap_pixels_per_frame=True,
        ),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model.eval(), processor


def patchify(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 (T even) -> ``[T/2 * H/14 * W/14, 1176]``, as ``Qwen2VLImageProcessor`` /
    ``Qwen2VLVideoProcessor`` lay them out for frames that need no resize (merge blocks in raster order)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - MEAN) / STD
    t, c, h, w = x.shape
    x = x.reshape(t // TEMPORAL, TEMPORAL, c, h // PATCH // MERGE, MERGE, PATCH, w // PATCH // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(-1, c * TEMPORAL * PATCH * PATCH)


class Symbols(nn.Module):
    """The reader's visual vocabulary: what each visual token should say about its cell.

    A cell's vector is ``table[colour, shape]``: one learned vector per label (0 = background). With
    ``positions``, ``row[r] + col[c]`` codes of the cell's row and column (eight bins of the frame; a 4x4 clip frame
    uses every other bin) are added. They are meant for left/right: rotary positions shape attention weights but
    never enter the values, so an LLM must infer "left" from how much a token attends to others, which it learns
    late or not at all (the bundled models answer left/right at chance), while a ViT sees where a patch is.
    In two runs here they made the conjunction lookups ("is there a red circle ?") stay at chance for 2000
    reader steps -- at the label vectors' scale, and started 10x smaller, as Adam grows them within a few hundred
    steps -- so the bundled model is trained without them.

    Stage 1 feeds these vectors to the LLM in place of the visual tokens, so the LLM learns to read scenes
    without paying for the tower; stage 2 teaches the tower to output them; stage 3 tunes both on pixels.
    """

    BINS = 8

    def __init__(self, dim: int, seed: int, positions: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 4321)
        self.n_shapes = len(synthqa.SHAPES) + 1
        self.table = nn.Parameter(torch.randn((len(synthqa.COLOURS) + 1) * self.n_shapes, dim, generator=g))
        row, col = (torch.randn(self.BINS, dim, generator=g) * 0.05 for _ in range(2))
        if positions:
            self.row, self.col = nn.Parameter(row), nn.Parameter(col)
        else:
            self.register_buffer("row", torch.zeros_like(row), persistent=False)
            self.register_buffer("col", torch.zeros_like(col), persistent=False)

    def index(self, cc: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        return cc * self.n_shapes + cs

    def where(self, n: int, grid: int) -> torch.Tensor:
        """Row and column codes ``[n, D]`` of ``n`` cells laid out as whole ``grid x grid`` frames, raster order."""
        k = torch.arange(n) % (grid * grid)
        scale = self.BINS // grid
        return self.row[(k // grid) * scale] + self.col[(k % grid) * scale]

    def forward(self, cc: torch.Tensor, cs: torch.Tensor, grid: int) -> torch.Tensor:
        """``cc``/``cs`` ``[N]`` labels of whole ``grid x grid`` frames, raster order -> ``[N, D]``."""
        return self.table[self.index(cc, cs)] + self.where(len(cc), grid)

    def tower_loss(
        self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
    ) -> tuple[torch.Tensor, float]:
        """How far the tower's tokens are from their cells' vectors (fixed targets), over ``parts`` of
        ``(feats [N, D], cc [N], cs [N], grid)``: squared distance to the target plus cross-entropy over the
        squared distances of ``feats - position code`` to every label vector; object cells weigh 4x background.
        Returns the loss and the nearest-label accuracy on object cells."""
        num = den = 0.0
        hits = []
        table = self.table.detach()
        for feats, cc, cs, grid in parts:
            f = feats.float()
            pos = self.where(len(cc), grid).detach()
            y = self.index(cc, cs)
            w = torch.where(cc > 0, 4.0, 1.0)
            mse = (f - table[y] - pos).pow(2).mean(-1)
            c = f - pos
            d = (c.pow(2).sum(-1, keepdim=True) - 2 * c @ table.T + table.pow(2).sum(-1)) / f.shape[-1]
            per = mse + F.cross_entropy(-d, y, reduction="none")
            num = num + (per * w).sum()
            den = den + w.sum()
            with torch.no_grad():
                hits.append((d.argmin(-1) == y)[cc > 0].float())
        hit = torch.cat(hits)
        return num / den, hit.mean().item() if len(hit) else 1.0


class Batcher:
    """Token-level batches that reproduce the chat template's tokenization (checked in ``--check``)."""

    def __init__(self, tokenizer, config):
        self.tok = tokenizer
        self._cache: dict[str, list[int]] = {}
        self.pad = tokenizer.pad_token_id
        self.eos = tokenizer.eos_token_id
        self.vs = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.ve = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.img = config.image_token_id
        self.vid = config.video_token_id
        self.user = self.ids("USER:")
        self.assistant = self.ids("ASSISTANT:")
        self.answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(a) for a in synthqa.ANSWERS])
        self.n_img = (synthqa.IMAGE_SIZE // PATCH // MERGE) ** 2
        self.n_vid = synthqa.VIDEO_GROUPS * (synthqa.VIDEO_SIZE // PATCH // MERGE) ** 2

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def visual(self, video: bool) -> list[int]:
        return [self.vs] + [self.vid if video else self.img] * (self.n_vid if video else self.n_img) + [self.ve]

    def conversation(self, turns: list[tuple[str, str, str]], video: bool) -> tuple[list[int], list[tuple], list[int]]:
        """Token ids of several turns about one image (or clip) packed behind one shared prefix, their targets
        ``(position predicting it, token, weight, kind)`` and where each turn starts.

        Layout: ``USER: <vision> q1 ASSISTANT: a1 </s> q2 ASSISTANT: a2 </s> ...``. The first turn is exactly the
        single-question prompt; :func:`forward_llm` gives every later turn the positions of a first turn and lets
        it see only the prefix and itself, so each turn is the single-question case, computed once per image, and
        no answer can be copied from another turn's text (the earlier recipes' packing allowed that).
        """
        seq: list[int] = self.user + self.visual(video)
        targets: list[tuple[int, int, float, str]] = []
        starts: list[int] = []
        for q, a, qtype in turns:
            starts.append(len(seq))
            seq += self.ids(q) + self.assistant
            ans = [*self.ids(a), self.eos]
            long = qtype == "describe"
            for j, t in enumerate(ans):
                w = 0.5 if long else (2.0 if j == 0 else 0.5)
                targets.append((len(seq) - 1 + j, t, w, qtype))
            seq += ans
        return seq, targets, starts

    @staticmethod
    def _draw(rng: np.random.Generator, weights: dict[str, float]) -> str:
        keys = list(weights)
        p = np.array([weights[k] for k in keys])
        return keys[rng.choice(len(keys), p=p / p.sum())]

    def turns(self, item, ask, rng, n: int, p_desc: float, weights: dict[str, float]) -> list[tuple[str, str, str]]:
        """One description turn (probability ``p_desc``, always if ``weights`` is empty) or up to ``n`` distinct
        questions drawn by ``weights``, never both (kept from the unmasked packing, where a description let later
        answers be copied from text; the bundled model was trained so). ``ask`` is :func:`synthqa.ask` (scenes) or
        :func:`synthqa.ask_clip` (clips)."""
        if not weights or rng.random() < p_desc:
            q, a = ask(item, "describe", rng)
            return [(q, a, "describe")]
        turns: list[tuple[str, str, str]] = []
        tries = 0
        while len(turns) < n and tries < 4 * n:
            tries += 1
            qtype = self._draw(rng, weights)
            qa = ask(item, qtype, rng)
            if qa is not None and all(qa[0] != t[0] for t in turns):  # a repeated question is a copy task
                turns.append((qa[0], qa[1], qtype))
        return turns

    def collate(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded ``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` (1 image, 2 video)."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(n - len(s), n) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        types = (ids == self.img).long() + 2 * (ids == self.vid).long()
        return ids, mask, types


def fast_patch_embed(model) -> None:
    """Run this instance's Conv3d patch embedding as the equivalent matmul (training only: CPU Conv3d backward is
    ~10x slower than the matmul). Kernel = stride = the flattened patch, so the conv is one dot product per patch."""
    pe = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = pe.proj.weight.reshape(pe.embed_dim, -1)
        return F.linear(hidden_states.reshape(-1, w.shape[1]).to(w.dtype), w)

    pe.forward = forward


def tower(model, pv_img: torch.Tensor | None, pv_vid: torch.Tensor | None, n_img: int, n_vid: int):
    """Visual tokens of ``n_img`` 224-px images (``pv_img`` ``[n_img*256, 1176]``) and ``n_vid`` 16-frame 112-px
    clips (``pv_vid`` ``[n_vid*512, 1176]``): ``([n_img*64, D] | None, [n_vid*128, D] | None)``."""
    visual = model.model.visual
    g_img = synthqa.IMAGE_SIZE // PATCH
    g_vid = synthqa.VIDEO_SIZE // PATCH
    fi = visual(pv_img, grid_thw=torch.tensor([[1, g_img, g_img]] * n_img)).pooler_output if n_img else None
    fv = (
        visual(pv_vid, grid_thw=torch.tensor([[synthqa.VIDEO_GROUPS, g_vid, g_vid]] * n_vid)).pooler_output
        if n_vid
        else None
    )
    return fi, fv


def forward_llm(model, ids, mask, types, feats_img=None, feats_vid=None, starts=None) -> torch.Tensor:
    """The Qwen2-VL LLM forward by hand: visual tokens spliced at their placeholders, M-RoPE ids as the stock
    model builds them; returns the last hidden states ``[B, L, D]``.

    ``starts`` (per sample, where each turn of a :meth:`Batcher.conversation` starts): every turn after the
    first gets the first turn's positions and attends to the shared prefix and itself only.
    """
    inner = model.model
    emb = inner.get_input_embeddings()(ids)
    g_img = synthqa.IMAGE_SIZE // PATCH
    g_vid = synthqa.VIDEO_SIZE // PATCH
    gi = gv = None
    if feats_img is not None:
        gi = torch.tensor([[1, g_img, g_img]] * int((ids == model.config.image_token_id).any(-1).sum()))
        sel = (ids == model.config.image_token_id).unsqueeze(-1)
        emb = emb.masked_scatter(sel, feats_img.to(emb.dtype))
    if feats_vid is not None:
        gv = torch.tensor(
            [[synthqa.VIDEO_GROUPS, g_vid, g_vid]] * int((ids == model.config.video_token_id).any(-1).sum())
        )
        sel = (ids == model.config.video_token_id).unsqueeze(-1)
        emb = emb.masked_scatter(sel, feats_vid.to(emb.dtype))
    pos, _ = inner.get_rope_index(ids, types, image_grid_thw=gi, video_grid_thw=gv, attention_mask=mask)
    attn = mask
    if starts is not None:
        pos, attn = packed_positions_and_mask(pos, mask, starts)
    return inner.language_model(inputs_embeds=emb, attention_mask=attn, position_ids=pos).last_hidden_state


def packed_positions_and_mask(pos: torch.Tensor, mask: torch.Tensor, starts: list[list[int]]):
    """M-RoPE ids ``[3, B, L]`` and a boolean attention mask ``[B, 1, L, L]`` (True = may attend) for
    shared-prefix packing: turn ``k >= 1`` (from ``starts[b][k]`` to the next start or the end of the sample)
    restarts at the first turn's position and sees the prefix (everything before ``starts[b][0]``) and its own
    earlier tokens; padding rows see the prefix (no empty softmax row)."""
    b, n = mask.shape
    pos = pos.clone()
    seg = torch.full((b, n), -1, dtype=torch.long)
    for i, st in enumerate(starts):
        end = int(mask[i].sum())
        bounds = [*st, end]
        base = pos[:, i, st[0]]
        for k in range(len(st)):
            s0, s1 = bounds[k], bounds[k + 1]
            seg[i, s0:s1] = k
            if k:
                pos[:, i, s0:s1] = base[:, None] + torch.arange(s1 - s0)
        seg[i, end:] = -2
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == -1)
    valid = (seg != -2)[:, None, :]
    attn = causal & same & valid
    return pos, attn[:, None]


class Batch:
    """One training batch: ``n_img`` scenes then ``n_vid`` clips, their conversations as padded token ids, the
    answer targets, pixels and per-cell labels. A pure function of ``(seed, stage, step)``."""

    def __init__(self, batcher: Batcher, rng: np.random.Generator, n_img: int, n_vid: int, mix=None, args=None):
        seqs, targets, starts, img_frames, vid_frames = [], [], [], [], []
        cc_i, cs_i, cc_v, cs_v = [], [], [], []
        text = mix is not None
        w_img, p_desc, w_vid, p_vdesc = mix if text else ({}, 0.0, {}, 0.0)
        if text and not w_vid and not p_vdesc:
            n_vid = 0
        kinds = (  # (count, draw, ask, questions, description share, weights, video, frames, cc, cs)
            (n_img, synthqa.make_scene, synthqa.ask, "qpi", p_desc, w_img, False, img_frames, cc_i, cs_i),
            (n_vid, synthqa.make_clip, synthqa.ask_clip, "qpv", p_vdesc, w_vid, True, vid_frames, cc_v, cs_v),
        )
        for count, draw, ask, n_q, p, w, video, frames, ccs, css in kinds:
            while len(frames) < count:
                item = draw(rng)
                if text:
                    turns = batcher.turns(item, ask, rng, getattr(args, n_q), p, w)
                    if not turns:
                        continue
                    s, t, st = batcher.conversation(turns, video=video)
                    seqs.append(s)
                    targets.append(t)
                    starts.append(st)
                frames.append(item.frames if video else np.stack([item.image, item.image]))
                cc, cs = synthqa.clip_cells(item) if video else (item.cell_colour, item.cell_shape)
                ccs.append(cc.flatten())
                css.append(cs.flatten())
        self.n_img, self.n_vid = n_img, n_vid
        self.frames_img, self.frames_vid = img_frames, vid_frames
        cat = lambda xs: torch.from_numpy(np.concatenate(xs)) if xs else None  # noqa: E731
        self.labels_img = (cat(cc_i), cat(cs_i))
        self.labels_vid = (cat(cc_v), cat(cs_v))
        if text:
            self.ids, self.mask, self.types = batcher.collate(seqs)
            self.starts = starts
            self.rows = torch.tensor([i for i, t in enumerate(targets) for _ in t])
            self.cols = torch.tensor([c for t in targets for c, *_ in t])
            self.ys = torch.tensor([y for t in targets for _, y, *_ in t])
            self.ws = torch.tensor([w for t in targets for _, _, w, _ in t])

    def parts(self, fi, fv) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """The tower's image and clip tokens with their labels, for :meth:`Symbols.tower_loss`."""
        out = []
        if self.n_img:
            out.append((fi, *self.labels_img, GRID_IMG))
        if self.n_vid:
            out.append((fv, *self.labels_vid, GRID_VID))
        return out

    def pixels(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pi = torch.cat([patchify(f) for f in self.frames_img]) if self.n_img else None
        pv = torch.cat([patchify(f) for f in self.frames_vid]) if self.n_vid else None
        return pi, pv

    def symbols(self, symbols: Symbols) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        fi = symbols(*self.labels_img, GRID_IMG) if self.n_img else None
        fv = symbols(*self.labels_vid, GRID_VID) if self.n_vid else None
        return fi, fv


@torch.no_grad()
def evaluate(model, batcher: Batcher, items: list, video: bool, symbols: Symbols | None = None, bs: int = 40):
    """Teacher-forced validation, reading pixels through the tower or (``symbols``) the cell labels' vectors.

    For one-word answers, argmax over :data:`synthqa.ANSWERS` at the first answer position; for descriptions,
    the share of items whose every answer token (and the end token) is the argmax, i.e. that greedy decoding
    reproduces exactly, and the token accuracy."""
    was = model.training
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        seqs, tgts = [], []
        for s in chunk:
            seq, t, _ = batcher.conversation([(s.question, s.answer, s.qtype)], video=video)
            seqs.append(seq)
            tgts.append(t)
        ids, mask, types = batcher.collate(seqs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if symbols is not None:
                if video:
                    labels = [synthqa.clip_cells(s.clip) for s in chunk]
                else:
                    labels = [(s.scene.cell_colour, s.scene.cell_shape) for s in chunk]
                cc = torch.from_numpy(np.concatenate([c.flatten() for c, _ in labels]))
                cs = torch.from_numpy(np.concatenate([x.flatten() for _, x in labels]))
                feats = symbols(cc, cs, GRID_VID if video else GRID_IMG)
            else:
                pv = torch.cat([patchify(s.frames if video else np.stack([s.image, s.image])) for s in chunk])
                fi, fv = tower(
                    model,
                    None if video else pv,
                    pv if video else None,
                    0 if video else len(chunk),
                    len(chunk) if video else 0,
                )
                feats = fv if video else fi
            h = forward_llm(model, ids, mask, types, None if video else feats, feats if video else None)
            for b, (s, t) in enumerate(zip(chunk, tgts, strict=True)):
                pos = torch.tensor([c for c, *_ in t])
                logits = model.lm_head(h[b, pos]).float()
                if s.qtype == "describe":
                    ok = logits.argmax(-1) == torch.tensor([y for _, y, *_ in t])
                    hits.setdefault("describe_exact", []).append(float(ok.all()))
                    hits.setdefault("describe_tokens", []).append(ok.float().mean().item())
                else:
                    pred = batcher.answer_ids[logits[0, batcher.answer_ids].argmax()]
                    hits.setdefault(s.qtype, []).append(float(int(pred) == t[0][1]))
    model.train(was)
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    qa = [x for k, v in hits.items() if not k.startswith("describe") for x in v]
    if qa:
        res["qa"] = float(np.mean(qa))
    return res


def lr_at(s: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to 5% of it at step ``total``."""
    if s < warmup:
        return peak * (s + 1) / warmup
    t = min(1.0, (s - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def export(model, processor, path: Path) -> None:
    """``save_pretrained`` (safetensors, fp32) of model and processor, in eval mode."""
    was = model.training
    model.eval()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    model.train(was)


def check(model, processor, batcher: Batcher) -> None:
    """The training path equals the stock one on one image and one clip: token ids and pixels as the processor
    makes them, and last-position logits of :func:`forward_hidden` with :func:`fast_patch_embed` as the
    unpatched model's own forward (run on a copy, so ``model`` itself is not patched)."""
    import copy

    fast = copy.deepcopy(model)
    fast_patch_embed(fast)
    img = synthqa.sample("validation", 0)
    clip = synthqa.sample("validation", 0, task="video")
    for item, video in ((img, False), (clip, True)):
        text = processor.apply_chat_template(
            synthqa.prompt_messages(item.question, video=video), add_generation_prompt=True
        )
        if video:
            inputs = processor(videos=[item.frames], text=[text], return_tensors="pt")
            pv = inputs["pixel_values_videos"]
        else:
            inputs = processor(images=[synthqa.to_pil(item.image)], text=[text], return_tensors="pt")
            pv = inputs["pixel_values"]
        seq, _, _ = batcher.conversation([(item.question, item.answer, item.qtype)], video=video)
        n_prompt = inputs["input_ids"].shape[1]
        assert inputs["input_ids"][0].tolist() == seq[:n_prompt], (inputs["input_ids"][0].tolist(), seq)
        mine = patchify(item.frames if video else np.stack([item.image, item.image]))
        assert torch.allclose(mine, pv, atol=1e-5), (mine - pv).abs().max()
        ids, mask, types = batcher.collate([seq[:n_prompt]])
        with torch.no_grad():
            ref = model(**inputs).logits[0, -1]
            fi, fv = tower(fast, None if video else mine, mine if video else None, 0 if video else 1, 1 if video else 0)
            got = fast.lm_head(forward_llm(fast, ids, mask, types, fi, fv)[0, -1])
        assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    # shared-prefix packing: each turn of a packed conversation scores exactly as when asked alone
    items = synthqa.split("validation", 3, task="image")
    scene = items[0].scene
    turns = [
        (synthqa.ask(scene, q, np.random.default_rng(k)) or ("describe the image .", "", q))
        for k, q in enumerate(("colour", "count", "exist"))
    ]
    turns = [(q, a, "qa") for q, a in turns]
    pv = patchify(np.stack([scene.image, scene.image]))
    with torch.no_grad():
        fi, _ = tower(fast, pv, None, 1, 0)
        seq, tgt, starts = batcher.conversation(turns, video=False)
        ids, mask, types = batcher.collate([seq])
        packed = fast.lm_head(forward_llm(fast, ids, mask, types, fi, None, [starts])[0])
        for k, turn in enumerate(turns):
            one, t1, _ = batcher.conversation([turn], video=False)
            ids, mask, types = batcher.collate([one])
            alone = fast.lm_head(forward_llm(fast, ids, mask, types, fi, None)[0])
            mine = [c for c, *_ in tgt][sum(len(batcher.ids(a)) + 1 for _, a, _ in turns[:k]) :][: len(t1)]
            ref = alone[torch.tensor([c for c, *_ in t1])]
            assert torch.allclose(packed[torch.tensor(mine)], ref, atol=1e-4), (packed[mine] - ref).abs().max()
    print(
        "check: the training path matches the processor and the stock forward (image and clip); "
        "packed turns score as asked alone",
        flush=True,
    )


STAGES = ("reader", "seer", "joint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny-synth-vl"))
    ap.add_argument("--work", default="/tmp/tiny_vlm_work", help="checkpoints and per-stage exports")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader-steps", type=int, default=4000, help="stage 1: the LLM reads cell-label vectors")
    ap.add_argument("--seer-steps", type=int, default=1500, help="stage 2: the tower learns to output them")
    ap.add_argument("--joint-steps", type=int, default=600, help="stage 3: everything on pixels")
    ap.add_argument(
        "--stage-min",
        default="",
        help="optional wall-clock caps per stage in minutes, e.g. 40,30,30: a stage that reaches its cap ends there "
        "(logged; the run is then no longer a pure function of the seed)",
    )
    ap.add_argument("--batch", type=int, default=12, help="images per step (reader and joint stages)")
    ap.add_argument("--video-batch", type=int, default=6, help="clips per step (reader and joint stages)")
    ap.add_argument(
        "--seer-batch", type=int, default=12, help="images per step in the seer stage (plus as many clips / 2)"
    )
    ap.add_argument(
        "--curriculum-steps", type=int, default=100, help="reader stage: steps between new tasks (0: all at once)"
    )
    ap.add_argument("--qpi", type=int, default=10, help="questions per image")
    ap.add_argument("--qpv", type=int, default=4, help="questions per clip")
    ap.add_argument("--p-desc", type=float, default=0.3, help="share of images with a description (alone)")
    ap.add_argument("--p-vdesc", type=float, default=0.3, help="share of clips with a description (alone)")
    ap.add_argument("--lr", type=float, default=1e-3, help="reader stage peak LR")
    ap.add_argument("--seer-lr", type=float, default=1e-3)
    ap.add_argument("--joint-lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--anchor-weight", type=float, default=0.3, help="joint stage: weight of the seer loss")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=240)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--position-codes",
        action="store_true",
        help="add row/column codes to the cell vectors (see Symbols; in two runs here the conjunction questions, "
        "e.g. 'is there a red circle ?', then stayed at chance for 2000 reader steps, so the bundled model has none)",
    )
    ap.add_argument(
        "--seer-init",
        metavar="MODEL_DIR",
        help="start the seer stage from the vision tower (ViT + merger) of a saved Qwen2-VL of this shape, e.g. "
        "the previous bundled model (git show 38a5016:assets/tiny-synth-vl/...): its tower already tells colour "
        "and shape per cell, so the seer only remaps it to the cell vectors",
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--check", action="store_true", help="verify the hand-built batches against the processor, exit")
    ap.add_argument(
        "--score",
        metavar="MODEL_DIR",
        help="score a saved model on the --score-split of every task (image QA per type, descriptions, clip QA), "
        "teacher-forced as in training, and exit",
    )
    ap.add_argument("--score-split", default="test", choices=("validation", "test"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build_model(args.seed)
    batcher = Batcher(processor.tokenizer, model.config)
    if args.check:
        check(model, processor, batcher)
        return 0
    if args.score:
        from transformers import Qwen2VLForConditionalGeneration

        saved = Qwen2VLForConditionalGeneration.from_pretrained(args.score).eval()
        res = {}
        for task in synthqa.TASKS:
            items = synthqa.split(args.score_split, task=task)
            res[task] = {k: round(v, 3) for k, v in evaluate(saved, batcher, items, task == "video").items()}
            res[task]["n"] = len(items)
        print(json.dumps({"model": args.score, "split": args.score_split, **res}), flush=True)
        return 0
    fast_patch_embed(model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    symbols = Symbols(model.config.text_config.hidden_size, args.seed, positions=args.position_codes)
    llm = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    vision = list(model.model.visual.parameters())
    opts = {
        "reader": torch.optim.AdamW(llm + list(symbols.parameters()), lr=args.lr, weight_decay=0.01),
        "seer": torch.optim.AdamW(vision, lr=args.seer_lr, weight_decay=0.01),
        "joint": torch.optim.AdamW(llm + vision, lr=args.joint_lr, weight_decay=0.01),
    }
    totals = {"reader": args.reader_steps, "seer": args.seer_steps, "joint": args.joint_steps}
    peaks = {"reader": args.lr, "seer": args.seer_lr, "joint": args.joint_lr}
    caps = dict(zip(STAGES, [float(x) * 60 for x in args.stage_min.split(",")], strict=True)) if args.stage_min else {}
    state = {"stage": 0, "step": 0, "elapsed": 0.0, "stage_t0": 0.0, "ends": {}}
    ckpt = work / "ckpt.pt"
    if args.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        symbols.load_state_dict(saved["symbols"])
        for k, o in opts.items():
            o.load_state_dict(saved["opts"][k])
        state = saved["state"]
        print(
            f"resumed: {STAGES[min(state['stage'], 2)]} step {state['step']} ({state['elapsed'] / 60:.1f} min)",
            flush=True,
        )
    val = {
        "image": synthqa.split("validation", args.eval_n, task="image"),
        "describe": synthqa.split("validation", args.eval_n // 4, task="describe"),
        "video": synthqa.split("validation", args.eval_n, task="video"),
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model.train()
    t0 = time.time() - state["elapsed"]

    def clock() -> float:
        return time.time() - t0

    def save() -> None:
        state["elapsed"] = clock()
        tmp = work / "ckpt.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "symbols": symbols.state_dict(),
                "opts": {k: o.state_dict() for k, o in opts.items()},
                "state": state,
            },
            tmp,
        )
        tmp.replace(ckpt)

    def run_eval(through: str) -> dict:
        sym = symbols if through == "symbols" else None
        res = {task: evaluate(model, batcher, items, task == "video", sym) for task, items in val.items()}
        rounded = {k: {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}
        print(
            "eval "
            + json.dumps(
                {
                    "stage": STAGES[min(state["stage"], 2)],
                    "step": state["step"],
                    "through": through,
                    "min": round(clock() / 60, 1),
                    **rounded,
                }
            ),
            flush=True,
        )
        return res

    run: dict[str, float] = {}
    while state["stage"] < len(STAGES):
        stage = STAGES[state["stage"]]
        step = state["step"]
        cap = caps.get(stage)
        if step >= totals[stage] or (cap is not None and clock() - state["stage_t0"] > cap):
            state["ends"][stage] = {"step": step, "min": round(clock() / 60, 1)}
            print(f"{stage} stage ends at step {step} ({clock() / 60:.1f} min)", flush=True)
            if stage == "reader":
                run_eval("symbols")
                export(model, processor, work / "reader")
            else:
                run_eval("tower")
                export(model, processor, work / stage)
            state.update(stage=state["stage"] + 1, step=0, stage_t0=clock())
            save()
            continue
        if stage == "seer" and step == 0 and args.seer_init:
            from transformers import Qwen2VLForConditionalGeneration

            donor = Qwen2VLForConditionalGeneration.from_pretrained(args.seer_init)
            model.model.visual.load_state_dict(donor.model.visual.state_dict())
            del donor
            print(f"seer starts from the tower of {args.seer_init}", flush=True)
        rng = np.random.default_rng([args.seed, STAGES.index(stage), step])
        opt = opts[stage]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, totals[stage], peaks[stage], args.warmup)
        with autocast:
            if stage == "seer":
                batch = Batch(batcher, rng, args.seer_batch, args.seer_batch // 2)
                fi, fv = tower(model, *batch.pixels(), batch.n_img, batch.n_vid)
                loss, acc = symbols.tower_loss(batch.parts(fi, fv))
                metrics = {"seer": loss.item(), "seer_acc": acc}
                params = vision
            else:
                every = args.curriculum_steps if stage == "reader" else 0
                batch = Batch(batcher, rng, args.batch, args.video_batch, mixture(step, every, args), args)
                if stage == "reader":
                    fi, fv = batch.symbols(symbols)
                    params = llm + list(symbols.parameters())
                else:
                    fi, fv = tower(model, *batch.pixels(), batch.n_img, batch.n_vid)
                    params = llm + vision
                h = forward_llm(model, batch.ids, batch.mask, batch.types, fi, fv, batch.starts)
                logits = model.lm_head(h[batch.rows, batch.cols])
                ce = F.cross_entropy(logits.float(), batch.ys, reduction="none")
                loss = (ce * batch.ws).sum() / batch.ws.sum()
                metrics = {"loss": loss.item(), "token_acc": (logits.argmax(-1) == batch.ys).float().mean().item()}
                if stage == "joint" and args.anchor_weight:
                    anchor, acc = symbols.tower_loss(batch.parts(fi, fv))
                    loss = loss + args.anchor_weight * anchor
                    metrics.update(seer=anchor.item(), seer_acc=acc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in metrics.items():
            run[k] = run.get(k, 0.0) + v
        run["n"] = run.get("n", 0) + 1
        state["step"] = step = step + 1
        if step % 25 == 0:
            n = run.pop("n")
            shown = " ".join(f"{k} {v / n:.4f}" for k, v in run.items())
            print(
                f"{stage} step {step} lr {opt.param_groups[0]['lr']:.2e} {shown} elapsed {clock() / 60:.1f} min",
                flush=True,
            )
            run = {}
        if step % args.eval_every == 0 and step < totals[stage]:
            if stage == "seer":  # the reader, unchanged, on what the tower says so far
                run_eval("tower")
            else:
                run_eval("symbols" if stage == "reader" else "tower")
        if step % args.ckpt_every == 0:
            save()
    export(model, processor, Path(args.out))
    print(
        f"done in {clock() / 60:.1f} min; stage ends {json.dumps(state['ends'])}; model saved to {args.out}", flush=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
