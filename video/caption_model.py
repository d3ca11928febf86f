"""The model side of ``vtr caption``: load a video VLM once, optionally wrap it, caption batches of clips.

Both engines use :class:`Captioner` (the local engine in the main process, the Ray engine once per actor), so
the records they write are identical in form. Records are plain dicts (JSON-ready); see
:func:`make_record` for the fields.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from typing import Any

from vtr.video.caption_decode import Decoded

__all__ = ["ERROR_STAGES", "NO_REDUCTION", "Captioner", "error_record", "make_record", "model_label", "recipe_label"]

#: Recipe names meaning "no token reduction" (the baseline).
NO_REDUCTION = ("none", "baseline")
#: Where a video can fail: the video itself (unreadable, too long, too few frames), in the model, or a Ray task
#: lost on every retry.
ERROR_STAGES = ("video", "caption", "ray")


def model_label(model: str | None) -> str:
    """The ``model`` field of a record: the id or path given, or ``bundled:<name>`` for the bundled video model."""
    if model is not None:
        return model
    from vtr.models import bundled_model_dir

    return f"bundled:{bundled_model_dir('video').name}"


def recipe_label(recipe: str, keep: int | float | None) -> str:
    """The ``recipe`` field of a record: the recipe name or path, with the budget override if any."""
    return recipe if keep is None else f"{recipe}(keep={keep})"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_record(
    path: str,
    *,
    caption: str | None,
    error: str | None,
    error_stage: str | None = None,
    frames: int | None,
    tokens_before: int | None,
    tokens_after: int | None,
    decode_s: float,
    generate_s: float | None,
    batch_size: int | None,
    duration: float | None,
    recipe: str,
    model: str,
    prompt: str,
) -> dict[str, Any]:
    """One JSONL record. ``error`` is ``None`` for a captioned video, else ``caption`` is ``None``.

    Fields: ``path`` (absolute), ``caption``, ``error``, ``error_stage`` (``None``, or where it failed:
    ``"video"`` the file is unreadable, too long or too short, ``"caption"`` the model failed on it, ``"ray"``
    a Ray task lost for good),
    ``frames`` (frames the model saw), ``duration``
    (seconds of the file), ``visual_tokens_before`` / ``visual_tokens_after`` (the model's visual tokens
    for the video without / with the recipe), ``timings`` (``decode_s``: reading the file; ``generate_s``:
    the batched ``generate`` call the video was part of; ``batch_size``: videos in that call), ``recipe``,
    ``model``, ``prompt``, ``finished`` (UTC time the record was made).
    """
    return {
        "path": path,
        "caption": caption,
        "error": error,
        "error_stage": error_stage,
        "frames": frames,
        "duration": None if duration is None else round(float(duration), 3),
        "visual_tokens_before": tokens_before,
        "visual_tokens_after": tokens_after,
        "timings": {
            "decode_s": round(decode_s, 4),
            "generate_s": None if generate_s is None else round(generate_s, 4),
            "batch_size": batch_size,
        },
        "recipe": recipe,
        "model": model,
        "prompt": prompt,
        "finished": _now(),
    }


def error_record(item: Decoded, error: str, *, stage: str, recipe: str, model: str, prompt: str) -> dict[str, Any]:
    """The record of a video that failed at ``stage`` (one of :data:`ERROR_STAGES`)."""
    if stage not in ERROR_STAGES:
        raise ValueError(f"stage must be one of {ERROR_STAGES}, got {stage!r}")
    clip = item.clip
    return make_record(
        item.path,
        caption=None,
        error=error,
        error_stage=stage,
        frames=None,
        tokens_before=None,
        tokens_after=None,
        decode_s=item.seconds,
        generate_s=None,
        batch_size=None,
        duration=None if clip is None else clip.duration,
        recipe=recipe,
        model=model,
        prompt=prompt,
    )


class Captioner:
    """A video VLM, loaded once, that turns batches of decoded clips into caption records.

    Args:
        model: Hugging Face id or local folder; ``None`` is the bundled model (:func:`vtr.models.load_model`).
        recipe: a recipe name or YAML path (``vtr recipes``), or ``"none"`` for no reduction.
        keep: budget override for the recipe (int count or float ratio), ``None`` for its default.
        prompt: the instruction given with every video.
        max_new_tokens: caption length cap; ``None``: the model's generation config, else 32.
        dtype, device: where the model runs.

    Raises ``ValueError`` when the model takes no videos (its processor has no video processor) or the recipe
    or budget is invalid, before any video is read.
    """

    def __init__(
        self,
        model: str | None,
        *,
        recipe: str,
        keep: int | float | None = None,
        prompt: str,
        max_new_tokens: int | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        import vtr
        from vtr.models import load_model

        reduce = recipe not in NO_REDUCTION
        if reduce:
            vtr.recipes.build(recipe, **({} if keep is None else {"keep": keep}))  # fail fast, before loading
        elif keep is not None:
            raise ValueError(f"--keep {keep} needs a reduction recipe, got recipe {recipe!r} (no reduction)")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model, self.processor = load_model(model, kind="video", dtype=dtype, device=device)
        self.model_name = model_label(model)
        if getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"model {self.model_name} ({type(self.model).__name__}) does not take videos: its processor has no "
                "video processor; use a video VLM such as Qwen2-VL or LLaVA-OneVision"
            )
        if reduce:
            vtr.wrap(self.model, recipe, processor=self.processor, **({} if keep is None else {"keep": keep}))
        self.recipe_name = recipe_label(recipe, keep)
        self.prompt = prompt
        self.device = device
        gen_cap = getattr(self.model.generation_config, "max_new_tokens", None)
        self.max_new_tokens = max_new_tokens or gen_cap or 32
        cfg = self.model.config
        self._video_token = getattr(cfg, "video_token_id", None)
        if self._video_token is None:
            self._video_token = getattr(cfg, "video_token_index", None)

    def _error(self, item: Decoded, error: str | Exception, stage: str = "caption") -> dict[str, Any]:
        text = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else error
        labels = {"recipe": self.recipe_name, "model": self.model_name, "prompt": self.prompt}
        return error_record(item, text, stage=stage, **labels)

    def caption(self, items: Sequence[Decoded]) -> list[dict[str, Any]]:
        """Records for ``items`` (decoded clips), in order; one ``generate`` call for the whole batch.

        Never raises for a video: a batch that fails is retried video by video, so only the videos that fail on
        their own get an error record; an item that carries a decode error is recorded as such.
        """
        from vtr.video.inputs import usable_frames

        records: list[dict[str, Any] | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            if item.clip is None:
                records[i] = self._error(item, item.error or "no clip", "video")
                continue
            try:
                usable_frames(self.processor, item.clip)  # e.g. 1 frame where the model packs frames in pairs
            except ValueError as exc:
                records[i] = self._error(item, exc, "video")
                continue
            todo.append(i)
        if todo:
            batch = [items[i] for i in todo]
            try:
                done = self._generate(batch)
            except Exception as exc:
                # Retry one by one, so only the videos that also fail alone are recorded as failures.
                done = [self._generate_one(it) for it in batch] if len(batch) > 1 else [self._error(batch[0], exc)]
            for i, rec in zip(todo, done, strict=True):
                records[i] = rec
        return [r for r in records if r is not None]

    def _generate_one(self, item: Decoded) -> dict[str, Any]:
        try:
            return self._generate([item])[0]
        except Exception as exc:
            return self._error(item, exc)

    def _generate(self, items: Sequence[Decoded]) -> list[dict[str, Any]]:
        import torch

        import vtr
        from vtr.video.inputs import usable_frames, video_inputs

        clips = [it.clip for it in items]
        frames = [usable_frames(self.processor, c) for c in clips]
        inputs = video_inputs(self.processor, clips, [self.prompt] * len(clips)).to(self.device)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - t0
        texts = self.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        if vtr.is_wrapped(self.model) and self.model.vtr.report is not None:
            report = self.model.vtr.report
            before = [int(report.original_tokens[i]) for i in range(len(clips))]
            after = [int(report.tokens_out(i)) for i in range(len(clips))]
        else:
            ids = inputs["input_ids"]
            before = [int((ids[i] == self._video_token).sum()) for i in range(len(clips))]
            after = list(before)
        return [
            make_record(
                it.path,
                caption=text.strip(),
                error=None,
                frames=n,
                tokens_before=b,
                tokens_after=a,
                decode_s=it.seconds,
                generate_s=seconds,
                batch_size=len(clips),
                duration=it.clip.duration,
                recipe=self.recipe_name,
                model=self.model_name,
                prompt=self.prompt,
            )
            for it, text, n, b, a in zip(items, texts, frames, before, after, strict=True)
        ]
