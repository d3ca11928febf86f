"""Attention signals are recomputed from a layer's own q/k (never by switching to eager attention) and equal
the eager attention of the same layer: CLS rows and received-attention means in the CLIP, SigLIP, InternViT
and Qwen2-VL encoders, the last prompt token's attention in the LLM of every family."""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import FAMILIES, build_inputs, family_cases, model_and_processor

import vtr
from vtr.ops.base import LayerOperator, Operator


@dataclass
class RecordScores(Operator):
    """A ``pre_llm`` no-op that asks for ``wanted`` signals and records each sample's scores."""

    wanted: tuple[str, ...] = ()
    seen: list = field(default_factory=list)

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        return self.wanted

    def apply(self, tokens, ctx):
        self.seen.append({k: v.clone() for k, v in tokens.scores.items()})
        return tokens


@dataclass
class RecordLayer(LayerOperator):
    """A ``prefill`` no-op before layer ``at`` that asks for ``text_attn@{at-1}``."""

    at: int = 1
    seen: list = field(default_factory=list)
    stage: ClassVar[str] = "prefill"

    def layer_index(self, n_layers: int) -> int:
        return self.at

    def required_signals(self, n_layers: int) -> tuple[str, ...]:
        return (f"text_attn@{self.at - 1}",)

    def apply(self, tokens, ctx):
        self.seen.append(tokens.scores[f"text_attn@{self.at - 1}"].clone())
        return tokens


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


# --------------------------------------------------------------------------------------------- vision towers
@pytest.mark.parametrize(
    ("family", "kinds"),
    [
        ("llava", ("cls_attn", "mean_received")),
        ("llava_onevision", ("mean_received",)),
        ("internvl", ("cls_attn", "mean_received")),
    ],
)
@pytest.mark.parametrize("block", [0, 1])
def test_padded_tower_signals_equal_eager_attention(family: str, kinds: tuple[str, ...], block: int) -> None:
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])["multi-b1"])
    rec = RecordScores(wanted=tuple(f"{k}@{block}" for k in kinds))
    vtr.wrap(model, rec)
    try:
        with torch.no_grad():
            model(**inputs)
        adapter = model.vtr.adapter
        state = adapter.last
        adapter.metadata.update({k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs})
        rows = adapter.tower_rows(state.spans, _fake_results(model, inputs))
    finally:
        vtr.unwrap(model)
    eager = _eager(model)
    with torch.no_grad():
        pv = inputs["pixel_values"]
        pv = pv.flatten(0, 1) if pv.ndim == 5 else pv
        if family == "llava_onevision":  # only the tiles the model keeps per image
            pv = _onevision_tiles(model, inputs)
        attn = eager.model.vision_tower(pv, output_attentions=True).attentions[block]  # [S, H, L, L]
    attn = attn.float().mean(1)  # heads averaged
    prefix = 1 if family in ("llava", "internvl") else 0
    facts = vtr.adapters.adapter_for(model).tower()
    res, seq, unit = rows[0][:3]
    for kind in kinds:
        got = rec.seen[0][f"{kind}@{block}"]
        col = attn[:, 0] if kind == "cls_attn" else attn.mean(1)  # [S, L]
        exp = torch.zeros_like(got)
        for r in range(len(got)):
            if res[r] < 0:
                continue
            grid = (int(pv.shape[-2]) // facts.info.patch_size, int(pv.shape[-1]) // facts.info.patch_size)
            patches = facts.unit_patches(grid)[int(unit[r])] + prefix
            exp[r] = col[int(seq[r]), patches].sum()
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=0)


def _fake_results(model, inputs):
    """Tower results standing for one plain image encoding (to reuse ``tower_rows`` for the mapping)."""
    from vtr.adapters.vision import TowerResult
    from vtr.tokens import TowerTokens

    pv = inputs["pixel_values"]
    facts = vtr.adapters.adapter_for(model).tower()
    n_seq = len(_onevision_tiles(model, inputs)) if pv.ndim == 5 else pv.shape[0]
    owner = torch.zeros(n_seq, 1, dtype=torch.long)
    t = TowerTokens(
        x=torch.zeros(n_seq, 1, 0),
        prefix=torch.zeros(n_seq, 0, 1),
        valid=owner.bool(),
        index=owner,
        sizes=owner.float(),
        owner=owner,
        protected=owner.bool(),
        grid=((1, 1),) * n_seq,
    )
    del facts
    return [TowerResult(t, [(1, 1)] * n_seq)]


def _onevision_tiles(model, inputs):
    """The tiles LLaVA-NeXT/OneVision feed the tower, as ``get_image_features`` selects them."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    pv = inputs["pixel_values"]
    if pv.ndim == 4:
        return pv
    cfg = model.config
    n = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    return torch.cat([p[:k] for p, k in zip(pv, n, strict=True)])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("block", [0, 1])
def test_qwen_tower_received_attention_equals_a_manual_eager_pass(family: str, block: int) -> None:
    """Qwen2-VL's vision attention returns no weights: the reference is a plain softmax per attention sequence
    (image, or Qwen2.5-VL window in its window blocks) over the block's own q/k (rotary applied by the model's own
    function), from the block's captured inputs, put back from window order to raster order."""
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])["multi-b1"])
    captured = {}
    blk = model.model.visual.blocks[block]

    def grab(module, args, kwargs):
        captured.update(h=args[0], **kwargs)

    handle = blk.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    attn = blk.attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        h = blk.norm1(captured["h"])
        q, k, _ = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope(q, k, *captured["position_embeddings"])
        cu = captured["cu_seqlens"].tolist()
        ref = []
        for a, b in itertools.pairwise(cu):
            p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling, -1).mean(0)
            ref.append(p.mean(0).view(-1, 4).sum(1))  # received mean per patch, summed per 2x2 unit
        ref = torch.cat(ref)
        if family == "qwen2_5_vl":  # native order is window order; sequences in the reference are windows
            from transformers.vision_utils import get_vision_window_index

            vis = model.model.visual
            window_index, _ = get_vision_window_index(
                inputs["image_grid_thw"], vis.spatial_merge_size, vis.window_size, vis.patch_size
            )
            raster = torch.empty_like(ref)
            raster[window_index] = ref
            ref = raster
    rec = RecordScores(wanted=(f"mean_received@{block}",))
    vtr.wrap(model, rec)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(rec.seen[0][f"mean_received@{block}"], ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- LLMs
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llm_text_attention_equals_eager_attention(family: str) -> None:
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])["image-b3"])
    rec = RecordLayer(at=1)
    vtr.wrap(model, rec)
    try:
        with torch.no_grad():
            model(**inputs)
        state = model.vtr.adapter.last
    finally:
        vtr.unwrap(model)
    eager = _eager(model)
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[0].float().mean(1)  # layer 0, heads averaged
    for b, got in enumerate(rec.seen):
        rows = state.kept_rows[b][state.visual[b]]  # no pre_llm reduction: the visual rows of the prompt
        last = int(inputs["attention_mask"][b].nonzero().max())
        torch.testing.assert_close(got, attn[b, last, rows], atol=1e-5, rtol=0)
