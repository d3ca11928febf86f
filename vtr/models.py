"""Loading models for the CLI, the demo and benchmarks: a Hugging Face id/path, or the bundled default."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_MODEL_NAME", "assets_dir", "bundled_model_dir", "load_model"]

BUNDLED_MODEL_NAME = "tiny-vqa-llava"


def assets_dir() -> Path:
    """``$VTR_ASSETS`` if set, else the repository's ``assets/`` folder (source checkouts and ``pip -e``)."""
    env = os.environ.get("VTR_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets"


def bundled_model_dir() -> Path:
    """Where the bundled tiny trained VLM lives (``assets/tiny-vqa-llava``)."""
    return assets_dir() / BUNDLED_MODEL_NAME


def load_model(model: str | None = None, *, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, processor)``.

    ``model=None`` loads the bundled tiny model (raises naming its folder when it is missing: never a silent
    fallback to random weights). Otherwise ``model`` is a Hugging Face id or a local directory, loaded with
    ``from_pretrained`` (real use; needs the weights on disk or a hub).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    if model is None:
        path = bundled_model_dir()
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
