"""Loading models for the CLI, the demo and benchmarks: a Hugging Face id/path, or the bundled default."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_MODELS", "BUNDLED_MODEL_NAME", "assets_dir", "bundled_model_dir", "load_model"]

#: The bundled tiny trained VLMs, by the input they are the default for: images (a LLaVA-1.5 that answers
#: visual questions with one word) and videos (a Qwen2-VL that answers in short sentences and describes clips).
BUNDLED_MODELS = {"image": "tiny-vqa-llava", "video": "tiny-synth-vl"}
BUNDLED_MODEL_NAME = BUNDLED_MODELS["image"]


def assets_dir() -> Path:
    """``$VTR_ASSETS`` if set, else the repository's ``assets/`` folder (source checkouts and ``pip -e``)."""
    env = os.environ.get("VTR_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets"


def bundled_model_dir(kind: str = "image") -> Path:
    """Where the bundled tiny trained VLM for ``kind`` (``"image"`` or ``"video"``) lives, see
    :data:`BUNDLED_MODELS`."""
    if kind not in BUNDLED_MODELS:
        raise ValueError(f"kind must be one of {tuple(BUNDLED_MODELS)}, got {kind!r}")
    return assets_dir() / BUNDLED_MODELS[kind]


def load_model(model: str | None = None, *, kind: str = "image", dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, processor)``.

    ``model=None`` loads the bundled tiny model for ``kind`` (``"image"`` or ``"video"``; raises naming its
    folder when it is missing: never a silent fallback to random weights). Otherwise ``model`` is a Hugging
    Face id or a local directory, loaded with ``from_pretrained`` (real use; needs the weights on disk or a
    hub), and ``kind`` is not used.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    if model is None:
        path = bundled_model_dir(kind)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled model is missing: no config.json in {path} (reinstall vtr from a source checkout, set "
                "$VTR_ASSETS, or pass --model)"
            )
        model = str(path)
    local = Path(model)
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{model} exists but holds no config.json: not a saved Hugging Face model")
    m = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)
    p = AutoProcessor.from_pretrained(model)
    return m.to(device).eval(), p
