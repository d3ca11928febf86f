"""Shared fixtures: tiny random-weight models and processor inputs, all built locally."""

from __future__ import annotations

import os

# Triton decides interpreter mode when it is first imported: set it before anything imports triton, so
# kernel tests run in-process on CPU-only machines (dispatch still picks torch for CPU tensors).
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def llava():
    """``(model, processor)``: tiny random LLaVA, 16x16 = 256 visual tokens per image."""
    from vtr.testing import tiny_llava

    return tiny_llava()


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
def _unwrap_shared_model(request):
    """Tests share one model instance: make sure none leaves it wrapped."""
    yield
    if "llava" in request.fixturenames:
        import vtr

        model = request.getfixturevalue("llava")[0]
        if vtr.is_wrapped(model):
            vtr.unwrap(model)


def greedy(model, inputs, n: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)
