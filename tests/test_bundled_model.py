"""The bundled tiny trained VLM (``assets/tiny-vqa-llava``): offline loading and measured accuracy."""

from __future__ import annotations

import pytest
import torch

import vtr
from vtr.bench import quality
from vtr.bench import synthqa_v1 as synthqa
from vtr.models import bundled_model_dir, load_model

pytestmark = pytest.mark.skipif(
    not (bundled_model_dir() / "config.json").is_file(),
    reason=f"bundled checkpoint absent ({bundled_model_dir()}): train it with scripts/train_tiny_vqa.py",
)

N_SUBSET = 200


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    return load_model(None)


@pytest.fixture(scope="module")
def subset(bundled):
    _, processor = bundled
    samples = synthqa.split("test", N_SUBSET)
    return samples, quality.split_batches(processor, samples, 50, synthqa)


@pytest.fixture(scope="module")
def reference(bundled, subset):
    model, processor = bundled
    samples, batches = subset
    return quality.evaluate(model, processor, samples, batches=batches)


def test_loads_offline_as_llava_with_196_visual_tokens(bundled):
    model, processor = bundled
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not model.training
    vc = model.config.vision_config
    assert (vc.image_size // vc.patch_size) ** 2 >= 196
    assert model.config.vision_feature_select_strategy == "default"  # CLS in the tower, dropped for the LLM
    files = list(bundled_model_dir().iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    text = processor.apply_chat_template(synthqa.prompt_messages("is there a red circle ?"), add_generation_prompt=True)
    assert text.startswith("USER: <image>") and text.rstrip().endswith("ASSISTANT:")
    inputs = processor(images=[synthqa.to_pil(synthqa.sample("test", 0).image)], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 196


def test_accuracy_with_all_tokens(reference):
    assert reference["n"] == N_SUBSET
    assert reference["visual_tokens"] == 196
    assert reference["accuracy"] >= 0.85, reference


def test_greedy_generation_answers_with_the_answer_word(bundled, subset, reference):
    """The first greedily generated word agrees with the logit-argmax metric (and is usually right)."""
    model, processor = bundled
    samples, batches = subset
    inputs = batches["qa"][0]
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    words = [processor.decode(o[inputs["input_ids"].shape[1]:], skip_special_tokens=True).split() for o in out]
    first = [w[0] if w else "" for w in words]
    right = sum(f == s.answer for f, s in zip(first, samples[:50], strict=True))
    assert right >= 40


def test_divprune_at_least_random_at_quarter_budget(bundled, subset, reference):
    model, processor = bundled
    samples, batches = subset
    scores = {}
    for recipe in ("divprune", "random"):
        vtr.wrap(model, recipe, keep=0.25)
        try:
            scores[recipe] = quality.evaluate(model, processor, samples, batches=batches)
        finally:
            vtr.unwrap(model)
        assert scores[recipe]["visual_tokens"] == 49
    assert scores["divprune"]["accuracy"] >= scores["random"]["accuracy"], scores
    assert scores["random"]["accuracy"] < reference["accuracy"]  # the instrument sees the reduction
