"""What a demo request is, and the checks that run before the model is touched (no Gradio, no model).

:func:`check_upload` checks an uploaded file's type (by extension), size and content; :func:`make_request`
turns the UI's values into a validated :class:`DemoRequest`. Every problem raises :class:`DemoError`, whose
message the UI shows as is: it names the file or value and says what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vtr import recipes

__all__ = [
    "BUDGET_MODES",
    "IMAGE_TYPES",
    "VIDEO_TYPES",
    "DemoError",
    "DemoRequest",
    "UploadLimits",
    "check_media",
    "check_upload",
    "make_request",
    "parse_budget",
]

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_TYPES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
BUDGET_MODES = ("recipe default", "ratio", "count")
MAX_PROMPT_CHARS = 2000


class DemoError(ValueError):
    """A problem with the user's request; its message is shown in the UI as is."""


@dataclass(frozen=True)
class UploadLimits:
    """Upload and generation limits of one demo server.

    Attributes:
        image_mb, video_mb: largest accepted file per kind, in MiB.
        max_side: largest accepted image side in pixels (decoding a huge image costs memory before any check).
        max_frames: most video frames a request may sample.
        max_new_tokens: most tokens a request may generate per side.
    """

    image_mb: float = 20.0
    video_mb: float = 100.0
    max_side: int = 8192
    max_frames: int = 64
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("image_mb", "video_mb", "max_side", "max_frames", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UploadLimits.{name} must be > 0, got {getattr(self, name)!r}")


def check_upload(path: str | Path | None, limits: UploadLimits) -> str:
    """Check an uploaded file: its type (by extension), size and that it decodes. Returns ``"image"`` or ``"video"``.

    Raises:
        DemoError: naming the file and what is wrong (type, size, corrupt content), with the allowed values.
    """
    if path is None or str(path) == "":
        raise DemoError("no image or video: upload one or pick an example")
    p = Path(path)
    ext = p.suffix.lower()
    if ext in IMAGE_TYPES:
        kind, limit = "image", limits.image_mb
    elif ext in VIDEO_TYPES:
        kind, limit = "video", limits.video_mb
    else:
        raise DemoError(
            f"unsupported file type {ext or '(none)'!r} ({p.name}): upload an image ({', '.join(IMAGE_TYPES)}) "
            f"or a video ({', '.join(VIDEO_TYPES)})"
        )
    if not p.is_file():
        raise DemoError(f"{p.name}: the uploaded file is missing on the server; upload it again")
    size_mb = p.stat().st_size / 2**20
    if size_mb > limit:
        raise DemoError(f"{p.name} is {size_mb:.1f} MB; the limit for {kind}s is {limit:g} MB")
    if kind == "image":
        _check_image(p, limits)
    else:
        _check_video(p)
    return kind


def _check_image(p: Path, limits: UploadLimits) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:  # reads the header only: the size is known before decoding
            w, h = im.size
            if max(w, h) > limits.max_side:
                raise DemoError(f"{p.name} is {w}x{h} pixels; the limit is {limits.max_side} pixels per side")
            im.load()
    except DemoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(f"{p.name} is not a valid image file ({type(exc).__name__}: {exc})") from exc


def _check_video(p: Path) -> None:
    from vtr.video import read_video

    try:
        read_video(p, num_frames=1)
    except (ValueError, OSError) as exc:  # VideoError is a ValueError and names the file
        raise DemoError(f"{p.name} is not a readable video: {exc}") from exc


def parse_budget(mode: str, value: float | int | None) -> int | float | None:
    """The ``keep`` override from the UI: ``None`` (recipe default), a ratio in (0, 1] or a count >= 1."""
    if mode not in BUDGET_MODES:
        raise DemoError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}")
    if mode == "recipe default":
        return None
    if value is None:
        raise DemoError(f"enter a budget {mode}: a ratio in (0, 1] or a token count >= 1")
    if mode == "ratio":
        if not 0 < float(value) <= 1:
            raise DemoError(f"a budget ratio must lie in (0, 1], got {value:g}")
        return float(value)
    if float(value) != int(value) or int(value) < 1:
        raise DemoError(f"a budget count must be a whole number >= 1, got {value:g}")
    return int(value)


@dataclass(frozen=True)
class DemoRequest:
    """One validated request: the same media and prompt answered baseline and reduced."""

    path: str
    kind: str  # "image" | "video"
    prompt: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 32
    frames: int = 8


class ModelInfo(Protocol):
    """What request checks need to know about the served model (a :class:`~vtr.demos.engine.DemoEngine`)."""

    family: str
    supports_video: bool


def check_media(model: ModelInfo, path: str | Path | None, limits: UploadLimits) -> str:
    """:func:`check_upload`, and that the served model takes that kind of media. Returns ``"image"``/``"video"``."""
    kind = check_upload(path, limits)
    if kind == "video" and not model.supports_video:
        raise DemoError(
            f"this model ({model.family}) does not take videos: upload an image, or start the demo with a "
            "video model (vtr demo --model ...)"
        )
    return kind


def make_request(
    model: ModelInfo,
    path: str | None,
    prompt: str | None,
    recipe: str | None,
    budget_mode: str,
    budget_value: float | None,
    max_new_tokens: float | None,
    frames: float | None,
    limits: UploadLimits,
) -> DemoRequest:
    """Validate the UI's values into a :class:`DemoRequest` (raises :class:`DemoError` naming the problem)."""
    kind = check_media(model, path, limits)
    text = (prompt or "").strip()
    if not text:
        raise DemoError("enter a prompt (a question or an instruction about the image or video)")
    if len(text) > MAX_PROMPT_CHARS:
        raise DemoError(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if recipe not in recipes.names():
        raise DemoError(f"unknown recipe {recipe!r}; available: {', '.join(recipes.names())}")
    keep = parse_budget(budget_mode, budget_value)
    overrides = {} if keep is None else {"keep": keep}
    try:
        recipes.build(recipe, **overrides)
    except (ValueError, TypeError) as exc:
        hint = " (or choose the budget 'recipe default')" if overrides else ""
        raise DemoError(f"recipe {recipe!r}: {exc}{hint}") from exc
    n_new = _whole(max_new_tokens, "max new tokens", 1, limits.max_new_tokens)
    n_frames = _whole(frames, "frames", 1, limits.max_frames)
    return DemoRequest(str(path), kind, text, recipe, overrides, n_new, n_frames)


def _whole(value: float | None, name: str, lo: int, hi: int) -> int:
    if value is None or float(value) != int(value) or not lo <= int(value) <= hi:
        raise DemoError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return int(value)
