"""MustDrop as operators (its cores are tested in ``test_mustdrop_core.py``): the window merge on ``TowerTokens``
and LLM-input tokens, the key set, the prefill filter, cache compaction against a masked reference, the
layer-averaged count, videos, bad input at ``wrap``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import FAMILIES, GEN, CacheRecorder, build_inputs, family_cases, model_and_processor

import vtr
from vtr.ops import MustDropCache, MustDropFilter, MustDropKeys, MustDropMerge
from vtr.ops.base import LayerOperator, OpContext
from vtr.ops.mustdrop import layer_averaged_count
from vtr.tokens import ImageLayout, TowerTokens, VisualTokens


def merge_case() -> torch.Tensor:
    """The spec's hand case on a (3, 6) grid: the left 3x3 window holds 9 identical vectors, the right one 9
    orthogonal one-hot vectors. ``[18, 9]``."""
    x = torch.zeros(18, 9)
    left = [0, 1, 2, 6, 7, 8, 12, 13, 14]
    right = [3, 4, 5, 9, 10, 11, 15, 16, 17]
    x[left] = torch.arange(1.0, 10.0)
    x[right] = torch.eye(9)
    return x


def test_window_merge_on_tower_tokens_per_sequence():
    """Each sequence merges on its own grid: the similar window of sequence 0 becomes one unit at its bottom-right
    unit (14), the orthogonal one stays; sequence 1 (a padded 3x3 grid of identical units) becomes one unit at 8."""
    x = torch.zeros(2, 18, 9)
    x[0] = merge_case()
    x[1, :9] = torch.ones(9)
    valid = torch.zeros(2, 18, dtype=torch.bool)
    valid[0] = True
    valid[1, :9] = True
    index = torch.where(valid, torch.arange(18).expand(2, 18), -1)
    t = TowerTokens(
        x=x,
        prefix=torch.zeros(2, 1, 9),
        valid=valid,
        index=index,
        sizes=valid.float(),
        owner=index.clone(),
        protected=torch.zeros(2, 18, dtype=torch.bool),
        grid=((3, 6), (3, 3)),
        block=0,
        point="post",
    )
    out = MustDropMerge().apply_tower(t, OpContext())
    assert out.counts.tolist() == [10, 1]
    assert out.index[0].tolist() == [3, 4, 5, 9, 10, 11, 14, 15, 16, 17]
    assert out.sizes[0].tolist() == [1, 1, 1, 1, 1, 1, 9, 1, 1, 1]
    torch.testing.assert_close(out.x[0, 6], torch.arange(1.0, 10.0))  # the window's mean
    assert out.owner[0].tolist() == [6, 6, 6, 0, 1, 2, 6, 6, 6, 3, 4, 5, 6, 6, 6, 7, 8, 9]
    assert out.index[1, 0] == 8 and out.sizes[1, 0] == 9 and out.owner[1, :9].tolist() == [0] * 9
    # Above every similarity: nothing merges.
    same = MustDropMerge(threshold=1.01).apply_tower(t, OpContext())
    assert same.counts.tolist() == [18, 9] and torch.equal(same.index, t.index)


def test_window_merge_needs_the_intact_grid():
    t = TowerTokens(
        x=torch.zeros(1, 9, 2),
        prefix=torch.zeros(1, 0, 2),
        valid=torch.tensor([[True] * 8 + [False]]),
        index=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -1]]),
        sizes=torch.ones(1, 9),
        owner=torch.arange(9).view(1, 9),
        protected=torch.zeros(1, 9, dtype=torch.bool),
        grid=((3, 3),),
    )
    with pytest.raises(ValueError, match="MustDropMerge needs every unit of the grid"):
        MustDropMerge().apply_tower(t, OpContext())


def test_window_merge_after_the_projector():
    """``placement="pre_llm"``: the same merge on an image's LLM-input rows; rows beyond the grid (a newline) stay."""
    layout = (ImageLayout(offset=0, n_tokens=19, grids=((1, 3, 6),)),)
    t = VisualTokens.from_layout(torch.cat([merge_case(), torch.full((1, 9), 5.0)]), layout)
    out = MustDropMerge(placement="pre_llm").apply(t, OpContext())
    assert out.index.tolist() == [3, 4, 5, 9, 10, 11, 14, 15, 16, 17, 18]
    assert out.sizes.tolist() == [1, 1, 1, 1, 1, 1, 9, 1, 1, 1, 1]
    torch.testing.assert_close(out.embeds[6], torch.arange(1.0, 10.0))
    assert out.owner_map()[[0, 1, 2, 6, 7, 8, 12, 13, 14]].tolist() == [6] * 9


def test_key_set_per_encoder_sequence_and_newlines():
    """ceil(0.08 n) best units of every encoder sequence (ties to the lower index); newline rows are protected."""
    layout = (ImageLayout(offset=0, n_tokens=16 + 30 + 2, grids=((1, 4, 4), (1, 2, 15))),)
    t = VisualTokens.from_layout(torch.zeros(48, 2), layout)
    seq = torch.tensor([0] * 16 + [1] * 30 + [-1] * 2)
    t.encoder = torch.stack([seq, torch.where(seq >= 0, torch.arange(48) % 16, -1)], 1)
    score = torch.zeros(48)
    score[[3, 9, 20, 40, 41, 45]] = torch.tensor([2.0, 1.0, 1.0, 3.0, 3.0, 2.0])
    t.scores = {"cls_attn@1": score}
    out = MustDropKeys(score="cls_attn", layer=1).apply(t, OpContext())
    # Sequence 0: ceil(1.28) = 2 keys (3, 9); sequence 1: ceil(2.4) = 3 keys (40, 41, 45); newlines 46, 47.
    assert out.protected.nonzero().flatten().tolist() == [3, 9, 40, 41, 45, 46, 47]
    assert math.ceil(0.08 * 30) == 3


def test_dual_attention_filter_spec_cases():
    """The spec's golden: A = [[.5, .1, 0, 0], [.3, 0, .1, 0]] (text x visual) before layer l + 1."""
    layout = (ImageLayout(offset=0, n_tokens=4, grids=((1, 2, 2),)),)
    t = VisualTokens.from_layout(torch.zeros(4, 2), layout)
    t.scores = {"text_rows_attn@1": torch.tensor([[0.5, 0.1, 0.0, 0.0], [0.3, 0.0, 0.1, 0.0]]).T}
    ctx = OpContext(extras={"layer": 2})
    t.protected[3] = True
    assert MustDropFilter(global_thr=0.15, individual_thr=0.12).apply(t, ctx).index.tolist() == [0, 3]
    t.protected[3] = False
    assert MustDropFilter(global_thr=0.15, individual_thr=0.09).apply(t, ctx).index.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("depth", "prune"), [(24, [2, 4, 8, 10]), (28, [2, 5, 9, 12]), (32, [2, 6, 10, 14]), (40, [2, 8, 12, 18])]
)
def test_layers_scale_to_the_llm(depth, prune):
    """Pruning after layer l means acting before l + 1 with layer l's text-row attention; the cache compaction
    starts at min(P)."""
    f = MustDropFilter()
    assert f.layer_indices(depth) == [p + 1 for p in prune]
    assert f.required_signals(depth) == tuple(f"text_rows_attn@{p}" for p in prune)
    assert MustDropCache().cache_layers(depth) == list(range(prune[0], depth))


def test_presets_and_recipe_strings():
    assert MustDropFilter(preset="64").thresholds == (0.011, 0.01)
    assert MustDropFilter(preset=128, individual_thr=0.5).thresholds == (0.0012, 0.5)
    rec = vtr.recipes.build("mustdrop", preset="64")
    assert [type(op).__name__ for op in rec.ops] == ["MustDropMerge", "MustDropKeys", "MustDropFilter", "MustDropCache"]
    assert rec.ops[2].thresholds == (0.011, 0.01)
    with pytest.raises(ValueError, match="unknown option 'keep'"):
        vtr.recipes.build("mustdrop", keep=0.5)  # thresholds set the budget (spec): no keep
    assert [type(op).__name__ for op in vtr.recipes.build("mustdrop_vision").ops] == ["MustDropMerge", "MustDropKeys"]


# --------------------------------------------------------------------------------------------- through wrap
@pytest.fixture(scope="module")
def llava6():
    """A tiny LLaVA with a 6-layer LLM (so MustDrop prunes at two layers and compacts from layer 1) whose queries
    are scaled up: random weights attend almost uniformly, sharp attention makes the text rows selective, as in a
    trained model, so the filter drops a different share at each pruning layer."""
    from vtr.testing import tiny_llava

    model, processor = tiny_llava(text_layers=6)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(1000.0)
    return model, processor


def mustdrop(thresholds=(0.05, 0.2), merge=0.04, layers=(1, 3)) -> list:
    g, i = thresholds
    return [
        MustDropMerge(threshold=merge),
        MustDropKeys(),
        MustDropFilter(layers=layers, scale=False, global_thr=g, individual_thr=i),
        MustDropCache(layers=layers, scale=False),
    ]


def _inputs(processor, case: str = "multi-b3"):
    return build_inputs(processor, family_cases(FAMILIES["llava"])[case])


def test_key_set_survives_every_stage(llava6):
    """With thresholds that drop everything they can, exactly the key set (ceil(0.08 n) of the units left after the
    merge, per image) reaches the layers after the first pruning layer and the compacted caches."""
    model, processor = llava6
    inputs = _inputs(processor)
    vtr.wrap(model, mustdrop(thresholds=(1.0, 1.0)))
    try:
        with torch.no_grad():
            model.generate(**inputs, **GEN)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    for b in range(inputs["input_ids"].shape[0]):
        recs = [r for r in report.records if r.sample == b]
        assert [r.stage for r in recs] == ["vision", "pre_llm", "prefill", "prefill", "decode"]
        merged = recs[1].images
        keys = sum(math.ceil(0.08 * im.tokens_out) for im in merged)
        assert report.layer_tokens[b] == [report.tokens_out(b)] * 2 + [keys] * 4
        assert recs[-1].tokens_out == keys
        for before, after in zip(recs[2].images, recs[4].images, strict=True):
            assert after.kept == before.kept  # the keys of every image, through the second filter and the cache


def test_layer_average_and_cache_compaction_equal_a_masked_reference(llava6):
    """Key set, filter and cache compaction (the merge changes the LLM input, so it is left out here). Per layer:
    layers 0-1 see V0, 2-3 see V1, 4-5 see V2 in prefill and the report's layer average is the paper's count; after
    prefill every layer >= min(P) = 1 holds exactly the text rows + the final set (layer 0 keeps its cache); prefill
    and decode logits equal a reference that masks instead of removing."""
    model, processor = llava6
    inputs = _inputs(processor)
    vtr.wrap(model, mustdrop(thresholds=(0.01, 0.1))[1:])  # no merge: the unwrapped model's input is the LLM's
    try:
        with CacheRecorder(model) as caches, torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        state = model.vtr.adapter.last
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    bsz, length = inputs["input_ids"].shape
    for b in range(bsz):
        v = report.layer_tokens[b]
        assert v[0] == v[1] > v[2] == v[3] > v[4] == v[5], v
        assert report.mean_layer_tokens(b) == pytest.approx(layer_averaged_count([v[0], v[2], v[4]], [1, 3], 6))
        assert f"layer average {report.mean_layer_tokens(b):.1f}" in report.summary()
    # Caches after prefill: layer 0 as prefilled, layers 1.. the text rows + the final set.
    final = [set(state.layers[-1].rows[b].tolist()) for b in range(bsz)]
    for i, lay in enumerate(state.layers):
        for b in range(bsz):
            rows = set(lay.rows[b].tolist())
            assert rows == (set(range(len(state.kept_rows[b]))) if i == 0 else final[b])
    assert caches.lengths[0][0] > caches.lengths[0][1] == max(len(f) for f in final)
    assert [kv[1] for kv in report.kv_bytes] == [kv[5] for kv in report.kv_bytes]

    def hide(rows_of) -> dict[int, torch.Tensor]:
        out = {}
        for i in range(len(state.layers)):
            h = torch.zeros(bsz, length, dtype=torch.bool)
            for b in range(bsz):
                kept = state.kept_rows[b]
                present = torch.zeros(len(kept), dtype=torch.bool)
                present[rows_of(i, b)] = True
                h[b, kept[~present]] = True
            out[i] = h
        return out

    # The state holds the caches as compacted; what each layer saw in prefill comes from the same run without the
    # decode stage.
    seen = _prefill_rows(model, inputs)
    compacted = [list(lay.rows) for lay in state.layers]
    ref = _masked_generate_two_phase(
        model, inputs, hide(lambda i, b: seen[i][b]), hide(lambda i, b: compacted[i][b]), n=4
    )
    assert torch.equal(ref.sequences, out.sequences)
    for a, b_ in zip(ref.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def _prefill_rows(model, inputs) -> list[list[torch.Tensor]]:
    """The rows each layer saw in prefill (the same recipe without the cache compaction)."""
    vtr.wrap(model, mustdrop(thresholds=(0.01, 0.1))[1:3])
    try:
        with torch.no_grad():
            model(**inputs)
        return [list(lay.rows) for lay in model.vtr.adapter.last.layers]
    finally:
        vtr.unwrap(model)


def _masked_generate_two_phase(model, inputs, hide_prefill, hide_decode, n: int):
    """Greedy ``generate`` on the unwrapped model: in prefill, layer ``i`` cannot attend to the prompt rows
    ``hide_prefill[i]``; while decoding, not to ``hide_decode[i]``."""
    from test_contracts import _masked_generate

    calls = {"n": 0}

    class Switch(dict):
        def __getitem__(self, i):
            return (hide_prefill if calls["n"] == 0 else hide_decode)[i]

    lm = model.model.language_model
    handle = lm.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + 1))
    try:
        return _masked_generate(model, inputs, Switch(), n=n)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_videos_every_stage_and_batch(family):
    """Qwen videos: the window merge runs per temporal step in the encoder; a padded batch gives each sample its own
    result through all four stages."""
    model, processor = model_and_processor(family)
    samples = family_cases(FAMILIES[family])["video-b3"]
    vtr.wrap(model, mustdrop(merge=0.0, layers=(0,)))
    try:
        with torch.no_grad():
            batch = model.generate(**build_inputs(processor, samples), **GEN)[:, -GEN["max_new_tokens"] :]
            report = model.vtr.report
            for b, smp in enumerate(samples):
                one = model.generate(**build_inputs(processor, [smp]), **GEN)[:, -GEN["max_new_tokens"] :]
                assert model.vtr.report.layer_tokens[0] == report.layer_tokens[b]
                assert torch.equal(one[0], batch[b])
    finally:
        vtr.unwrap(model)
    for b, n in enumerate(report.original_tokens):
        assert report.tokens_out(b) < n  # merged in the encoder
        assert {r.stage for r in report.records if r.sample == b} == {"vision", "pre_llm", "prefill", "decode"}


def test_onevision_videos_with_the_merge_after_the_projector():
    """LLaVA-OneVision pools video frames on full grids, so the in-tower merge refuses videos; the merge after the
    projector (the spec's variant for OV video) runs on each pooled frame, without key scores."""
    model, processor = model_and_processor("llava_onevision")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava_onevision"])["video-b1"])
    vtr.wrap(model, "mustdrop")
    try:
        with pytest.raises(ValueError, match="cannot act on LLaVA-OneVision videos"), torch.no_grad():
            model(**inputs)
    finally:
        vtr.unwrap(model)
    ops = [MustDropMerge(placement="pre_llm", threshold=-1.0), MustDropKeys(score="none"), *mustdrop(layers=(0,))[2:]]
    vtr.wrap(model, ops)
    try:
        with torch.no_grad():
            model.generate(**inputs, **GEN)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    (im,) = report.layouts[0]
    frames, (_, q, _) = len(im.grids), im.grids[0]
    merged = frames * (q * q - (q // 3) ** 2 * 8)  # every full 3x3 window of every frame
    assert report.tokens_out(0) == merged


def test_batch_with_a_sample_keeping_the_batch_length_decodes_like_alone():
    """Regression (decoder machinery): a sample that keeps all its rows at a pruning layer can keep the padded
    batch length while the others shrink; that layer then needs its own decode mask."""

    @dataclasses.dataclass
    class DropLarge(LayerOperator):
        def layer_index(self, n_layers: int) -> int:
            return 1

        def apply(self, tokens, ctx):
            return tokens.take(torch.arange(0)) if len(tokens) > 300 else tokens

    model, processor = model_and_processor("llava")
    samples = family_cases(FAMILIES["llava"])["multi-b3"]  # 512, 256 (padded), 768 visual rows
    vtr.wrap(model, DropLarge())
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    try:
        with torch.no_grad():
            batch = model.generate(**build_inputs(processor, samples), **kw)
            assert [v[1] for v in model.vtr.report.layer_tokens] == [0, 256, 0]
            for b, smp in enumerate(samples):
                one = model.generate(**build_inputs(processor, [smp]), **kw)
                for x, y in zip(one.logits, batch.logits, strict=True):
                    torch.testing.assert_close(x[0], y[b], atol=1e-4, rtol=1e-4)
    finally:
        vtr.unwrap(model)


# --------------------------------------------------------------------------------------------- bad input
def test_compact_positions_are_refused():
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match="MustDropMerge supports positions='original', got positions='compact'"):
        vtr.wrap(model, "mustdrop", positions="compact")
    assert not vtr.is_wrapped(model)


@pytest.mark.parametrize(
    ("family", "ops", "match"),
    [
        ("llava", [MustDropFilter(layers=(1,), scale=False)], r"a pruning layer needs a later layer .* layers 0..1"),
        ("llava", [MustDropCache(layers=(40,))], r"scaled to depth 2 give layer 2"),
        ("llava", [MustDropMerge(block=1)], "the LLaVA-1.5 encoder's features come from block 0"),
        ("qwen2_vl", [MustDropKeys(score="cls_attn")], "needs a CLS token; the Qwen2-VL encoder has none"),
        ("llava", [MustDropKeys(layer=2)], r"MustDropKeys.layer=2: the LLaVA-1.5 encoder has blocks 0..1"),
    ],
)
def test_bad_input_at_wrap(family, ops, match):
    model, _ = model_and_processor(family)
    with pytest.raises(ValueError, match=match):
        vtr.wrap(model, ops)
    assert not vtr.is_wrapped(model)


def test_timm_cannot_host_mustdrop():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    with pytest.raises(ValueError, match="MustDropKeys acts in stage 'pre_llm', which the timm ViT adapter"):
        vtr.wrap(vit, "mustdrop")


@pytest.mark.parametrize(
    ("cls", "kwargs", "err", "match"),
    [
        (MustDropMerge, {"window": 1}, ValueError, "MustDropMerge.window must be >= 2"),
        (MustDropMerge, {"threshold": float("nan")}, ValueError, "MustDropMerge.threshold must be a finite number"),
        (MustDropMerge, {"placement": "llm"}, ValueError, "MustDropMerge.placement must be one of"),
        (MustDropKeys, {"rate": 0.0}, ValueError, r"MustDropKeys.rate must be a number in \(0, 1\]"),
        (MustDropKeys, {"score": "max"}, ValueError, "MustDropKeys.score must be one of"),
        (MustDropFilter, {"preset": "100"}, ValueError, "preset must be one of"),
        (MustDropFilter, {"layers": ()}, ValueError, "MustDropFilter.layers must be non-empty"),
        (MustDropFilter, {"layers": (2, -1)}, ValueError, "MustDropFilter.layers must be non-empty LLM layer"),
        (MustDropFilter, {"layers": "2"}, TypeError, "MustDropFilter.layers must be a sequence"),
        (MustDropFilter, {"global_thr": float("inf")}, ValueError, "MustDropFilter.global_thr must be a finite"),
        (MustDropCache, {"scale": 1}, TypeError, "MustDropCache.scale must be True or False"),
    ],
)
def test_bad_fields(cls, kwargs, err, match):
    with pytest.raises(err, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("recipe", "overrides", "match"),
    [
        ("hired", {"keep": 0}, "HiRED.keep must be an int >= 1"),
        ("hired", {"alpha": -0.1}, r"HiRED.alpha must be a number in \[0, 1\]"),
        ("ats", {"keep": 2.5}, r"ATS.keep must be a float in \(0, 1\]"),
        ("mustdrop", {"preset": "100"}, "preset must be one of"),
        ("mustdrop", {"layers": (40,)}, r"layers \[40\] scaled to depth 2 give layer 2"),
        ("mustdrop", {"layers": (1,), "scale": False}, "a pruning layer needs a later layer"),
    ],
)
def test_bad_budgets_and_layers_of_the_recipes_at_wrap(recipe, overrides, match):
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match=match):
        vtr.wrap(model, recipe, **overrides)
    assert not vtr.is_wrapped(model)


def test_in_tower_merge_follows_the_block0_window_similarities():
    """Through ``wrap`` on LLaVA: exactly the windows of block 0's output whose similarity reaches the threshold
    merge (the threshold sits at the median, so about half of them), each into its bottom-right patch."""
    from vtr.ops.mustdrop import _window_indices, _window_similarity, window_merge

    model, processor = model_and_processor("llava")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava"])["image-b1"])
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1][:, 1:]
    sim = _window_similarity(hidden, _window_indices(16, 16, 3, hidden.device))[0]
    threshold = float(sim.median())
    _, _, sources = window_merge(hidden, (16, 16), 3, threshold)
    merged = sources[0][(sources[0] >= 0).sum(1) == 9]
    assert 0 < len(merged) < len(sim)
    want = sorted(set(range(256)) - set(merged[:, :-1].flatten().tolist()))  # every window keeps its anchor
    vtr.wrap(model, MustDropMerge(threshold=threshold))
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    assert report.kept(0, 0) == want
    groups = report.records[-1].images[0].groups
    for window in merged.tolist():
        assert len({groups[i] for i in window}) == 1  # one token covers the whole window


def test_chains_keep_the_key_set_and_report_every_stage():
    """MustDrop's vision stage in front of DivPrune and FastV: both keep every key; the report lists each stage,
    the visual tokens per LLM layer and the KV bytes per layer."""
    from vtr.ops import DivPrune, FastV

    keys: list[set[int]] = []

    @dataclasses.dataclass
    class Keys(MustDropKeys):
        def apply(self, tokens, ctx):
            out = super().apply(tokens, ctx)
            keys.append(set(out.index[out.protected].tolist()))
            return out

    model, processor = model_and_processor("llava")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava"])["multi-b3"])
    vtr.wrap(model, [MustDropMerge(threshold=0.04), Keys(), DivPrune(keep=0.1), FastV(k=1, keep=4)])
    try:
        with torch.no_grad():
            model(**inputs)
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    for b in range(inputs["input_ids"].shape[0]):
        recs = [r for r in report.records if r.sample == b]
        assert [(r.stage, r.operator) for r in recs] == [
            ("vision", "MustDropMerge"),
            ("pre_llm", "Keys"),
            ("pre_llm", "DivPrune"),
            ("prefill", "FastV"),
        ]
        n_keys = sum(math.ceil(0.08 * im.tokens_out) for im in recs[1].images)
        assert len(keys[b]) == n_keys
        for rec in recs[2:]:
            offsets = [im.offset for im in report.layouts[b]]
            kept = {off + i for im, off in zip(rec.images, offsets, strict=True) for i in im.kept}
            assert keys[b] <= kept, rec.operator
        assert n_keys <= recs[3].tokens_out <= n_keys + 4
        assert report.layer_tokens[b] == [recs[2].tokens_out, recs[3].tokens_out]
        assert report.kv_bytes[b][1] < report.kv_bytes[b][0]
