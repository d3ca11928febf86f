"""Train the bundled tiny Qwen2-VL (``assets/tiny-synth-vl``) on :mod:`vtr.bench.synthqa`. CPU, seeded, resumable.

One model for images and videos:

* vision: Qwen2-VL ViT (patch 14, temporal patch 2, depth 4, width 128) + 2x2 PatchMerger: a 224-px image
  is 8x8 = 64 LLM tokens, a 16-frame 112-px clip 8 frame groups x 4x4 = 128 tokens;
* LLM: 4-layer Qwen2 decoder (hidden 192, 4 heads, 2 KV heads) with M-RoPE. The rotary frequencies are
  assigned to (t, h, w) INTERLEAVED (``mrope_section = [1] * 24``): with Qwen2-VL's default contiguous
  sections the width axis gets only the lowest frequencies, which barely rotate over an 8-token grid
  (angles < 0.02 rad), so the LLM cannot tell left from right. Interleaving gives every axis high and
  low frequencies; the model code is stock (``recomposition_frequencies`` cycles over the sections).

Stages (all in one run, switched by progress = steps or wall clock, whichever is ahead):

1. ``--pretrain-frac`` of the budget: tower + merger alone, per-cell auxiliary heads (colour and shape of
   the object under each 28-px cell, i.e. under each LLM token).
2. images: several questions per image packed as one conversation (``USER: <image> q1 ASSISTANT: a1</s>
   USER: q2 ...``), plus (often) one description turn; cross-entropy on every answer token and its
   end token, plus the auxiliary loss.
3. from ``--video-from`` of the full stage on: the same plus ``--video-batch`` clips per step, each with
   several video questions (few-frames colour, existence, when, description).

The batch of step ``s`` is a pure function of ``(--seed, s, stage)``, so ``--resume`` continues exactly;
stage switches and LR follow the clock when ``--budget-min`` is set (not bit-identical across machines).
Checkpoints go to ``--work`` every ``--ckpt-every`` steps; the best-on-validation model to ``--work/best``;
at the end the final model is exported with ``save_pretrained`` to ``--out``.

    nohup python scripts/train_tiny_vlm.py --budget-min 170 > /tmp/tiny_vlm.log 2>&1 &
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
MAX_NEW_TOKENS = 64  # the longest description (6 objects) is 43 tokens with its end token
IMAGE_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.3, "exist": 1.2, "left_right": 1.6, "top_bottom": 1.2}
VIDEO_WEIGHTS = {"few_frames": 1.5, "exist": 1.0, "when": 1.5}
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


class AuxHeads(nn.Module):
    """Per-token heads on the merger output: colour (6) and shape (6) of the object under each 28-px cell."""

    def __init__(self, dim: int, align_weight: float = 0.0):
        super().__init__()
        self.colour = nn.Linear(dim, len(synthqa.COLOURS) + 1)
        self.shape = nn.Linear(dim, len(synthqa.SHAPES) + 1)
        self.align_weight = align_weight
        # Fixed random codes: a cell should be code(colour) + code(shape) of its object, index 0 = background (a
        # fixed direction too: a near-zero target would be blown up to noise by the LLM's RMSNorm).
        g = torch.Generator().manual_seed(1234)
        codes_c = torch.randn(len(synthqa.COLOURS) + 1, dim, generator=g)
        codes_s = torch.randn(len(synthqa.SHAPES) + 1, dim, generator=g)
        self.register_buffer("codes_c", codes_c, persistent=False)
        self.register_buffer("codes_s", codes_s, persistent=False)

    def loss(self, feats: torch.Tensor, cc: torch.Tensor, cs: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``feats`` ``[B*64, D]``; ``cc``/``cs`` ``[B*64]`` labels. Object cells weigh 5x background."""
        f = feats.float()
        obj = cc > 0
        w = torch.where(obj, 5.0, 1.0)
        total = 0.0
        for head, y in ((self.colour, cc), (self.shape, cs)):
            total = total + (F.cross_entropy(head(f), y, reduction="none") * w).sum() / w.sum()
        if self.align_weight:
            target = self.codes_c[cc] + self.codes_s[cs]
            mse = ((f - target) ** 2).mean(-1)
            total = total + self.align_weight * (mse * w).sum() / w.sum()
        with torch.no_grad():
            ok = (self.colour(f).argmax(-1) == cc) & (self.shape(f).argmax(-1) == cs)
            acc = ok[obj].float().mean().item() if obj.any() else 0.0
        return total, acc


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

    def conversation(self, turns: list[tuple[str, str, str]], video: bool) -> tuple[list[int], list[tuple]]:
        """Token ids of a multi-turn conversation and its targets ``(position predicting it, token, weight, kind)``."""
        seq: list[int] = []
        targets: list[tuple[int, int, float, str]] = []
        for k, (q, a, qtype) in enumerate(turns):
            seq += self.user + (self.visual(video) if k == 0 else []) + self.ids(q) + self.assistant
            ans = [*self.ids(a), self.eos]
            long = qtype == "describe"
            for j, t in enumerate(ans):
                w = 0.5 if long else (2.0 if j == 0 else 0.5)
                targets.append((len(seq) - 1 + j, t, w, qtype))
            seq += ans
        return seq, targets

    @staticmethod
    def _draw(rng: np.random.Generator, weights: dict[str, float]) -> str:
        keys = list(weights)
        p = np.array([weights[k] for k in keys])
        return keys[rng.choice(len(keys), p=p / p.sum())]

    def image_turns(self, scene, rng, qpi: int, p_desc: float, weights: dict[str, float]) -> list[tuple[str, str, str]]:
        """One description turn (probability ``p_desc``) or up to ``qpi`` distinct questions, never both: a
        description earlier in the conversation would let later answers be copied from text, not read from the
        image (an earlier revision did that, and question accuracy stalled near chance)."""
        if rng.random() < p_desc:
            q, a = synthqa.ask(scene, "describe", rng)
            return [(q, a, "describe")]
        turns: list[tuple[str, str, str]] = []
        tries = 0
        while len(turns) < qpi and tries < 4 * qpi:
            tries += 1
            qtype = self._draw(rng, weights)
            qa = synthqa.ask(scene, qtype, rng)
            if qa is not None and all(qa[0] != t[0] for t in turns):  # a repeated question is a copy task
                turns.append((qa[0], qa[1], qtype))
        return turns

    def clip_turns(self, clip, rng, qpv: int, p_desc: float) -> list[tuple[str, str, str]]:
        """Like :meth:`image_turns` for a clip: one description or up to ``qpv`` distinct questions."""
        if rng.random() < p_desc:
            q, a = synthqa.ask_clip(clip, "describe", rng)
            return [(q, a, "describe")]
        turns: list[tuple[str, str, str]] = []
        tries = 0
        while len(turns) < qpv and tries < 4 * qpv:
            tries += 1
            qtype = self._draw(rng, VIDEO_WEIGHTS)
            qa = synthqa.ask_clip(clip, qtype, rng)
            if qa is not None and all(qa[0] != t[0] for t in turns):
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


def forward_hidden(model, ids, mask, types, pv_img=None, pv_vid=None, n_img=0, n_vid=0, want_feats=False):
    """The Qwen2-VL forward by hand (features, splice, M-RoPE ids, LLM), returning last hidden states.

    ``pv_img`` ``[n_img*256, 1176]`` (224-px images), ``pv_vid`` ``[n_vid*512, 1176]`` (16-frame 112-px clips).
    """
    inner = model.model
    emb = inner.get_input_embeddings()(ids)
    gi = gv = None
    feats_img = None
    g_img = synthqa.IMAGE_SIZE // PATCH
    g_vid = synthqa.VIDEO_SIZE // PATCH
    if n_img:
        gi = torch.tensor([[1, g_img, g_img]] * n_img)
        feats_img = inner.visual(pv_img, grid_thw=gi).pooler_output
        sel = (ids == model.config.image_token_id).unsqueeze(-1)
        emb = emb.masked_scatter(sel, feats_img.to(emb.dtype))
    if n_vid:
        gv = torch.tensor([[synthqa.VIDEO_GROUPS, g_vid, g_vid]] * n_vid)
        feats_vid = inner.visual(pv_vid, grid_thw=gv).pooler_output
        sel = (ids == model.config.video_token_id).unsqueeze(-1)
        emb = emb.masked_scatter(sel, feats_vid.to(emb.dtype))
    pos, _ = inner.get_rope_index(ids, types, image_grid_thw=gi, video_grid_thw=gv, attention_mask=mask)
    h = inner.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    return (h, feats_img) if want_feats else h


def train_batch(batcher: Batcher, step: int, seed: int, n_img: int, n_vid: int, args, weights):
    rng = np.random.default_rng([seed, 77, step])
    seqs, targets, img_frames, vid_frames, cc, cs = [], [], [], [], [], []
    for _ in range(n_img):
        scene = synthqa.make_scene(rng)
        s, t = batcher.conversation(batcher.image_turns(scene, rng, args.qpi, args.p_desc, weights), video=False)
        seqs.append(s)
        targets.append(t)
        img_frames.append(np.stack([scene.image, scene.image]))
        cc.append(scene.cell_colour.flatten())
        cs.append(scene.cell_shape.flatten())
    for _ in range(n_vid):
        clip = synthqa.make_clip(rng)
        s, t = batcher.conversation(batcher.clip_turns(clip, rng, args.qpv, args.p_vdesc), video=True)
        seqs.append(s)
        targets.append(t)
        vid_frames.append(clip.frames)
    ids, mask, types = batcher.collate(seqs)
    rows = torch.tensor([i for i, t in enumerate(targets) for _ in t])
    cols = torch.tensor([c for t in targets for c, *_ in t])
    ys = torch.tensor([y for t in targets for _, y, *_ in t])
    ws = torch.tensor([w for t in targets for _, _, w, _ in t])
    pv_img = torch.cat([patchify(f) for f in img_frames]) if img_frames else None
    pv_vid = torch.cat([patchify(f) for f in vid_frames]) if vid_frames else None
    labels = (torch.from_numpy(np.concatenate(cc)), torch.from_numpy(np.concatenate(cs))) if cc else None
    return ids, mask, types, pv_img, pv_vid, (rows, cols, ys, ws), labels


@torch.no_grad()
def evaluate(model, batcher: Batcher, items: list, video: bool, bs: int = 40) -> dict[str, float]:
    """Teacher-forced validation: for one-word answers, argmax over :data:`synthqa.ANSWERS` at the first
    answer position; for descriptions, the share of items whose every answer token (and the end token) is
    the argmax, i.e. that greedy decoding reproduces exactly, and the token accuracy."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        seqs, tgts = [], []
        for s in chunk:
            seq, t = batcher.conversation([(s.question, s.answer, s.qtype)], video=video)
            seqs.append(seq)
            tgts.append(t)
        ids, mask, types = batcher.collate(seqs)
        frames = [f.frames if video else np.stack([f.image, f.image]) for f in chunk]
        pv = torch.cat([patchify(f) for f in frames])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = forward_hidden(
                model,
                ids,
                mask,
                types,
                None if video else pv,
                pv if video else None,
                0 if video else len(chunk),
                len(chunk) if video else 0,
            )
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
    model.train()
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    qa = [x for k, v in hits.items() if not k.startswith("describe") for x in v]
    if qa:
        res["qa"] = float(np.mean(qa))
    return res


def lr_at(p: float, s: int, peak: float, warmup: int, decay_from: float) -> float:
    """Linear warm-up over ``warmup`` steps, flat until progress ``decay_from``, then cosine to 5%."""
    if s < warmup:
        return peak * (s + 1) / warmup
    if p < decay_from:
        return peak
    t = min(1.0, (p - decay_from) / (1.0 - decay_from))
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
        seq, _ = batcher.conversation([(item.question, item.answer, item.qtype)], video=video)
        n_prompt = inputs["input_ids"].shape[1]
        assert inputs["input_ids"][0].tolist() == seq[:n_prompt], (inputs["input_ids"][0].tolist(), seq)
        mine = patchify(item.frames if video else np.stack([item.image, item.image]))
        assert torch.allclose(mine, pv, atol=1e-5), (mine - pv).abs().max()
        ids, mask, types = batcher.collate([seq[:n_prompt]])
        with torch.no_grad():
            ref = model(**inputs).logits[0, -1]
            h = forward_hidden(
                fast,
                ids,
                mask,
                types,
                None if video else mine,
                mine if video else None,
                0 if video else 1,
                1 if video else 0,
            )
            got = fast.lm_head(h[0, -1])
        assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    print("check: the training path matches the processor and the stock forward (image and clip)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny-synth-vl"))
    ap.add_argument("--work", default="/tmp/tiny_vlm_work", help="checkpoints and best-so-far export")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=170.0, help="wall-clock budget of the whole run (minutes)")
    ap.add_argument("--steps", type=int, default=100000, help="upper bound on full-stage steps")
    ap.add_argument("--pretrain-frac", type=float, default=0.06, help="budget share of the tower-only stage")
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="images per step (image stage)")
    ap.add_argument("--mixed-batch", type=int, default=10, help="images per step once videos join")
    ap.add_argument("--video-batch", type=int, default=6, help="clips per step once videos join")
    ap.add_argument("--video-from", type=float, default=0.25, help="full-stage progress at which videos join")
    ap.add_argument("--qpi", type=int, default=6, help="questions per image")
    ap.add_argument("--qpv", type=int, default=4, help="questions per clip")
    ap.add_argument("--p-desc", type=float, default=0.35, help="share of images with a description (alone)")
    ap.add_argument("--p-vdesc", type=float, default=0.3, help="share of clips with a description (alone)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-from", type=float, default=0.6)
    ap.add_argument("--aux-weight", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=240)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--align-weight",
        type=float,
        default=0.0,
        help="weight of an MSE pulling each image token (merger output) to code(colour) + code(shape) of its object "
        "(fixed random codes; one code for background): clean, separable visual tokens the LLM learns to bind quickly",
    )
    ap.add_argument(
        "--reinit-llm",
        action="store_true",
        help="with --resume: fresh (seeded) LLM and LM head, fresh optimiser, and a new full stage (warm-up, images "
        "first, then videos) up to --budget-min; keeps the trained vision tower and merger",
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--check", action="store_true", help="verify the hand-built batches against the processor, exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build_model(args.seed)
    batcher = Batcher(processor.tokenizer, model.config)
    if args.check:
        check(model, processor, batcher)
        return 0
    fast_patch_embed(model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    heads = AuxHeads(model.config.vision_config.hidden_size, args.align_weight)
    tower = list(model.model.visual.parameters()) + list(heads.parameters())
    opt_pre = torch.optim.AdamW(tower, lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    budget = 60.0 * args.budget_min
    state = {"step": 0, "pre_end": None, "full_t0": None, "video_step": None, "elapsed": 0.0, "best": -1.0}
    ckpt = work / "ckpt.pt"
    if args.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        opt_pre.load_state_dict(saved["opt_pre"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)
        if args.reinit_llm:
            fresh, _ = build_model(args.seed + 1)
            model.model.language_model.load_state_dict(fresh.model.language_model.state_dict())
            model.lm_head.load_state_dict(fresh.lm_head.state_dict())
            opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
            state.update(pre_end=state["step"], full_t0=state["elapsed"], video_step=None, best=-1.0)
            print(f"fresh LLM: a new full stage from step {state['step']}", flush=True)
    val_img = synthqa.split("validation", args.eval_n, task="image")
    val_desc = synthqa.split("validation", args.eval_n // 3, task="describe")
    val_vid = synthqa.split("validation", args.eval_n, task="video")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model.train()
    t0 = time.time() - state["elapsed"]

    def clock() -> float:
        return time.time() - t0

    def progress() -> float:  # of the full stage, by clock or steps
        s2 = state["step"] - state["pre_end"]
        return max(s2 / args.steps, (clock() - state["full_t0"]) / max(1.0, budget - state["full_t0"]))

    def save() -> None:
        state["elapsed"] = clock()
        tmp = work / "ckpt.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "heads": heads.state_dict(),
                "opt_pre": opt_pre.state_dict(),
                "opt": opt.state_dict(),
                "state": state,
            },
            tmp,
        )
        tmp.replace(ckpt)

    def run_eval() -> float:
        r_img = evaluate(model, batcher, val_img, video=False)
        r_desc = evaluate(model, batcher, val_desc, video=False)
        res = {"image": r_img, "describe": r_desc}
        score = [r_img["qa"], r_desc["describe_tokens"]]
        if state["video_step"] is not None:
            r_vid = evaluate(model, batcher, val_vid, video=True)
            res["video"] = r_vid
            score += [r_vid["qa"], r_vid["describe_tokens"]]
        rounded = {k: {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}
        print("eval " + json.dumps({"step": state["step"], "min": round(clock() / 60, 1), **rounded}), flush=True)
        return float(np.mean(score))

    run = {"loss": 0.0, "aux": 0.0, "acc": 0.0, "aux_acc": 0.0, "n": 0}
    while True:
        step = state["step"]
        if state["pre_end"] is None and clock() > args.pretrain_frac * budget:
            state["pre_end"] = step
            state["full_t0"] = clock()
            print(f"tower stage ends at step {step} ({clock() / 60:.1f} min)", flush=True)
        if state["pre_end"] is not None:
            p = progress()
            if p >= 1.0:
                break
            if state["video_step"] is None and p >= args.video_from:
                state["video_step"] = step
                print(f"videos join at step {step} ({clock() / 60:.1f} min)", flush=True)
        if state["pre_end"] is None:
            rng = np.random.default_rng([args.seed, 55, step])
            scenes = [synthqa.make_scene(rng) for _ in range(args.pretrain_batch)]
            pv = torch.cat([patchify(np.stack([s.image, s.image])) for s in scenes])
            cc = torch.from_numpy(np.concatenate([s.cell_colour.flatten() for s in scenes]))
            cs = torch.from_numpy(np.concatenate([s.cell_shape.flatten() for s in scenes]))
            g = synthqa.IMAGE_SIZE // PATCH
            for group in opt_pre.param_groups:
                group["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
            with autocast:
                feats = model.model.visual(pv, grid_thw=torch.tensor([[1, g, g]] * len(scenes))).pooler_output
                aux, aux_acc = heads.loss(feats, cc, cs)
            opt_pre.zero_grad(set_to_none=True)
            aux.backward()
            torch.nn.utils.clip_grad_norm_(tower, 1.0)
            opt_pre.step()
            run["aux"] += aux.item()
            run["aux_acc"] += aux_acc
        else:
            videos = state["video_step"] is not None
            n_img = args.mixed_batch if videos else args.batch
            n_vid = args.video_batch if videos else 0
            ids, mask, types, pv_img, pv_vid, (rows, cols, ys, ws), labels = train_batch(
                batcher, step, args.seed, n_img, n_vid, args, IMAGE_WEIGHTS
            )
            for group in opt.param_groups:
                group["lr"] = lr_at(progress(), step - state["pre_end"], args.lr, args.warmup, args.decay_from)
            with autocast:
                h, feats = forward_hidden(model, ids, mask, types, pv_img, pv_vid, n_img, n_vid, want_feats=True)
                logits = model.lm_head(h[rows, cols])
                aux, aux_acc = heads.loss(feats, *labels)
            ce = F.cross_entropy(logits.float(), ys, reduction="none")
            loss = (ce * ws).sum() / ws.sum()
            opt.zero_grad(set_to_none=True)
            (loss + args.aux_weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run["loss"] += loss.item()
            run["aux"] += aux.item()
            run["aux_acc"] += aux_acc
            run["acc"] += (logits.argmax(-1) == ys).float().mean().item()
        run["n"] += 1
        state["step"] = step = step + 1
        if step % 20 == 0:
            n = run["n"]
            stage = "tower" if state["pre_end"] is None else ("mixed" if state["video_step"] is not None else "image")
            print(
                f"step {step} {stage} lr {opt.param_groups[0]['lr']:.2e} loss {run['loss'] / n:.4f} "
                f"token_acc {run['acc'] / n:.3f} aux {run['aux'] / n:.4f} aux_acc {run['aux_acc'] / n:.3f} "
                f"elapsed {clock() / 60:.1f} min",
                flush=True,
            )
            run = {k: 0.0 for k in run}
            run["n"] = 0
        if state["pre_end"] is not None and (step - state["pre_end"]) % args.eval_every == 0:
            score = run_eval()
            if score > state["best"]:
                state["best"] = score
                export(model, processor, work / "best")
                print(f"new best {score:.3f} exported to {work / 'best'}", flush=True)
        if step % args.ckpt_every == 0:
            save()
    save()
    run_eval()
    export(model, processor, work / "final")
    export(model, processor, Path(args.out))
    print(f"done in {clock() / 60:.1f} min at step {state['step']}; final model saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
