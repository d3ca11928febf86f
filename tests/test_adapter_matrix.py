"""The adapter contract matrix (DESIGN §4): every adapter x {Random, Pool, DivPrune} x batch x inputs.

Each family has a tiny random-weight model from :mod:`vtr.testing` and a real Hugging Face processor.
Contracts checked here, per family:

* identity: keep=1.0 gives the unwrapped logits (fp32, atol 1e-5) and the same greedy tokens;
* budgets: kept counts per scope unit match the budget, and the LLM input shrinks by exactly that;
* positions: the position ids reaching the language model at prefill are the unreduced ones gathered
  at the kept rows, and decode positions equal those of the unreduced run, with ``generate`` and with
  a manual cached forward that passes ``position_ids=None`` (Qwen's ``rope_deltas`` path);
* batch: every sample of a padded batch equals that sample run alone (different sizes/kept counts);
* unwrap: restores the exact original behaviour and removes every hook and instance wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import vtr
from vtr import testing as vt
from vtr.ops import DivPrune, Pool, Random
from vtr.ops.base import resolve_keep
from vtr.ops.baselines import pool_grid_shape

# --------------------------------------------------------------------------------------------- inputs
QUESTIONS = ["what colour is the circle ?", "how many squares ?", "is there a red star on the left side ?"]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def _video(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((frames, h, w, 3)) * 255).astype("uint8")


@dataclass(frozen=True)
class Sample:
    """One prompt: its images (H, W) and videos (frames, H, W), in prompt order (images first)."""

    images: tuple[tuple[int, int], ...] = ()
    videos: tuple[tuple[int, int, int], ...] = ()
    question: int = 0
    seed: int = 0
    nested: bool = False  # pass the images of the call as one list per sample (OneVision: untiled multi-image)


@dataclass(frozen=True)
class Family:
    name: str
    factory: Callable
    image_sizes: tuple[tuple[int, int], ...]  # three distinct sizes the processor accepts
    video: tuple[tuple[int, int, int], ...] = ()  # three distinct (frames, H, W), empty: no video
    mrope: bool = False  # Qwen M-RoPE positions ([3 or 4, B, L])
    untiled: bool = False  # add "untiled" cases: nested image lists (OneVision's multi-image mode)


FAMILIES = {
    "qwen2_vl": Family(
        "qwen2_vl", vt.tiny_qwen2_vl, ((32, 48), (48, 32), (32, 32)), ((4, 32, 32), (2, 32, 48), (6, 32, 32)),
        mrope=True,
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl", vt.tiny_qwen2_5_vl, ((32, 48), (48, 32), (32, 32)), ((4, 32, 32), (2, 32, 48), (6, 32, 32)),
        mrope=True,
    ),
    # InternVL: 32x32 tiles; (32, 80) -> 3 crops + thumbnail, (64, 32) -> 2 + thumbnail, (32, 32) -> 1 tile.
    "internvl": Family("internvl", vt.tiny_internvl, ((32, 80), (64, 32), (32, 32))),
    # LLaVA-NeXT: 32-pixel tiles, pinpoints 1x2 / 2x1 / 2x2; newline rows are ordinary candidates.
    "llava_next": Family("llava_next", vt.tiny_llava_next, ((32, 80), (64, 40), (50, 50))),
    # LLaVA-OneVision: SigLIP 32-pixel tiles of 8x8 patches, NeXT-style AnyRes; videos pooled 2x2 to 4x4 per
    # frame plus one newline per video. All videos of one call need the same frame count (the model reshapes
    # ``[n_videos, F, ...]``). "untiled" passes nested images: multi-image samples get base views only.
    "llava_onevision": Family(
        "llava_onevision", vt.tiny_llava_onevision, ((32, 80), (64, 40), (50, 50)),
        ((4, 32, 32), (4, 32, 48), (4, 48, 32)), untiled=True,
    ),
}


def _cases(fam: Family) -> dict[str, list[Sample]]:
    """Inputs per case: ``{case}-b1`` (one sample) and ``{case}-b3`` (three padded samples)."""
    s = fam.image_sizes
    out = {
        "image-b1": [Sample(images=(s[0],))],
        "image-b3": [Sample(images=(s[0],), question=0, seed=1), Sample(images=(s[1],), question=2, seed=2),
                     Sample(images=(s[2],), question=1, seed=3)],
        "multi-b1": [Sample(images=(s[0], s[1]))],
        "multi-b3": [Sample(images=(s[0], s[2]), question=1, seed=4), Sample(images=(s[1],), question=2, seed=5),
                     Sample(images=(s[2], s[1], s[0]), question=0, seed=6)],
    }
    if fam.untiled:
        out["untiled-b1"] = [Sample(images=(s[0], s[1]), nested=True)]
        out["untiled-b3"] = [Sample(images=(s[0], s[2]), question=1, seed=4, nested=True),
                             Sample(images=(s[1],), question=2, seed=5, nested=True),
                             Sample(images=(s[2], s[1], s[0]), question=0, seed=6, nested=True)]
    if fam.video:
        v = fam.video
        out["video-b1"] = [Sample(videos=(v[0],))]
        out["video-b3"] = [Sample(videos=(v[0],), seed=7), Sample(videos=(v[1],), question=2, seed=8),
                           Sample(images=(s[0],), videos=(v[2],), question=1, seed=9)]
    return out


def build_inputs(processor, samples: list[Sample]) -> dict:
    texts, images, videos = [], [], []
    nested = any(smp.nested for smp in samples)
    for _i, smp in enumerate(samples):
        content = [{"type": "image"} for _ in smp.images] + [{"type": "video"} for _ in smp.videos]
        content.append({"type": "text", "text": QUESTIONS[smp.question]})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        own = [_image(h, w, smp.seed * 10 + j) for j, (h, w) in enumerate(smp.images)]
        images += [own] if nested else own
        videos += [_video(f, h, w, smp.seed * 10 + 5 + j) for j, (f, h, w) in enumerate(smp.videos)]
    kwargs: dict = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return dict(processor(**kwargs))


@functools.cache
def _model(family: str):
    return FAMILIES[family].factory()


def model_and_processor(family: str):
    model, processor = _model(family)
    if vtr.api.is_wrapped(model):
        vtr.unwrap(model)
    return model, processor


def _params():
    for fam in FAMILIES.values():
        for case in _cases(fam):
            yield pytest.param(fam.name, case, id=f"{fam.name}-{case}")


CASES = list(_params())
OPS = {"Random": Random, "Pool": Pool, "DivPrune": DivPrune}


# --------------------------------------------------------------------------------------------- recording
class LMRecorder:
    """Records what reaches the language model (registered AFTER vtr's hook, so it sees its output)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        lm = model.model.language_model
        self.handle = lm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(
            {k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")}
            | {"past": 0 if kwargs.get("cache") is None else int(kwargs["cache"].get_seq_length())}
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _pos3(pos: torch.Tensor) -> torch.Tensor:
    """Position ids as ``[R, B, L]`` (R = 1 for 1-D RoPE; Qwen's [4, B, L] keeps its 4 rows)."""
    return pos.unsqueeze(0) if pos.ndim == 2 else pos


GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


@functools.cache
def _reference(family: str, case: str):
    """Unwrapped logits, greedy tokens and LM positions (prefill, decode) for one case."""
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, _cases(FAMILIES[family])[case])
    with torch.no_grad():
        logits = model(**inputs).logits
        with LMRecorder(model) as rec:
            tokens = model.generate(**inputs, **GEN)
    positions = [_pos3(c["position_ids"]) for c in rec.calls]
    return inputs, logits, tokens, positions


# --------------------------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("family", "case"), CASES)
def test_identity_at_keep_one(family: str, case: str, op: str) -> None:
    inputs, ref_logits, ref_tokens, _ref_pos = _reference(family, case)
    model, _ = model_and_processor(family)
    vtr.wrap(model, OPS[op](keep=1.0))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
    finally:
        vtr.unwrap(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def _expected_counts(op: str, keep: float, tokens) -> list[int]:
    """Budget per scope unit, computed from the unit's original size and grid."""
    out = []
    for _, pos in tokens.units("image"):
        n = len(pos)
        k = resolve_keep(keep, n)
        if op == "Pool" and k < n:
            im = tokens.layout[int(tokens.image[pos[0]])]
            cells = sum(h * w for _, h, w in im.grids)
            budget = max(k - (n - sum(t * h * w for t, h, w in im.grids)), len(im.grids))
            k = sum(
                int(np.prod(pool_grid_shape(h, w, max(1, (budget * t * h * w) // cells)))) * t
                for t, h, w in im.grids
            ) + (n - cells)  # rows outside the grids (LLaVA-NeXT newlines) are kept by Pool
        out.append(k)
    return out


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("family", "case"), CASES)
def test_budget_and_positions(family: str, case: str, op: str) -> None:
    """Kept counts per image match the budget; prefill positions are the unreduced ones gathered at
    the kept rows; decode positions equal the unreduced run's."""
    inputs, _, _ref_tokens, ref_pos = _reference(family, case)
    model, _ = model_and_processor(family)
    keep = 0.3
    vtr.wrap(model, OPS[op](keep=keep))
    try:
        with LMRecorder(model) as rec, torch.no_grad():
            model.generate(**inputs, **GEN)
        adapter = model.vtr.adapter
        report = model.vtr.report
        spans, kept_rows = adapter.last.spans, adapter.last.kept_rows
    finally:
        vtr.unwrap(model)
    bsz = inputs["input_ids"].shape[0]
    prefill = _pos3(rec.calls[0]["position_ids"])
    mask = rec.calls[0]["attention_mask"]
    assert rec.calls[0]["past"] == 0 and mask is not None and mask.ndim == 2
    for b in range(bsz):
        tokens = vtr.tokens.VisualTokens.from_layout(torch.zeros(len(spans[b].seq_pos), 1), spans[b].layout)
        expected = _expected_counts(op, keep, tokens)
        got = [len(report.kept(b, i)) for i in range(len(spans[b].layout))]
        assert got == expected, f"sample {b}: kept {got}, budget {expected}"
        n_vis = len(spans[b].seq_pos)
        assert report.original_tokens[b] == n_vis
        assert len(kept_rows[b]) == inputs["input_ids"].shape[1] - n_vis + sum(expected)
        n = len(kept_rows[b])
        # Prefill: gathered ORIGINAL positions (text rows all kept, sequence order preserved).
        torch.testing.assert_close(prefill[..., b, -n:], ref_pos[0][..., b, kept_rows[b]], rtol=0, atol=0)
        assert bool(mask[b, -n:].bool().eq(inputs["attention_mask"][b, kept_rows[b]].bool()).all())
    # Decode: exactly the positions of the unreduced run, step by step.
    assert len(rec.calls) == len(ref_pos)
    for step, call in enumerate(rec.calls[1:], start=1):
        torch.testing.assert_close(_pos3(call["position_ids"]), ref_pos[step], rtol=0, atol=0)


def _manual_decode(model, inputs: dict, with_mask: bool) -> list[torch.Tensor]:
    """Prefill with ``use_cache``, then two cached forwards with ``position_ids=None``: LM positions."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        with LMRecorder(model) as rec:
            for _ in range(2):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                extra = {"attention_mask": mask} if with_mask else {}
                out = model(input_ids=nxt, cache=out.cache, use_cache=True, **extra)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for c in rec.calls:
        if c["position_ids"] is None:  # 1-D LMs build ``past + arange(q)`` themselves
            c["position_ids"] = torch.full((nxt.shape[0], 1), c["past"], dtype=torch.long)
    return [_pos3(c["position_ids"]) for c in rec.calls]


@pytest.mark.parametrize(("family", "case"), CASES)
def test_manual_decode_positions_without_position_ids(family: str, case: str) -> None:
    """A cached forward with ``position_ids=None`` decodes at the unreduced positions, with the caller's
    mask grown from the unreduced prompt (batch 3) or no mask at all (batch 1).

    Reference: the unwrapped model's own manual run; for M-RoPE models (Qwen: the ``rope_deltas``
    path) the decode ids ``generate`` gives the unwrapped model, i.e. ``cumsum(mask) - 1 + rope_deltas``
    (transformers 5.24's own cached forward with a 2-D mask returns ids for every mask column there).
    """
    inputs, _, _, ref_pos = _reference(family, case)
    model, _ = model_and_processor(family)
    with_mask = inputs["input_ids"].shape[0] > 1
    mrope = FAMILIES[family].mrope
    ref = [p[-3:] for p in ref_pos[1:3]] if mrope else _manual_decode(model, inputs, with_mask)
    vtr.wrap(model, Random(keep=0.3))
    try:
        red = _manual_decode(model, inputs, with_mask)
    finally:
        vtr.unwrap(model)
    assert len(red) == len(ref) == 2
    for got, want in zip(red, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("family", "case"), [c for c in CASES if "b3" in c.values[1]])
def test_batch_invariance(family: str, case: str, op: str) -> None:
    """Each sample of a padded batch gives what it gives alone (greedy tokens equal, logits close)."""
    model, processor = model_and_processor(family)
    samples = _cases(FAMILIES[family])[case]
    vtr.wrap(model, OPS[op](keep=0.3))
    try:
        with torch.no_grad():
            batch_inputs = build_inputs(processor, samples)
            batch_logits = model(**batch_inputs).logits[:, -1]
            batch_tokens = model.generate(**batch_inputs, **GEN)[:, -GEN["max_new_tokens"] :]
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
    assert len(set(counts)) > 1, "the batch case should keep different numbers of tokens per sample"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unwrap_restores(family: str) -> None:
    model, _processor = model_and_processor(family)
    inputs, ref_logits, ref_tokens, _ = _reference(family, "multi-b3")
    base, lm = model.model, model.model.language_model
    before = (dict(model._forward_pre_hooks), dict(base._forward_pre_hooks), dict(lm._forward_pre_hooks),
              dict(lm._forward_hooks), set(base.__dict__))
    vtr.wrap(model, DivPrune(keep=0.2))
    vtr.wrap(model, Random(keep=0.5))  # wrapping twice replaces the first pipeline
    with torch.no_grad():
        model(**inputs)
    assert model.vtr.report.tokens_out(0) < model.vtr.report.original_tokens[0]
    vtr.unwrap(model)
    after = (dict(model._forward_pre_hooks), dict(base._forward_pre_hooks), dict(lm._forward_pre_hooks),
             dict(lm._forward_hooks), set(base.__dict__))
    assert before == after
    assert not hasattr(model, "vtr")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref_logits, atol=0, rtol=0)
        assert torch.equal(model.generate(**inputs, **GEN), ref_tokens)


# --------------------------------------------------------------------------------------------- scopes
@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if f.video])
def test_video_frame_scope(family: str) -> None:
    """``scope="frame"`` budgets each temporal step of a video (Qwen: 2 input frames) separately."""
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, _cases(FAMILIES[family])["video-b1"])
    vtr.wrap(model, Random(keep=0.25, scope="frame"))
    try:
        with torch.no_grad():
            model(**inputs)
        spans = model.vtr.adapter.last.spans[0]
        report = model.vtr.report
    finally:
        vtr.unwrap(model)
    (video,) = spans.layout
    assert video.kind == "video" and len(video.grids) >= 2
    kept = torch.tensor(report.kept(0, 0))
    per_frame = video.grids[0][1] * video.grids[0][2]
    counts = torch.bincount(kept // per_frame, minlength=len(video.grids)).tolist()
    assert counts == [resolve_keep(0.25, per_frame)] * len(video.grids)


# --------------------------------------------------------------------------------------------- expanded batches
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_beams_and_return_sequences(family: str) -> None:
    """``generate`` encodes images before repeating each sample (``num_beams`` / ``num_return_sequences``):
    the captured grid metadata serves every copy. Identity at keep=1.0 with beam search, and a reduced run
    reduces every copy exactly like the unexpanded batch does."""
    fam = FAMILIES[family]
    case = "video-b3" if fam.video else "multi-b3"
    inputs, *_ = _reference(family, case)
    model, _ = model_and_processor(family)
    beams = dict(GEN, num_beams=2)
    with torch.no_grad():
        ref = model.generate(**inputs, **beams)
    bsz = inputs["input_ids"].shape[0]
    vtr.wrap(model, Random(keep=1.0))
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, **beams), ref)
        vtr.wrap(model, Random(keep=0.3))
        with torch.no_grad():
            model.generate(**inputs, **GEN)
            plain = model.vtr.report
            want = [(plain.original_tokens[b], plain.tokens_out(b)) for b in range(bsz)]
            out = model.generate(**inputs, **dict(GEN, num_beams=2, num_return_sequences=2))
            report = model.vtr.report
    finally:
        vtr.unwrap(model)
    assert out.shape[0] == 2 * bsz
    got = [(report.original_tokens[r], report.tokens_out(r)) for r in range(2 * bsz)]
    assert got == [w for w in want for _ in range(2)]
