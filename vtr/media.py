"""Loading user media with clear errors (missing, unreadable or corrupt files)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_image"]


def load_image(path: str | Path):
    """Open an image file as RGB ``PIL.Image``; raise ``FileNotFoundError``/``ValueError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if not p.is_file():
        raise ValueError(f"image path is not a file: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {p}: not a valid image file ({exc})") from exc
