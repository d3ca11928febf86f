"""Turning clips and prompts into model inputs for the video families (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision).

:func:`video_inputs` builds one sample per ``(clip, prompt)``: the processor's chat template with a video item
and the prompt, the clip's frames as the video, left padding (batched generation needs it). Frame counts are
adjusted to what the family's video processor accepts: Qwen packs ``temporal_patch_size`` (2) frames per
temporal step, so a clip is cut to the largest multiple of it (an odd last frame is dropped rather than
duplicated, so every token shows a real frame).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from vtr.video.io import Clip, VideoError

__all__ = ["frames_per_step", "tokens_per_frame", "usable_frames", "video_inputs", "video_messages"]


def frames_per_step(processor) -> int:
    """Input frames per temporal token step of ``processor``'s video processor (Qwen: 2, LLaVA-OneVision: 1)."""
    vp = getattr(processor, "video_processor", None)
    if vp is None:
        raise ValueError(
            f"{type(processor).__name__} has no video processor: the model does not take videos "
            "(video families: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision)"
        )
    return int(getattr(vp, "temporal_patch_size", None) or 1)


def usable_frames(processor, clip: Clip) -> int:
    """How many leading frames of ``clip`` the model's processor takes (a multiple of :func:`frames_per_step`).

    Raises :class:`VideoError` when the clip has fewer frames than one temporal step.
    """
    step = frames_per_step(processor)
    n = len(clip) - len(clip) % step
    if n == 0:
        raise VideoError(
            clip.path,
            f"{type(processor).__name__} packs {step} frames per temporal step but the clip has only {len(clip)} "
            f"frame(s); sample at least {step} frames from",
        )
    return n


def video_messages(prompt: str) -> list[dict[str, Any]]:
    """Chat messages of one video question: a user turn with a video item then the prompt text."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]


def _metadata(clip: Clip, n: int):
    """``VideoMetadata`` for the first ``n`` frames of ``clip``.

    Qwen2.5-VL derives the seconds per temporal step from ``metadata.sampled_fps`` (``len(frames_indices) /
    total_num_frames * fps``): ``total_num_frames`` is set so that this equals the clip's real sampling rate.
    """
    from transformers.video_utils import VideoMetadata

    rate = clip.sampled_fps
    total = max(n, round(n * clip.fps / rate)) if rate > 0 else n
    h, w = clip.frames.shape[1:3]
    return VideoMetadata(
        total_num_frames=total,
        fps=clip.fps,
        width=int(w),
        height=int(h),
        duration=clip.duration,
        video_backend="decord",
        frames_indices=[int(i) for i in clip.indices[:n]],
    )


def video_inputs(processor, clips: Sequence[Clip], prompts: Sequence[str]):
    """Processor inputs (``BatchFeature``, tensors) for one sample per ``(clip, prompt)``, left padded.

    Args:
        processor: a Hugging Face processor of a video family (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision).
        clips: the videos, e.g. from :func:`vtr.video.read_video`.
        prompts: one prompt per clip.

    Each clip contributes its first :func:`usable_frames` frames. LLaVA-OneVision stacks the videos of a call
    into one tensor, so its clips must then have the same frame count.
    """
    clips, prompts = list(clips), list(prompts)
    if not clips:
        raise ValueError("video_inputs needs at least one clip")
    if len(clips) != len(prompts):
        raise ValueError(f"video_inputs needs one prompt per clip, got {len(clips)} clips and {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    counts = [usable_frames(processor, c) for c in clips]
    texts = [processor.apply_chat_template(video_messages(p), add_generation_prompt=True) for p in prompts]
    videos = [np.ascontiguousarray(c.frames[:n]) for c, n in zip(clips, counts, strict=True)]
    metadata = [_metadata(c, n) for c, n in zip(clips, counts, strict=True)]
    try:
        return processor(
            text=texts,
            videos=videos,
            video_metadata=metadata,
            do_sample_frames=False,  # the clip is already sampled
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
    except ValueError as exc:
        if "pixel_values_videos" in str(exc) and len(set(counts)) > 1:
            raise ValueError(
                f"{type(processor).__name__} stacks the videos of one call, so they need the same frame count; "
                f"got {counts} frames for {[c.path for c in clips]}: read them with the same num_frames"
            ) from exc
        raise


def tokens_per_frame(layout, kept: Sequence[int]) -> list[int]:
    """Tokens per frame group of one video: ``layout`` is its :class:`~vtr.tokens.ImageLayout`, ``kept`` the
    original indices within it that reach the LLM (e.g. ``Report.kept``; a pooled token counts at its
    representative's frame). Rows beyond the frame grids (a closing newline) are not counted."""
    ends = list(itertools.accumulate(t * h * w for t, h, w in layout.grids))
    counts = [0] * len(ends)
    for i in kept:
        g = bisect.bisect_right(ends, int(i))
        if g < len(counts):
            counts[g] += 1
    return counts
