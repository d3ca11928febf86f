"""Batch video captioning (``vtr caption``): many videos in, one JSONL record per video out.

:func:`caption_videos` is the whole job:

1. find the videos (:func:`find_videos`: a folder, searched recursively for video extensions; a glob; a text
   file of paths; or one video file) and check ``out`` is writable — a bad INPUT or OUT fails here, before
   any work;
2. take the log's lock, read the records already in ``out`` (:mod:`vtr.video.caption_log`), compact the log
   when needed (a torn last line from a crash, duplicates, error records that ``retry_errors`` redoes);
3. caption every video that has no record, with the local engine (:mod:`vtr.video.caption_local`, default)
   or Ray Data (:mod:`vtr.video.caption_ray`), appending each record durably the moment it is ready;
4. print a summary: captioned, failed, skipped, throughput.

Because a record is appended only for a video without one, and only by the run that holds the lock, a run
killed at any point and rerun ends with exactly one record per video.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_PROMPT",
    "ENGINES",
    "VIDEO_EXTENSIONS",
    "CaptionConfig",
    "CaptionSetupError",
    "ModelFailedError",
    "Summary",
    "caption_videos",
    "find_videos",
    "load_config",
]

#: File extensions taken as videos when INPUT is a folder (case-insensitive).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts")
ENGINES = ("local", "ray")
DEFAULT_PROMPT = "Describe this video."


class CaptionSetupError(ValueError):
    """A bad INPUT, OUT or configuration, found before any video is read."""


def _pos_int(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def _pos_float(value: Any, name: str, *, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}{' or null' if allow_none else ''}, got {value!r}")


@dataclass
class CaptionConfig:
    """Everything one ``vtr caption`` run needs; the fields are also the keys of a YAML run config.

    Attributes:
        input: a folder (recursive), a glob, a text file of paths (one a line, ``#`` comments, relative paths
            relative to the file's folder) or one video file.
        out: the JSONL log; created if missing, resumed if present.
        recipe: recipe name or YAML path (``vtr recipes``), or ``"none"`` for no reduction (the baseline).
        keep: budget override (int count or float ratio in (0, 1]); ``None``: the recipe's default.
        prompt: the instruction given with every video.
        frames: frames sampled uniformly per video (when ``fps`` is not set).
        fps: sample at this many frames per second instead (at most ``max_frames``).
        max_frames: cap on the frames of one video.
        model: Hugging Face id or local folder; ``None``: the bundled model.
        batch_size: videos per ``generate`` call (per actor with Ray).
        workers: decode worker processes (local engine); 0 decodes in the main process, without overlap.
        retry_errors: redo videos recorded with an error (their error record is replaced).
        max_new_tokens: caption length cap; ``None``: the model's generation config, else 32.
        max_duration: videos longer than this many seconds are recorded as errors ("too long").
        decode_timeout: seconds one video may take to decode before it is recorded as an error.
        dtype, device: where the model runs; device ``"auto"`` is CUDA when available, else CPU.
        engine: ``"local"`` or ``"ray"`` (Ray Data; needs the ``ray`` extra).
        ray_address: Ray cluster to join (``"auto"``, ``"ray://host:10001"``); ``None`` starts a local one.
        num_actors: model replicas (Ray engine).
        num_gpus_per_actor: GPUs per model actor; ``None``: 1 when the cluster has GPUs, else 0.
        num_cpus_per_actor: CPUs per model actor; ``None``: 1, lowered so the actors leave one CPU to decoding.
    """

    input: str
    out: str
    recipe: str = "divprune"
    keep: int | float | None = None
    prompt: str = DEFAULT_PROMPT
    frames: int = 8
    fps: float | None = None
    max_frames: int | None = None
    model: str | None = None
    batch_size: int = 4
    workers: int = 2
    retry_errors: bool = False
    max_new_tokens: int | None = None
    max_duration: float | None = None
    decode_timeout: float | None = 300.0
    dtype: str = "float32"
    device: str = "auto"
    engine: str = "local"
    ray_address: str | None = None
    num_actors: int = 1
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "out", "recipe", "prompt", "dtype", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.keep is not None:
            from vtr.ops.base import validate_keep

            self.keep = validate_keep(self.keep, "keep")
        _pos_int(self.frames, "frames")
        _pos_float(self.fps, "fps")
        _pos_int(self.max_frames, "max_frames", allow_none=True)
        _pos_int(self.batch_size, "batch_size")
        _pos_int(self.workers, "workers", minimum=0)
        _pos_int(self.max_new_tokens, "max_new_tokens", allow_none=True)
        _pos_float(self.max_duration, "max_duration")
        _pos_float(self.decode_timeout, "decode_timeout")
        _pos_int(self.num_actors, "num_actors")
        _pos_float(self.num_gpus_per_actor, "num_gpus_per_actor", allow_zero=True)
        _pos_float(self.num_cpus_per_actor, "num_cpus_per_actor")
        if not isinstance(self.retry_errors, bool):
            raise ValueError(f"retry_errors must be true or false, got {self.retry_errors!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a Hugging Face id or a local path, got {self.model!r}")

    def read_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vtr.video.io.read_video`` for this config's frame sampling."""
        if self.fps is not None:
            return {"num_frames": None, "fps": self.fps, "max_frames": self.max_frames}
        return {"num_frames": self.frames, "fps": None, "max_frames": self.max_frames}

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


#: Keys a YAML run config may hold.
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(CaptionConfig))


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML run config (a mapping of :class:`CaptionConfig` fields; ``-`` in keys reads as ``_``).

    Unknown keys raise ``ValueError`` listing the allowed ones; values are validated when the config is built.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption config not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a caption config must hold a mapping, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {unknown}; allowed keys: {list(CONFIG_KEYS)}")
    return data


# ------------------------------------------------------------------------------------------------ INPUT
def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _from_list_file(p: Path) -> list[str]:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CaptionSetupError(
            f"INPUT {p} is neither a video (extensions {', '.join(VIDEO_EXTENSIONS)}) nor a UTF-8 text file of paths"
        ) from None
    except OSError as exc:
        raise CaptionSetupError(f"cannot read the list file {p}: {exc.strerror or exc}") from None
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line).expanduser()
            paths.append(str(q if q.is_absolute() else p.parent / q))
    if not paths:
        raise CaptionSetupError(f"the list file {p} names no videos (blank lines and # comments only)")
    return paths


def find_videos(spec: str) -> list[str]:
    """The videos INPUT names, as absolute paths without duplicates.

    * a folder: every file below it with a video extension (:data:`VIDEO_EXTENSIONS`), sorted;
    * a glob (``*``, ``?``, ``[``; ``**`` recurses): the matching files, sorted;
    * a file with a video extension: that video;
    * any other file: a UTF-8 list of paths, one a line, in that order (blank lines and ``#`` comments
      skipped; relative paths are relative to the list file's folder). Missing files in a list are not an
      error here: each is recorded as a failed video, like an unreadable one.

    Raises:
        CaptionSetupError: nothing matches, the folder holds no video, or the list file cannot be read.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*") if f.is_file() and _is_video(f))
        if not found:
            raise CaptionSetupError(
                f"no videos in folder {spec} (searched recursively for {', '.join(VIDEO_EXTENSIONS)})"
            )
    elif p.is_file():
        found = [str(p)] if _is_video(p) else _from_list_file(p)
    elif any(ch in spec for ch in "*?["):
        found = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
        if not found:
            raise CaptionSetupError(f"the glob {spec!r} matches no files")
    elif p.exists():
        raise CaptionSetupError(f"INPUT {spec} is neither a folder, a file nor a glob")
    else:
        raise CaptionSetupError(f"INPUT not found: {spec} (give a folder, a glob, a list file or a video)")
    return list(dict.fromkeys(os.path.abspath(f) for f in found))


# ------------------------------------------------------------------------------------------------ OUT
def check_output(out: str) -> Path:
    """Create ``out``'s folder if needed and check the log and its folder are writable; returns its path."""
    p = Path(out).expanduser()
    if p.is_dir():
        raise CaptionSetupError(f"--out {out} is a folder; give a .jsonl file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "ab"):
            pass
        probe = p.parent / f".{p.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")  # compaction writes a temporary file next to the log
        probe.unlink()
    except OSError as exc:
        raise CaptionSetupError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    return p.absolute()


# ------------------------------------------------------------------------------------------------ run
@dataclass
class Summary:
    """What one run did. ``captioned``/``failed``: records written by this run; ``skipped``: videos that
    already had a record; ``seconds``: wall time of the captioning part (model load included)."""

    total: int
    skipped: int
    captioned: int = 0
    failed: int = 0
    seconds: float = 0.0
    out: str = ""
    interrupted: bool = False
    stopped: str | None = None  # the error that stopped the run early

    @property
    def processed(self) -> int:
        return self.captioned + self.failed

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = f"{self.processed} videos in {self.seconds:.1f} s ({self.videos_per_minute:.1f} videos/min)"
        if self.interrupted:
            head = "interrupted (rerun the same command to resume)"
        elif self.stopped:
            head = f"stopped by an error ({self.stopped})"
        else:
            head = "done"
        return (
            f"vtr caption {head}: {self.captioned} captioned, {self.failed} failed, {self.skipped} skipped "
            f"(already in {self.out}); {rate}"
        )


def _default_reader() -> Callable[..., Any]:
    from vtr.video.io import read_video

    return read_video


def caption_videos(
    config: CaptionConfig,
    *,
    reader: Callable[..., Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> Summary:
    """Caption every video of ``config.input`` that ``config.out`` has no record of (see the module doc).

    Args:
        config: the run.
        reader: ``path, **read_kwargs -> Clip``; default :func:`vtr.video.io.read_video`. It must be a
            module-level function (it is sent to decode worker processes).
        progress: show a tqdm bar (videos/s, ETA) on stderr.
        log: where notes and the summary line go (default: stderr).
        on_record: called with each record once it is on disk (e.g. to stream results or time them).

    Returns:
        the :class:`Summary` (also printed).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if config.recipe not in ("none", "baseline"):
        from vtr import recipes

        recipes.build(config.recipe, **({} if config.keep is None else {"keep": config.keep}))
    if config.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise CaptionSetupError('--engine ray needs Ray Data: pip install "vtr[ray]"')
    videos = find_videos(config.input)
    out = check_output(config.out)
    from vtr.video.caption_log import RecordWriter, read_log

    try:
        writer = RecordWriter(out)
    except OSError as exc:
        raise CaptionSetupError(f"cannot lock --out {out}: {exc.strerror or exc}") from None
    with writer:
        state = read_log(out)
        records = state.records
        retried = 0
        if config.retry_errors:
            kept = {p: r for p, r in records.items() if r.get("error") is None}
            retried = len(records) - len(kept)
            records = kept
        if state.needs_compaction or retried:
            writer.rewrite(records.values())
            notes = []
            if state.torn_bytes:
                notes.append(f"dropped a torn last line ({state.torn_bytes} bytes, from an interrupted run)")
            if state.duplicates:
                notes.append(f"removed {state.duplicates} superseded duplicate record(s)")
            if retried:
                notes.append(f"removed {retried} error record(s) to retry")
            say(f"vtr caption: compacted {out}: {'; '.join(notes)}")
        todo = [v for v in videos if v not in records]
        summary = Summary(total=len(videos), skipped=len(videos) - len(todo), out=str(out))
        try:
            if todo:
                _run_engine(config, todo, writer, summary, reader or _default_reader(), progress, on_record)
        finally:
            say(summary.line())  # also when interrupted: what is on disk and how to resume
    return summary


class ModelFailedError(RuntimeError):
    """The model failed on the first videos of a run without captioning any: a broken model or recipe.

    Those videos are not recorded (recording them would make every rerun skip them); fix the cause and rerun.
    ``first_error`` holds the error of the first of them.
    """

    first_error: str = ""


#: Model-stage failures, before any success, that stop a run (see :class:`ModelFailedError`).
ABORT_AFTER_MODEL_FAILURES = 3


class _Recorder:
    """Writes the records an engine emits, counts them, drives the progress bar, and enforces the rules:
    never two records for one video; no record for model-stage failures until the model has captioned a
    video (a recipe or model that fails on everything must stop the run, not fill the log with failures)."""

    def __init__(self, todo: list[str], writer, summary: Summary, bar, on_record=None):
        self.pending, self.writer, self.summary, self.bar = set(todo), writer, summary, bar
        self.on_record = on_record
        self.held: list[dict[str, Any]] = []  # model-stage failures while no video has been captioned yet

    def __call__(self, record: dict[str, Any]) -> None:
        path = record["path"]
        if path not in self.pending:  # an engine must never record a video twice; refuse rather than duplicate
            raise RuntimeError(f"engine produced a second record for {path}")
        self.pending.discard(path)
        self.bar.update(1)
        if record.get("error_stage") == "caption" and self.summary.captioned == 0:
            self.held.append(record)
            if len(self.held) >= ABORT_AFTER_MODEL_FAILURES:
                self.abort()
            return
        self._write(record)
        if record.get("error") is None:
            for held in self.held:  # the model works: those failures belong to their videos
                self._write(held)
            self.held = []

    def _write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if self.on_record is not None:
            self.on_record(record)
        if record.get("error") is None:
            self.summary.captioned += 1
        else:
            self.summary.failed += 1
            self.bar.set_postfix(failed=self.summary.failed, refresh=False)

    def abort(self) -> None:
        first = self.held[0]
        exc = ModelFailedError(
            f"the model failed on the first {len(self.held)} video(s) it tried and captioned none, so they were not "
            f"recorded; first error ({first['path']}): {first['error']}"
        )
        exc.first_error = first["error"]
        raise exc


def _run_engine(config, todo, writer, summary: Summary, reader, progress: bool, on_record=None) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="video", desc="caption", disable=not progress, dynamic_ncols=True)
    emit = _Recorder(todo, writer, summary, bar, on_record)
    t0 = time.perf_counter()
    try:
        if config.engine == "ray":
            from vtr.video.caption_ray import run_ray

            run_ray(config, todo, emit, reader=reader)
        else:
            from vtr.video.caption_local import run_local

            run_local(config, todo, emit, reader=reader)
        if emit.held:
            emit.abort()
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    except Exception as exc:
        summary.stopped = type(exc).__name__
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        bar.close()
