"""timm ViTs through ``vtr.wrap``: ToMe equals the official patch's semantics (LayerScale applied), the
official ToMe timm patch itself when a checkout is given, reports per image, exact unwrap."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from conftest import hook_state

import vtr
from vtr.ops import ToMe
from vtr.ops.tome import bipartite_soft_matching, merge_wavg, parse_r

timm = pytest.importorskip("timm")


def vit(depth: int = 4, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, num_classes=10, **kw).eval()


def reference_tome_forward(model, x: torch.Tensor, r, prop_attn: bool = True) -> torch.Tensor:
    """ToMe on a timm ViT written out by hand (the official algorithm; LayerScale applied)."""
    sched = parse_r(len(model.blocks), r)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    for blk, rr in zip(model.blocks, sched, strict=True):
        a = blk.attn
        h = blk.norm1(x)
        b, n, c = h.shape
        q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(a.proj(o))
        if rr > 0:
            merge, _ = bipartite_soft_matching(k.mean(1), rr, class_token=True)
            x, size = merge_wavg(merge, x, size)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("r", [0, 2, 8, (4, -1), [3, 0, 5, 1]])
@pytest.mark.parametrize("layerscale", [False, True])
def test_tome_equals_the_reference(r, layerscale):
    model = vit(init_values=0.5 if layerscale else None)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_tome_forward(model, x, r)
        vtr.wrap(model, ToMe(r=r))
        out = model(x)
        report = model.vtr.report
        vtr.unwrap(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert report.tokens_out(0) == 196 - sum(parse_r(4, r))
    assert report.original_tokens == [196] * 3


def test_keep_schedule_reaches_the_budget_and_identity():
    model = vit()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        before = hook_state(model)
        vtr.wrap(model, ToMe(keep=1.0))
        same = model(x)
        vtr.wrap(model, ToMe(keep=64))
        model(x)
        rep = model.vtr.report
        vtr.unwrap(model)
        assert hook_state(model) == before
        assert torch.equal(model(x), ref)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert [rep.tokens_out(i) for i in range(2)] == [64, 64]
    img = rep.records[-1].images[0]
    assert sorted(g for g in img.groups if g >= 0) == sorted(img.groups) and len(set(img.groups)) == 64


@pytest.mark.skipif(not os.environ.get("VTR_TOME_OFFICIAL"), reason="set VTR_TOME_OFFICIAL to a ToMe checkout")
@pytest.mark.parametrize("r", [0, 2, 4, 8, (4, -1)])
def test_tome_equals_the_official_patch(r):
    """Golden: logits equal facebookresearch/ToMe's timm patch (loaded from a checkout outside the project)."""
    sys.path.insert(0, os.environ["VTR_TOME_OFFICIAL"])
    try:
        import tome
    finally:
        sys.path.pop(0)
    model = vit()
    official = copy.deepcopy(model)
    tome.patch.timm(official)
    official.r = r
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = official(x)
        vtr.wrap(model, ToMe(r=r))
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_timm_refuses_llm_stages_and_register_tokens():
    with pytest.raises(ValueError, match="FastV acts in stage 'prefill', which the timm ViT adapter does not support"):
        vtr.wrap(vit(depth=2), "fastv")
    reg = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, reg_tokens=4)
    with pytest.raises(NotImplementedError, match="4 register token"):
        vtr.wrap(reg, ToMe(r=2))


def test_tome_bench_runs_and_says_when_the_official_code_is_absent(tmp_path, capsys):
    from vtr.cli import main

    args = [
        "bench",
        "tome",
        "--model",
        "vit_tiny_patch16_224",
        "--batch",
        "2",
        "--r",
        "4",
        "--repeats",
        "1",
        "--official",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| vtr ToMe |" in out and "not a facebookresearch/ToMe checkout" in out
