"""Prefill and decode stages beyond the matrix: FastV's core, a decode-stage (cache) operator, cached calls."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import FAMILIES, build_inputs, family_cases, greedy, model_and_processor
from hypothesis import given, settings
from hypothesis import strategies as st

import vtr
from vtr.ops import FastV
from vtr.ops.base import CacheOperator
from vtr.ops.fastv import fastv_select


def test_fastv_select_golden():
    attn = torch.tensor([0.1, 0.5, 0.2, 0.5, 0.0, 0.3])
    assert fastv_select(attn, 3).tolist() == [1, 3, 5]  # ties at 0.5 both kept
    assert fastv_select(attn, 1).tolist() == [1]  # tie -> lowest index
    assert fastv_select(attn, 10).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        fastv_select(attn, 0)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(1, 70), st.integers(0, 2**16))
def test_fastv_select_keeps_the_top_k(n, k, seed):
    attn = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    out = fastv_select(attn, k)
    assert out.tolist() == sorted(set(out.tolist())) and len(out) == min(k, n)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[out] = False
    if bool(dropped.any()):
        assert float(attn[out].min()) >= float(attn[dropped].max())


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"k": 0}, ValueError, "FastV.k must be >= 1"),
        ({"r": 1.0}, ValueError, r"FastV.r must be a float in \[0, 1\)"),
        ({"k": 1.5}, TypeError, "FastV.k must be an int"),
        ({"keep": 0}, ValueError, "keep must be an int >= 1"),
    ],
)
def test_fastv_bad_fields(kwargs, err, match):
    with pytest.raises(err, match=match):
        FastV(**kwargs)


def test_fastv_keep_overrides_r_and_protected_survive():
    from vtr.ops.base import OpContext
    from vtr.tokens import ImageLayout, VisualTokens

    t = VisualTokens.from_layout(torch.zeros(6, 2), [ImageLayout(0, 6, ((1, 2, 3),))])
    t.scores["text_attn@0"] = torch.tensor([0.1, 0.5, 0.2, 0.4, 0.0, 0.3])
    t.protected[4] = True
    out = FastV(k=1, keep=2)(t, OpContext(extras={"layer": 1}))
    assert out.index.tolist() == [1, 3, 4]


@dataclass
class KeepFirstHalf(CacheOperator):
    """Test decode-stage operator: after prefill, layers ``from_layer..`` keep the first half of the visual rows."""

    from_layer: int = 1

    def cache_layers(self, n_layers: int) -> list[int]:
        return list(range(self.from_layer, n_layers))

    def apply(self, tokens, ctx):
        return tokens.take(torch.arange((len(tokens) + 1) // 2))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_decode_stage_compacts_caches_and_decodes_like_a_masked_reference(family: str) -> None:
    from test_contracts import _masked_generate

    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])["multi-b3"])
    vtr.wrap(model, KeepFirstHalf())
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        state = model.vtr.adapter.last
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    bsz, length = inputs["input_ids"].shape
    assert [r.stage for r in report.records] == ["decode"] * bsz
    for b in range(bsz):
        n = report.original_tokens[b]
        assert report.records[b].tokens_out == (n + 1) // 2
    # Layer 0 keeps everything, layer 1 only the kept visual rows (the prefill itself saw everything).
    hide = {0: torch.zeros(bsz, length, dtype=torch.bool)}
    h = torch.zeros(bsz, length, dtype=torch.bool)
    for b in range(bsz):
        rows = state.kept_rows[b]
        present = torch.zeros(len(rows), dtype=torch.bool)
        present[state.layers[1].rows[b]] = True
        h[b, rows[~present]] = True
    hide[1] = h
    ref_prefill = _masked_generate(model, inputs, {0: hide[0], 1: hide[0]}, n=1)
    # The first token comes from the unreduced prefill; later tokens see the compacted layer-1 cache.
    assert torch.equal(out.sequences[:, length], ref_prefill.sequences[:, length])
    ref = _masked_generate_after_prefill(model, inputs, hide, n=4)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b_ in zip(ref.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def _masked_generate_after_prefill(model, inputs, hide, n):
    """Reference for cache compaction: full prefill, then while decoding layer i cannot see ``hide[i]``."""
    from test_contracts import _masked_generate

    calls = {"n": 0}
    empty = {i: torch.zeros_like(v) for i, v in hide.items()}

    class Switch(dict):
        def __getitem__(self, i):
            return (empty if calls["n"] == 0 else hide)[i]

    lm = model.model.language_model
    handle = lm.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + 1))
    try:
        return _masked_generate(model, inputs, Switch(hide), n=n)
    finally:
        handle.remove()


def test_several_new_tokens_on_a_reduced_cache_raise(llava, make_inputs):
    model, _ = llava
    inputs = make_inputs([("what colour ?", 1)])
    vtr.wrap(model, "divprune", keep=0.25)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        with pytest.raises(ValueError, match="3 new tokens at once on a reduced cache"):
            model(input_ids=torch.tensor([[7, 8, 9]]), cache=out.cache)
        # One token at a time works, also after another call in between (the cache still finds its state).
        model(**inputs, use_cache=True)
        nxt = model(input_ids=torch.tensor([[7]]), cache=out.cache).logits
    assert nxt.shape == (1, 1, model.config.text_config.vocab_size)
    greedy(model, inputs, n=2)


@pytest.mark.parametrize(
    ("family", "case"), [("internvl", "image-b1"), ("llava_next", "image-b1"), ("llava", "multi-b1")]
)
def test_vision_stage_records_encoder_provenance(family, case):
    """After the vision stage each LLM row knows its encoder sequence within the image and its unit: InternVL's
    thumbnail is the last tile, LLaVA-NeXT's base view is sequence 0 and newline rows come from no unit."""
    from test_signals import RecordScores

    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])[case])
    seen = []

    @dataclass
    class Grab(RecordScores):
        def apply(self, tokens, ctx):
            seen.append(tokens)
            return tokens

    vtr.wrap(model, Grab(wanted=("mean_received@0",)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtr.unwrap(model)
    (tokens,) = seen
    for im in tokens.layout:
        enc = tokens.encoder[(tokens.image == tokens.image[im.offset]).nonzero().flatten()]
        grid_rows = sum(t * h * w for t, h, w in im.grids)
        if family == "internvl":
            per_tile = im.grids[0][1] * im.grids[0][2]
            assert enc[:, 0].tolist() == [i // per_tile for i in range(im.n_tokens)]
            assert enc[:, 1].tolist() == [i % per_tile for i in range(im.n_tokens)]
        elif family == "llava":
            assert enc[:, 0].tolist() == [0] * im.n_tokens and enc[:, 1].tolist() == list(range(im.n_tokens))
        else:
            g = im.grids[0][1]
            assert enc[: g * g, 0].tolist() == [0] * (g * g) and enc[: g * g, 1].tolist() == list(range(g * g))
            assert bool((enc[g * g : grid_rows, 0] >= 1).all())  # canvas rows come from the AnyRes tiles
            assert bool((enc[grid_rows:] == -1).all())  # newline rows


def test_next_canvas_newlines_stay_only_with_their_line():
    """In-tower reduction on LLaVA-NeXT: a canvas line's newline row stays iff one of its tokens stays."""
    from dataclasses import dataclass as dc

    from vtr.ops.base import VisionOperator

    @dc
    class KeepSome(VisionOperator):
        """Keeps units whose index is a multiple of 7 in every tile (so some canvas lines lose every token)."""

        def points(self, info):
            return [(0, "post")]

        def apply_tower(self, t, ctx):
            keep = (t.index % 7 == 0) & t.valid
            k = int(keep.sum(1).max())
            idx = torch.stack([torch.nonzero(row).flatten() for row in keep])
            return t.take(idx[:, :k])

    model, processor = model_and_processor("llava_next")
    inputs = build_inputs(processor, family_cases(FAMILIES["llava_next"])["image-b1"])
    vtr.wrap(model, KeepSome())
    try:
        with torch.no_grad():
            model(**inputs)
        report, state = model.vtr.report, model.vtr.adapter.last
    finally:
        vtr.unwrap(model)
    (im,) = state.spans[0].layout
    g2 = im.grids[0][1] * im.grids[0][2]
    _, hh, ww = im.grids[1]
    kept = set(report.kept(0, 0))
    lines_alive = [any(g2 + y * ww + x in kept for x in range(ww)) for y in range(hh)]
    newlines = [g2 + hh * ww + y in kept for y in range(hh)]
    assert newlines == lines_alive and not all(lines_alive) and any(lines_alive)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "internvl", "llava", "llava_onevision"])
@pytest.mark.parametrize("point", ["mid", "post"])
def test_in_tower_unit_selection_identity_and_counts(family, point):
    """A unit-keeping vision operator through the block runner (Qwen2.5-VL: window attention over the remaining
    units): keeping every unit reproduces the model exactly; keeping every other unit from block 0 on reaches the
    LLM as exactly those rows, at their original positions."""
    from conftest import LMRecorder, pos3, reference_run

    from vtr.ops.base import VisionOperator

    @dataclass
    class EveryOther(VisionOperator):
        stride: int = 1

        def points(self, info):
            return [(0, point)]

        def apply_tower(self, t, ctx):
            keep = (t.index % self.stride == 0) & t.valid
            k = int(keep.sum(1).max())
            idx = torch.zeros(len(keep), k, dtype=torch.long)
            ok = torch.zeros(len(keep), k, dtype=torch.bool)
            for s, row in enumerate(keep):
                sel = row.nonzero().flatten()
                idx[s, : len(sel)], ok[s, : len(sel)] = sel, True
            return t.take(idx, ok)

    case = "multi-b3"
    inputs, ref_logits, ref_tokens, ref_pos = reference_run(family, case)
    model, _ = model_and_processor(family)
    vtr.wrap(model, EveryOther(stride=1))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        vtr.wrap(model, EveryOther(stride=2))
        with LMRecorder(model) as rec, torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        state = model.vtr.adapter.last
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    prefill = pos3(rec.calls[0]["position_ids"])
    for b in range(inputs["input_ids"].shape[0]):
        enc = state.tokens[b].encoder
        assert bool((enc[:, 1][enc[:, 1] >= 0] % 2 == 0).all())  # only even units reached the LLM
        rows = state.kept_rows[b]
        torch.testing.assert_close(prefill[..., b, -len(rows) :], ref_pos[0][..., b, rows], rtol=0, atol=0)
