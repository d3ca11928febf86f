"""Shared fixtures and helpers: tiny random-weight models of every family, their inputs, recorders and
unreduced reference runs. All built locally, no downloads."""

from __future__ import annotations

import functools
import os

# Triton decides interpreter mode when it is first imported: set it before anything imports triton, so
# kernel tests run in-process on CPU-only machines (dispatch still picks torch for CPU tensors).
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import vtr
from vtr import testing as vt

# --------------------------------------------------------------------------------------------- LLaVA fixtures
N_IMG = 256  # 16 x 16 patches per image in the tiny LLaVA


@pytest.fixture(scope="session")
def llava():
    """``(model, processor)``: tiny random LLaVA, 16x16 = 256 visual tokens per image."""
    return vt.tiny_llava()


def random_image(seed: int, size: tuple[int, int] = (80, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


@pytest.fixture
def make_inputs(llava):
    """Build processor inputs: ``make_inputs([(prompt, n_images), ...])`` (left-padded batch)."""
    _, processor = llava

    def build(samples: list[tuple[str, int]], seed: int = 0):
        texts, images = [], []
        for i, (prompt, n_images) in enumerate(samples):
            texts.append("USER: " + "<image> " * n_images + prompt + " ASSISTANT:")
            images += [random_image(seed + 10 * i + j) for j in range(n_images)]
        return processor(images=images or None, text=texts, return_tensors="pt", padding=True)

    return build


@pytest.fixture(autouse=True)
def _unwrap_shared_models(request):
    """Tests share model instances: make sure none leaves them wrapped."""
    yield
    if "llava" in request.fixturenames:
        model = request.getfixturevalue("llava")[0]
        if vtr.is_wrapped(model):
            vtr.unwrap(model)
    for model, _ in _MODELS.values():
        if vtr.is_wrapped(model):
            vtr.unwrap(model)


def greedy(model, inputs, n: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


# --------------------------------------------------------------------------------------------- families
QUESTIONS = ["what colour is the circle ?", "how many squares ?", "is there a red star on the left side ?"]


def image_array(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def video_array(frames: int, h: int, w: int, seed: int) -> np.ndarray:
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
    "llava": Family("llava", vt.tiny_llava, ((80, 100), (64, 64), (100, 60))),
    "qwen2_vl": Family(
        "qwen2_vl",
        vt.tiny_qwen2_vl,
        ((32, 48), (48, 32), (32, 32)),
        ((4, 32, 32), (2, 32, 48), (6, 32, 32)),
        mrope=True,
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        vt.tiny_qwen2_5_vl,
        ((32, 48), (48, 32), (32, 32)),
        ((4, 32, 32), (2, 32, 48), (6, 32, 32)),
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
        "llava_onevision",
        vt.tiny_llava_onevision,
        ((32, 80), (64, 40), (50, 50)),
        ((4, 32, 32), (4, 32, 48), (4, 48, 32)),
        untiled=True,
    ),
}


def family_cases(fam: Family) -> dict[str, list[Sample]]:
    """Inputs per case: ``{case}-b1`` (one sample) and ``{case}-b3`` (three padded samples)."""
    s = fam.image_sizes
    out = {
        "image-b1": [Sample(images=(s[0],))],
        "image-b3": [
            Sample(images=(s[0],), question=0, seed=1),
            Sample(images=(s[1],), question=2, seed=2),
            Sample(images=(s[2],), question=1, seed=3),
        ],
        "multi-b1": [Sample(images=(s[0], s[1]))],
        "multi-b3": [
            Sample(images=(s[0], s[2]), question=1, seed=4),
            Sample(images=(s[1],), question=2, seed=5),
            Sample(images=(s[2], s[1], s[0]), question=0, seed=6),
        ],
    }
    if fam.untiled:
        out["untiled-b1"] = [Sample(images=(s[0], s[1]), nested=True)]
        out["untiled-b3"] = [
            Sample(images=(s[0], s[2]), question=1, seed=4, nested=True),
            Sample(images=(s[1],), question=2, seed=5, nested=True),
            Sample(images=(s[2], s[1], s[0]), question=0, seed=6, nested=True),
        ]
    if fam.video:
        v = fam.video
        out["video-b1"] = [Sample(videos=(v[0],))]
        out["video-b3"] = [
            Sample(videos=(v[0],), seed=7),
            Sample(videos=(v[1],), question=2, seed=8),
            Sample(images=(s[0],), videos=(v[2],), question=1, seed=9),
        ]
    return out


def build_inputs(processor, samples: list[Sample]) -> dict:
    texts, images, videos = [], [], []
    nested = any(smp.nested for smp in samples)
    for smp in samples:
        content = [{"type": "image"} for _ in smp.images] + [{"type": "video"} for _ in smp.videos]
        content.append({"type": "text", "text": QUESTIONS[smp.question]})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        own = [image_array(h, w, smp.seed * 10 + j) for j, (h, w) in enumerate(smp.images)]
        images += [own] if nested else own
        videos += [video_array(f, h, w, smp.seed * 10 + 5 + j) for j, (f, h, w) in enumerate(smp.videos)]
    kwargs: dict = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return dict(processor(**kwargs))


_MODELS: dict[str, tuple] = {}


def model_and_processor(family: str):
    """The family's shared tiny model (built once per session), unwrapped."""
    if family not in _MODELS:
        _MODELS[family] = FAMILIES[family].factory()
    model, processor = _MODELS[family]
    if vtr.is_wrapped(model):
        vtr.unwrap(model)
    return model, processor


# --------------------------------------------------------------------------------------------- recorders
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


class CacheRecorder:
    """Records the KV-cache length of every decoder layer after each language-model call."""

    def __init__(self, model):
        self.lengths: list[list[int]] = []
        lm = model.model.language_model
        self.handle = lm.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        cache = getattr(output, "cache", None)
        if cache is not None:
            self.lengths.append([int(cache.get_seq_length(i)) for i in range(len(cache.layers))])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def pos3(pos: torch.Tensor) -> torch.Tensor:
    """Position ids as ``[R, B, L]`` (R = 1 for 1-D RoPE; Qwen's [4, B, L] keeps its 4 rows)."""
    return pos.unsqueeze(0) if pos.ndim == 2 else pos


GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


@functools.cache
def reference_run(family: str, case: str):
    """Unwrapped logits, greedy tokens and LM positions (prefill, decode) for one case."""
    model, processor = model_and_processor(family)
    inputs = build_inputs(processor, family_cases(FAMILIES[family])[case])
    with torch.no_grad():
        logits = model(**inputs).logits
        with LMRecorder(model) as rec:
            tokens = model.generate(**inputs, **GEN)
    positions = [pos3(c["position_ids"]) for c in rec.calls]
    return inputs, logits, tokens, positions


SAMPLE = dict(max_new_tokens=3, min_new_tokens=3, do_sample=True, top_k=5, temperature=1.0)


def sample(model, inputs, seed: int = 0) -> torch.Tensor:
    """Sampled ``generate`` with a fixed seed (top-k 5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **SAMPLE)


@functools.cache
def reference_sample(family: str, case: str) -> torch.Tensor:
    """Sampled tokens of the unwrapped model for one case (fixed seed)."""
    model, _ = model_and_processor(family)
    return sample(model, reference_run(family, case)[0])


def hook_state(model) -> list:
    """Every module's hooks and instance attributes (to check that ``unwrap`` restores them exactly)."""
    return [
        (name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(sorted(m.__dict__)))
        for name, m in model.named_modules()
    ]
