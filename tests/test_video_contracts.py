"""Contract rows for the frame-aware operators (STORM-style pooling, QuoTA) on the video families.

Reuses the inputs, tiny models and recorders of the adapter contract matrix (tests/test_adapter_matrix.py):

* identity: factor 1 (STORM) / the full budget with a uniform scorer (QuoTA) gives the unwrapped logits and
  greedy tokens;
* counts per frame: the kept original indices are exactly the representatives the spec defines (the first
  frame of a temporal group, the top-left cell of a window, the kept frame; QuoTA: the nearest native cell);
* positions: the position ids reaching the language model are the unreduced ids of those representatives, and
  decoding continues at the unreduced positions;
* embeddings: a pooled row is the mean of the unreduced rows of its group;
* batch: every sample of a padded batch equals that sample run alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, GEN, QUESTIONS, LMRecorder, build_inputs, model_and_processor
from conftest import family_cases as _cases
from conftest import pos3 as _pos3
from conftest import reference_run as _reference
from conftest import video_array as _video

import vtr
from vtr.ops.quota import QuoTA, assign_budgets, frame_grid, nearest_cells
from vtr.ops.storm import SpatialPool, TemporalPool, TemporalSample

VIDEO_FAMILIES = [f.name for f in FAMILIES.values() if f.video]


def storm(k: int = 1, p: int = 1, stride: int = 1) -> list:
    return [TemporalPool(k=k), SpatialPool(p=p), TemporalSample(stride=stride)]


@pytest.fixture(autouse=True)
def _unwrap():
    yield
    for fam in VIDEO_FAMILIES:
        model_and_processor(fam)  # unwraps a model a failed test left wrapped


def _run(family: str, case: str, recipe, *, capture_embeds: bool = False):
    """Reduced prefill + greedy decode of a matrix case: (report, spans, kept_rows, LM calls, tokens)."""
    inputs, *_ = _reference(family, case)
    model, processor = model_and_processor(family)
    vtr.wrap(model, recipe, processor=processor)
    try:
        with LMRecorder(model) as rec, torch.no_grad():
            tokens = model.generate(**inputs, **GEN)
        adapter = model.vtr.adapter
        return model.vtr.report, adapter.last.spans, adapter.last.kept_rows, rec.calls, tokens
    finally:
        vtr.unwrap(model)


def _reference_embeds(family: str, case: str) -> torch.Tensor:
    """``inputs_embeds`` the unwrapped model gives its language model at prefill."""
    inputs, *_ = _reference(family, case)
    model, _ = model_and_processor(family)
    with LMRecorder(model) as rec, torch.no_grad():
        model(**inputs)
    return rec.calls[0]["inputs_embeds"]


def storm_representatives(layout, k: int, p: int, s: int) -> list[list[int]]:
    """Per image of a sample: the original indices (within the image) STORM keeps, from the spec's rule.

    Videos: frames ``0, k*s, 2*k*s, ...`` (the first frame of every kept temporal group), cells ``(p*i, p*j)``.
    Images: every index (they pass through).
    """
    out = []
    for im in layout:
        if im.kind != "video":
            out.append(list(range(im.n_tokens)))
            continue
        _t, h, w = im.grids[0]
        frames = range(0, len(im.grids), k * s)
        cells = [r * w + c for r in range(0, h, p) for c in range(0, w, p)]
        out.append([f * h * w + c for f in frames for c in cells])
    return out


# ------------------------------------------------------------------------------------------------ STORM
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("recipe", ["factors", "keep"])
def test_storm_identity_at_factor_one(family, recipe):
    inputs, ref_logits, ref_tokens, _ = _reference(family, "video-b3")
    model, _ = model_and_processor(family)
    vtr.wrap(model, storm() if recipe == "factors" else "storm", **({"keep": 1.0} if recipe == "keep" else {}))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize(("k", "p", "s"), [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (3, 2, 2)])
def test_storm_representatives_positions_and_counts(family, k, p, s):
    """Kept rows are the spec's representatives; their position ids are the unreduced ones; decode continues
    at the unreduced positions; the count is ``ceil(ceil(T/k)/s) * ceil(h/p) * ceil(w/p)`` per video."""
    case = "video-b3"
    ref_pos = _reference(family, case)[3]
    report, spans, kept_rows, calls, _ = _run(family, case, storm(k, p, s))
    prefill = _pos3(calls[0]["position_ids"])
    for b, span in enumerate(spans):
        want = storm_representatives(span.layout, k, p, s)
        for i, im in enumerate(span.layout):
            assert report.kept(b, i) == want[i], f"sample {b} image {i}"
            if im.kind == "video":
                _t, h, w = im.grids[0]
                t = len(im.grids)
                assert len(want[i]) == math.ceil(math.ceil(t / k) / s) * math.ceil(h / p) * math.ceil(w / p)
        # The rows reaching the LLM: text rows, plus the representatives' rows, with their unreduced positions.
        rows = kept_rows[b]
        rep_rows = torch.cat([span.seq_pos[im.offset + torch.tensor(want[i])] for i, im in enumerate(span.layout)])
        visual = torch.isin(rows, span.seq_pos)
        assert torch.equal(rows[visual], torch.sort(rep_rows).values)
        n = len(rows)
        torch.testing.assert_close(prefill[..., b, -n:], ref_pos[0][..., b, rows], rtol=0, atol=0)
    for step, call in enumerate(calls[1:], start=1):
        torch.testing.assert_close(_pos3(call["position_ids"]), ref_pos[step], rtol=0, atol=0)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_storm_rows_are_group_means(family):
    """Each pooled row equals the mean of the unreduced LLM-input rows of its temporal x spatial group."""
    case, k, p = "video-b1", 2, 2
    ref = _reference_embeds(family, case)
    _, spans, kept_rows, calls, _ = _run(family, case, storm(k, p, 1))
    (span,) = spans
    (video,) = span.layout
    _t, h, w = video.grids[0]
    grid = ref[0, span.seq_pos[video.offset : video.offset + video.n_tokens]].view(len(video.grids), h, w, -1)
    got = calls[0]["inputs_embeds"][0, -len(kept_rows[0]) :]
    row_of = {int(r): j for j, r in enumerate(kept_rows[0])}
    for f in range(0, len(video.grids), k):
        for r in range(0, h, p):
            for c in range(0, w, p):
                want = grid[f : f + k, r : r + p, c : c + p].mean(dim=(0, 1, 2))
                seq = int(span.seq_pos[video.offset + f * h * w + r * w + c])
                torch.testing.assert_close(got[row_of[seq]], want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_storm_batch_invariance(family):
    model, processor = model_and_processor(family)
    samples = _cases(FAMILIES[family])["video-b3"]
    vtr.wrap(model, storm(2, 2, 1))
    try:
        with torch.no_grad():
            batch = build_inputs(processor, samples)
            batch_logits = model(**batch).logits[:, -1]
            batch_tokens = model.generate(**batch, **GEN)[:, -GEN["max_new_tokens"] :]
            counts = [model.vtr.report.tokens_out(b) for b in range(len(samples))]
            for b, smp in enumerate(samples):
                one = build_inputs(processor, [smp])
                logits = model(**one).logits[:, -1]
                tokens = model.generate(**one, **GEN)[:, -GEN["max_new_tokens"] :]
                assert model.vtr.report.tokens_out(0) == counts[b]
                torch.testing.assert_close(logits[0], batch_logits[b], atol=1e-4, rtol=1e-4)
                assert torch.equal(tokens[0], batch_tokens[b]), f"sample {b} differs from its batched run"
    finally:
        vtr.unwrap(model)
    assert len(set(counts)) > 1


# ------------------------------------------------------------------------------------------------ QuoTA
def _frames(sample) -> list:
    """The frames ``build_inputs`` gives the processor for each video of ``sample`` (same seeds)."""
    return [_video(f, h, w, sample.seed * 10 + 5 + j) for j, (f, h, w) in enumerate(sample.videos)]


class QueryScorer:
    """Stub scorer: input frame ``i`` scores ``weights[i % len]``, reversed for questions about squares."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, frames, query, objects=None):
        w = self.weights[::-1] if "squares" in query else self.weights
        return torch.tensor([w[i % len(w)] for i in range(len(frames))], dtype=torch.float64)


def quota_representatives(layout, frames_per_video, scorer, query, keep) -> list[list[int]]:
    """Per image: the original indices QuoTA keeps, from the cores (budgets, grids, nearest cells)."""
    out, v = [], 0
    for im in layout:
        if im.kind != "video":
            out.append(list(range(im.n_tokens)))
            continue
        _t, h, w = im.grids[0]
        t = len(im.grids)
        raw = scorer(frames_per_video[v], query)
        v += 1
        scores = raw.view(t, -1).mean(1)
        total = vtr.ops.resolve_keep(keep, t * h * w)
        kept = []
        for f, n in enumerate(assign_budgets(scores, total, 2.0, h * w).tolist()):
            grid = frame_grid(n, (h, w))
            if grid[0] * grid[1]:
                kept += (f * h * w + nearest_cells(grid, (h, w))).tolist()
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_quota_identity_at_full_budget(family):
    inputs, ref_logits, ref_tokens, _ = _reference(family, "video-b3")
    model, processor = model_and_processor(family)
    vtr.wrap(model, QuoTA(keep=1.0, scorer="constant", decouple=False), processor=processor)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0, 0.0), (0.2, 1.0, 0.5, 0.1)])
def test_quota_budgets_positions_and_dropped_frames(family, weights):
    """Kept rows are the nearest native cells of each frame's budgeted grid, 0-budget frames leave nothing,
    positions are the unreduced ids of those rows and decoding continues at the unreduced positions."""
    case, keep = "video-b3", 0.5
    samples = _cases(FAMILIES[family])[case]
    scorer = QueryScorer(weights)
    ref_pos = _reference(family, case)[3]
    report, spans, kept_rows, calls, _ = _run(family, case, QuoTA(keep=keep, scorer=scorer, decouple=False))
    infos = report.details["quota"]
    prefill = _pos3(calls[0]["position_ids"])
    for b, span in enumerate(spans):
        q = QUESTIONS[samples[b].question]
        want = quota_representatives(span.layout, _frames(samples[b]), scorer, q, keep)
        for i in range(len(span.layout)):
            assert report.kept(b, i) == want[i], f"sample {b} image {i}"
        rows = kept_rows[b]
        rep_rows = torch.cat(
            [span.seq_pos[im.offset + torch.tensor(want[i], dtype=torch.long)] for i, im in enumerate(span.layout)]
        )
        assert torch.equal(rows[torch.isin(rows, span.seq_pos)], torch.sort(rep_rows).values)
        torch.testing.assert_close(prefill[..., b, -len(rows) :], ref_pos[0][..., b, rows], rtol=0, atol=0)
    if 0.0 in weights:  # Qwen: token frame 1 = input frames 2-3, scored 0 -> dropped; OneVision: frames 2, 3
        assert all(info.dropped_frames >= 1 for info in infos if len(info.budgets) > 1)
    for step, call in enumerate(calls[1:], start=1):
        torch.testing.assert_close(_pos3(call["position_ids"]), ref_pos[step], rtol=0, atol=0)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_quota_batch_invariance(family):
    """Each sample (own question, own scores and budgets) gives in a padded batch what it gives alone."""
    model, processor = model_and_processor(family)
    samples = _cases(FAMILIES[family])["video-b3"]
    vtr.wrap(model, QuoTA(keep=0.4, scorer=QueryScorer((1.0, 0.3, 0.6, 0.0)), decouple=False), processor=processor)
    try:
        with torch.no_grad():
            batch = build_inputs(processor, samples)
            batch_logits = model(**batch).logits[:, -1]
            batch_tokens = model.generate(**batch, **GEN)[:, -GEN["max_new_tokens"] :]
            counts = [model.vtr.report.tokens_out(b) for b in range(len(samples))]
            kept = [model.vtr.report.kept(b, len(s.images)) for b, s in enumerate(samples)]
            for b, smp in enumerate(samples):
                one = build_inputs(processor, [smp])
                logits = model(**one).logits[:, -1]
                tokens = model.generate(**one, **GEN)[:, -GEN["max_new_tokens"] :]
                assert model.vtr.report.tokens_out(0) == counts[b]
                assert model.vtr.report.kept(0, len(smp.images)) == kept[b]
                torch.testing.assert_close(logits[0], batch_logits[b], atol=1e-4, rtol=1e-4)
                assert torch.equal(tokens[0], batch_tokens[b]), f"sample {b} differs from its batched run"
    finally:
        vtr.unwrap(model)
