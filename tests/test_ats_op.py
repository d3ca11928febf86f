"""ATS as an operator (the sampler itself is tested in ``test_ats_core.py``): hand cases on ``TowerTokens``, a
hand-written ATS forward of a timm ViT, Qwen2-VL videos, bad input at ``wrap``."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, GEN, build_inputs, family_cases, model_and_processor

import vtr
from vtr.ops import ATS
from vtr.ops.ats import inverse_transform_sample
from vtr.ops.base import OpContext
from vtr.tokens import TowerTokens

timm = pytest.importorskip("timm")


def tower(cls_attn: torch.Tensor, value_norm: torch.Tensor, valid: torch.Tensor, block: int = 3) -> TowerTokens:
    """``TowerTokens`` of ``S`` sequences of ``U`` rows (``k`` patch slots per unit, one CLS) with the two signals."""
    s, u, k = cls_attn.shape
    index = torch.where(valid, torch.arange(u).expand(s, u), -1)
    n = valid.sum(1).tolist()
    return TowerTokens(
        x=torch.randn(s, u, 2 * k) * valid.unsqueeze(-1),
        prefix=torch.randn(s, 1, 2),
        valid=valid,
        index=index,
        sizes=valid.float(),
        owner=index.clone(),
        protected=torch.zeros(s, u, dtype=torch.bool),
        grid=tuple((1, c) for c in n),
        scores={f"cls_attn@{block}": cls_attn, f"value_norm@{block}": value_norm},
        block=block,
        point="mid",
    )


def kept(t: TowerTokens) -> list[list[int]]:
    return [t.index[s][t.valid[s]].tolist() for s in range(t.valid.shape[0])]


def test_hand_case_per_sequence_golden_and_padding():
    """Score = CLS attention x value norm per unit; each sequence samples on its own (the spec's goldens); padded
    rows never count, even with large scores."""
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0], [0.2, 0.1, 0.3, 0.2, 0.0]]).unsqueeze(-1)
    v = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0], [2.0, 1.0, 1.0, 1.0, 0.0]]).unsqueeze(-1)  # products [.4 .1 .3 .2]
    valid = torch.tensor([[True] * 4 + [False], [True] * 4 + [False]])
    out = ATS(blocks=(3,), keep=3, score="cls_attn").apply_tower(tower(a, v, valid), OpContext())
    assert kept(out) == [[1, 2, 3], [0, 2, 3]]  # spec: [.1 .2 .3 .4] -> [1, 2, 3]; [.4 .1 .3 .2] -> [0, 2, 3]
    assert out.counts.tolist() == [3, 3]
    assert torch.equal(out.owner[0], torch.tensor([-1, 0, 1, 2, -1]))


def test_unit_models_multiply_per_patch_slot_then_sum_per_unit():
    """2x2 units: the product is taken per patch slot and summed per unit (not the sums multiplied)."""
    a = torch.tensor([[[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1], [0.05, 0.05, 0.0, 0.0], [0.0, 0.1, 0.0, 0.1]]])
    v = torch.tensor([[[4.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 8.0, 8.0], [2.0, 1.0, 1.0, 1.0]]])
    # Per-slot products summed: [0.4, 0.1, 0.1, 0.3]; products of the sums would be [0.7, 0.4, 1.8, 1.0].
    out = ATS(blocks=(3,), keep=3, score="cls_attn").apply_tower(
        tower(a, v, torch.ones(1, 4, dtype=torch.bool)), OpContext()
    )
    want = inverse_transform_sample(torch.tensor([0.4, 0.1, 0.1, 0.3]), 3).tolist()
    assert kept(out) == [want] and want == [0, 2, 3]


def test_counts_adapt_to_entropy_per_sequence():
    """A peaked sequence keeps fewer units than a flat one in the same call (spec: [1, 3, 4] vs [1, 2, 3, 4])."""
    a = torch.tensor([[0.025, 0.025, 0.025, 0.025, 0.9], [0.2] * 5]).unsqueeze(-1)
    out = ATS(blocks=(3,), keep=4, score="cls_attn").apply_tower(
        tower(a, torch.ones_like(a), torch.ones(2, 5, dtype=torch.bool)), OpContext()
    )
    assert kept(out) == [[1, 3, 4], [1, 2, 3, 4]]
    assert out.valid.tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("tau", [0.1, 10.0])
def test_default_samples_are_the_units_at_the_input(tau):
    """``keep=None``: ``n_samples`` is the sequence's unit count; flat scores keep far more than peaked ones."""
    z = torch.randn(1, 196, 1, generator=torch.Generator().manual_seed(0))
    a = torch.softmax(z / tau, dim=1)
    out = ATS(blocks=(3,), score="cls_attn").apply_tower(
        tower(a, torch.ones_like(a), torch.ones(1, 196, dtype=torch.bool)), OpContext()
    )
    want = inverse_transform_sample(a[0, :, 0], 196).tolist()
    assert kept(out) == [want]
    assert (len(want) > 150) if tau == 10.0 else (len(want) < 60)


def test_protected_units_survive():
    a = torch.tensor([[0.0, 0.1, 0.2, 0.7]]).unsqueeze(-1)
    t = tower(a, torch.ones_like(a), torch.ones(1, 4, dtype=torch.bool))
    t.protected[0, 0] = True  # zero score: never sampled
    out = ATS(blocks=(3,), keep=2, score="cls_attn").apply_tower(t, OpContext())
    assert 0 in kept(out)[0] and bool(out.protected[0, 0])


# --------------------------------------------------------------------------------------------- timm ViT
def vit(depth: int = 4, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, num_classes=10, **kw).eval()


def reference_ats_forward(model, x: torch.Tensor, blocks: set[int], n_samples: int) -> tuple[torch.Tensor, int]:
    """One image ``[1, 3, H, W]`` through the ViT with ATS written out by hand: eager attention over every token,
    significance from the CLS row (summed over heads) and the value norms, sampling, MLP on the kept rows only."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        b, n, c = h.shape
        q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        probs = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(a.proj(o))
        if i in blocks:
            sig = probs[0, :, 0, 1:].sum(0) * v[0].transpose(0, 1).reshape(n, -1)[1:].norm(dim=-1)
            keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + inverse_transform_sample(sig, n_samples)])
            x = x[:, keep]
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x)), x.shape[1] - 1


@pytest.mark.parametrize("layerscale", [False, True])
def test_timm_ats_equals_a_hand_written_reference(layerscale):
    """``vtr.wrap(vit, "ats")``: default blocks depth/4..last, n_samples = 196; a batch of three images (different
    counts, padded) gives each image's own reference logits and counts."""
    model = vit(init_values=0.5 if layerscale else None)
    with torch.no_grad():
        for blk in model.blocks:  # sharper attention than at random init, so the counts adapt per image
            blk.attn.qkv.weight.mul_(6.0)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    x[1] = x[1] * 0.1
    with torch.no_grad():
        refs = [reference_ats_forward(model, x[i : i + 1], {1, 2, 3}, 196) for i in range(3)]
        vtr.wrap(model, "ats")
        out = model(x)
        report = model.vtr.report
        vtr.unwrap(model)
    torch.testing.assert_close(out, torch.cat([r[0] for r in refs]), atol=1e-4, rtol=1e-4)
    counts = [report.tokens_out(i) for i in range(3)]
    assert counts == [r[1] for r in refs]
    assert all(c < 196 for c in counts) and len(set(counts)) > 1


def test_timm_no_ats_blocks_is_the_baseline_and_keep_bounds_every_block():
    model = vit()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        vtr.wrap(model, ATS(blocks=()))
        assert torch.equal(model(x), ref)
        vtr.wrap(model, ATS(blocks=(0, 2), keep=40))
        model(x)
        report = model.vtr.report
        vtr.unwrap(model)
    assert all(report.tokens_out(i) <= 40 for i in range(2))


def test_timm_average_pooled_head_is_refused():
    with pytest.raises(ValueError, match="global_pool='avg'"):
        vtr.wrap(vit(global_pool="avg", class_token=False), "ats")


# --------------------------------------------------------------------------------------------- VLMs
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_videos_sample_every_temporal_step(family):
    """Qwen videos: each temporal step is one encoder sequence with its own adaptive count; a padded batch gives
    each sample its own result."""
    model, processor = model_and_processor(family)
    samples = family_cases(FAMILIES[family])["video-b3"]
    vtr.wrap(model, ATS(keep=0.5))
    try:
        with torch.no_grad():
            batch = build_inputs(processor, samples)
            tokens = model.generate(**batch, **GEN)[:, -GEN["max_new_tokens"] :]
            report = model.vtr.report
            for b, smp in enumerate(samples):
                one = model.generate(**build_inputs(processor, [smp]), **GEN)[:, -GEN["max_new_tokens"] :]
                assert model.vtr.report.tokens_out(0) == report.tokens_out(b)
                assert torch.equal(one[0], tokens[b])
    finally:
        vtr.unwrap(model)
    for b, n in enumerate(report.original_tokens):
        sequences = sum(len(im.grids) for im in report.layouts[b])  # round(0.5 * units) per sequence
        assert 0 < report.tokens_out(b) <= n // 2 + sequences


@pytest.mark.parametrize(
    ("family", "op", "match"),
    [
        ("llava", ATS(blocks=(1,)), r"ATS blocks \[1\]: block 1 is outside the LLaVA-1.5 encoder's blocks 0..0"),
        ("llava", ATS(blocks=(-5,)), r"block -3 is outside"),
        ("qwen2_vl", ATS(score="cls_attn"), "needs a CLS token; the Qwen2-VL encoder has none"),
        ("llava", ATS(score="mean_received"), "the LLaVA-1.5 encoder has a CLS token"),
    ],
)
def test_bad_input_at_wrap(family, op, match):
    model, _ = model_and_processor(family)
    with pytest.raises(ValueError, match=match):
        vtr.wrap(model, op)
    assert not vtr.is_wrapped(model)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"keep": 0}, ValueError, "ATS.keep must be an int >= 1"),
        ({"keep": 1.5}, ValueError, r"ATS.keep must be a float in \(0, 1\]"),
        ({"blocks": 3}, TypeError, "ATS.blocks must be a sequence"),
        ({"blocks": (1.5,)}, TypeError, "ATS.blocks must hold ints"),
        ({"score": "cls"}, ValueError, "ATS.score must be one of"),
    ],
)
def test_bad_fields(kwargs, err, match):
    with pytest.raises(err, match=match):
        ATS(**kwargs)
