"""The bundled tiny video model (``assets/tiny-synth-vl``, a Qwen2-VL): offline loading, answers that stop at
the end token, expected answers on fixed test-split items (clips through the model's own video input, images,
image descriptions), baseline and reduced."""

from __future__ import annotations

import json

import pytest
import torch

import vtr
from vtr.bench import quality, synthqa
from vtr.models import bundled_model_dir, load_model

MODEL_DIR = bundled_model_dir("video")
pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").is_file(),
    reason=f"bundled video model absent ({MODEL_DIR}): train it with scripts/train_tiny_vlm.py",
)

#: Fixed test-split items the model answers right at full tokens and with DivPrune at half of the tokens (per
#: frame for clips): the first two of each type, found by scoring the first 80 clips / 60 images once.
VIDEO_QA_ITEMS = {"few_frames": [0, 4], "exist": [1, 5], "when": [2, 10]}
#: The one video describe item among them whose description names exactly the clip's objects.
VIDEO_DESCRIBE_ITEMS = [71]
IMAGE_QA_ITEMS = {
    "colour": [0, 12],
    "shape": [7, 13],
    "count": [2, 8],
    "exist": [3, 9],
    "left_right": [28, 34],
    "top_bottom": [5, 11],
}
#: Image descriptions: none of the first 24 is exact (see the README's Limits), so these items check the form
#: (sentences of well-formed object items that end) and that the first object named is in the scene.
IMAGE_DESCRIBE_ITEMS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_model(None, kind="video")


def _generate(model, processor, samples) -> tuple[list[str], list[bool]]:
    """Greedy answers up to the end token (or the generation config's cap) and whether each one ended."""
    (inputs,) = quality.prepare_batches(processor, samples, len(samples), synthqa)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    ended = [bool((row == eos).any()) for row in new]
    return processor.batch_decode(new, skip_special_tokens=True), ended


def test_loads_offline_as_a_small_qwen2_vl_that_stops_by_itself(bundled):
    model, processor = bundled
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and not model.training
    files = list(MODEL_DIR.iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == processor.tokenizer.eos_token_id and gen["max_new_tokens"] > 1
    clip = synthqa.sample("test", 0, task="video")
    (bv,) = quality.prepare_batches(processor, [clip], 1, synthqa)
    groups, side = synthqa.VIDEO_GROUPS, synthqa.VIDEO_SIZE // 14
    assert bv["video_grid_thw"].tolist() == [[groups, side, side]]
    assert int((bv["input_ids"] == model.config.video_token_id).sum()) == groups * (side // 2) ** 2


def _items() -> list:
    return [synthqa.sample("test", i, task="video") for ids in VIDEO_QA_ITEMS.values() for i in ids] + [
        synthqa.sample("test", i, task="video") for i in VIDEO_DESCRIBE_ITEMS
    ]


@pytest.mark.parametrize("reduction", [None, "divprune"], ids=["baseline", "divprune-0.5-per-frame"])
def test_fixed_video_items_are_answered_and_end(bundled, reduction):
    model, processor = bundled
    samples = _items()
    assert {s.qtype for s in samples} == set(synthqa.VIDEO_QUESTION_TYPES)
    if reduction is not None:
        vtr.wrap(model, reduction, keep=0.5, scope="frame")
    try:
        texts, ended = _generate(model, processor, samples)
        if reduction is not None:
            per_clip = synthqa.VIDEO_GROUPS * (synthqa.VIDEO_SIZE // synthqa.CELL) ** 2
            assert all(model.vtr.report.tokens_out(b) == per_clip // 2 for b in range(len(samples)))
    finally:
        if vtr.is_wrapped(model):
            vtr.unwrap(model)
    assert all(ended), texts
    for text, s in zip(texts, samples, strict=True):
        if s.qtype == "describe":
            n = len(s.clip.tracks)
            assert synthqa.description_counts(text, s.answer, with_location=False) == (n, n, n), (text, s.answer)
        else:
            assert text.strip() == s.answer, (s.question, text)


@pytest.mark.parametrize("reduction", [None, "divprune"], ids=["baseline", "divprune-0.5"])
def test_fixed_image_items_are_answered_and_end(bundled, reduction):
    model, processor = bundled
    qa = [synthqa.sample("test", i) for ids in IMAGE_QA_ITEMS.values() for i in ids]
    desc = [synthqa.sample("test", i, task="describe") for i in IMAGE_DESCRIBE_ITEMS]
    assert {s.qtype for s in qa} == set(synthqa.IMAGE_QUESTION_TYPES)
    if reduction is not None:
        vtr.wrap(model, reduction, keep=0.5)
    try:
        answers, ended_qa = _generate(model, processor, qa)
        texts, ended_desc = _generate(model, processor, desc)
        if reduction is not None:
            assert model.vtr.report.tokens_out(0) == (synthqa.IMAGE_SIZE // synthqa.CELL) ** 2 // 2
    finally:
        if vtr.is_wrapped(model):
            vtr.unwrap(model)
    assert all(ended_qa) and all(ended_desc), (answers, texts)
    for text, s in zip(answers, qa, strict=True):
        assert text.strip() == s.answer, (s.question, text)
    for text, s in zip(texts, desc, strict=True):
        items = synthqa.parse_description(text)
        assert items and None not in items, text
        assert items[0][:2] in {(o.colour, o.shape) for o in s.scene.objects}, (text, s.answer)
