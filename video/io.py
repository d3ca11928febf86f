"""Reading videos with decord: open a file, sample frames, decode only the sampled ones.

:func:`read_video` returns a :class:`Clip` (frames ``[T, H, W, 3]`` uint8 RGB plus their timestamps and
frame numbers). Sampling is either a uniform count (``num_frames``) or a target rate (``fps``), optionally
capped by ``max_frames`` and restricted to ``[start, end)`` seconds. Only the sampled frames are decoded
(``VideoReader.get_batch`` seeks to them), so a long video never sits in memory as a whole.

Every failure names the file: :class:`FileNotFoundError` for a missing path, :class:`VideoError` (a
``ValueError``) for a directory, an empty, corrupt or truncated file, a file without video frames, a codec
the FFmpeg inside decord cannot decode, and ``ValueError`` for bad sampling arguments.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Clip", "VideoError", "read_video", "sample_indices"]

# FFmpeg error codes that decord reports in its messages (FFERRTAG(0xF8, 'D','E','C') and (0xF8, 'S','T','R')).
_AVERROR_DECODER_NOT_FOUND = -1128613112
_AVERROR_STREAM_NOT_FOUND = -1381258232


class VideoError(ValueError):
    """A video file that cannot be read. The message names the file and what is wrong; ``.path`` holds it."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{message}: {self.path}")


@dataclass
class Clip:
    """Frames sampled from one video file.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB frames, in temporal order.
        timestamps: ``[T]`` float64, presentation time of each frame in seconds.
        indices: ``[T]`` int64, frame number of each frame in the file (ascending, distinct).
        fps: the file's average frame rate.
        duration: duration of the whole file in seconds.
        path: the file the frames come from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    fps: float
    duration: float
    path: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sample: 1 / the median spacing of the timestamps (``fps`` for one frame)."""
        if len(self) < 2:
            return float(self.fps)
        step = float(np.median(np.diff(self.timestamps)))
        return 1.0 / step if step > 0 else float(self.fps)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _window(start, end) -> tuple[float, float]:
    t0 = 0.0 if start is None else _seconds(start, "start")
    t1 = math.inf if end is None else _seconds(end, "end")
    if t1 <= t0:
        raise ValueError(f"end must be after start, got start={start!r}, end={end!r}")
    return t0, t1


def sample_indices(
    starts: np.ndarray,
    *,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """Frame numbers to decode, given the start time of every frame of the file (``starts`` ``[F]``, seconds).

    The window holds the frames whose start time lies in ``[start, end)``. ``num_frames`` picks
    ``int(linspace(first, last, n))`` over the window (``n = min(num_frames, max_frames, frames in
    window)``: a short window gives fewer, never repeated, frames). ``fps`` picks, for each time
    ``start + k / fps`` in the window, the frame showing at that time (duplicates removed), then keeps at
    most ``max_frames`` of them uniformly. Returns ``[T]`` int64, ascending, distinct.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError(
            "give exactly one of num_frames (a uniform frame count) or fps (a target rate), "
            f"got num_frames={num_frames!r}, fps={fps!r}; with fps pass num_frames=None"
        )
    if num_frames is not None:
        num_frames = _positive_int(num_frames, "num_frames")
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0
    ):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    if max_frames is not None:
        max_frames = _positive_int(max_frames, "max_frames")
    t0, t1 = _window(start, end)
    starts = np.asarray(starts, dtype=np.float64)
    # decord reports float32 times: compare with a tenth of a frame of slack (float32 is exact to ~2 ms at 10 h).
    tol = 0.1 * (float(np.median(np.diff(starts))) if len(starts) > 1 else 1.0)
    window = np.nonzero((starts >= t0 - tol) & (starts < t1 - tol))[0]
    if len(window) == 0:
        last = float(starts[-1]) if len(starts) else 0.0
        raise ValueError(f"no frame starts in [start={t0:g}, end={t1:g}) s; the last frame starts at {last:g} s")
    first, final = int(window[0]), int(window[-1])
    if num_frames is not None:
        n = min(num_frames, max_frames or num_frames, len(window))
        return np.linspace(first, final, n).astype(np.int64)
    assert fps is not None
    span_end = min(t1, float(starts[final]) + tol)
    times = t0 + np.arange(math.floor((span_end - t0) * fps) + 1) / fps
    # The frame showing at time t is the last one that starts at or before t.
    idx = np.searchsorted(starts, times + tol, side="right") - 1
    idx = np.unique(np.clip(idx, first, final)).astype(np.int64)
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.linspace(0, len(idx) - 1, max_frames).astype(np.int64)]
    return idx


def _open(path: Path):
    """A decord ``VideoReader`` for ``path``, with decord's failures turned into :class:`VideoError`."""
    try:
        import decord
    except ImportError as exc:  # pragma: no cover - decord is a core dependency on x86_64
        raise ImportError("reading videos needs decord: pip install decord") from exc
    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as exc:  # RuntimeError, or decord's DECORDError (a plain Exception subclass)
        raise _decord_error(path, exc) from exc


def _decord_error(path: Path, exc: Exception) -> VideoError:
    text = str(exc)
    if str(_AVERROR_DECODER_NOT_FOUND) in text:
        return VideoError(path, "unsupported codec (the FFmpeg inside decord has no decoder for this video stream)")
    if str(_AVERROR_STREAM_NOT_FOUND) in text or "cannot find video stream" in text:
        return VideoError(
            path, "no decodable video frames (no video stream, a video stream with zero frames, or a truncated file)"
        )
    return VideoError(path, "cannot read video (corrupt file or not a video container FFmpeg can open)")


def read_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> Clip:
    """Sample and decode frames of one video file.

    Args:
        path: the video file.
        num_frames: uniform count ``int(linspace(first, last, n))`` over the window; ``None`` with ``fps``.
            A window with fewer frames gives all of them.
        fps: target rate in frames per second instead of a count (pass ``num_frames=None``).
        max_frames: upper bound on the number of frames (uniform subsample of the ``fps`` selection).
        start, end: the window in seconds, ``[start, end)``; default the whole file (``end`` beyond the
            duration means "to the end").

    Returns:
        a :class:`Clip` with ``T >= 1`` frames ``[T, H, W, 3]`` uint8.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoError: ``path`` is a directory, empty, corrupt or truncated, has no video frames, or uses a codec
            decord cannot decode.
        ValueError: bad sampling arguments (the message names them).
    """
    p = Path(path)
    # Validate the arguments first: a bad call fails the same way whatever the file.
    sample_indices(np.zeros(1), num_frames=num_frames, fps=fps, max_frames=max_frames)
    _window(start, end)
    if not p.exists():
        raise FileNotFoundError(f"video file not found: {p}")
    if p.is_dir():
        raise VideoError(p, "video path is a directory, not a file")
    if p.stat().st_size == 0:
        raise VideoError(p, "video file is empty (0 bytes)")
    reader = _open(p)
    total = len(reader)
    if total == 0:
        raise VideoError(p, "video has zero frames")
    avg_fps = float(reader.get_avg_fps())
    stamps = np.asarray(reader.get_frame_timestamp(np.arange(total)), dtype=np.float64).reshape(total, 2)
    starts = stamps[:, 0]
    if bool((np.diff(starts) < 0).any()):
        # Presentation times out of order (broken timestamps): sample by frame number at the average rate.
        starts = np.arange(total) / max(avg_fps, 1e-9)
    duration = float(stamps[-1, 1]) if stamps[-1, 1] > 0 else total / max(avg_fps, 1e-9)
    idx = sample_indices(starts, num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
    try:
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except Exception as exc:  # decord raises DECORDError (a plain Exception subclass) on decode failures
        if "size must exactly match" in str(exc):
            # decord 0.6 miscomputes the row stride of a few small frame widths (e.g. 16, 24, 48, 72 pixels).
            raise VideoError(
                p,
                "decord cannot return frames of this width (a decord 0.6 limitation for a few small widths such "
                "as 16, 24, 48 or 72 pixels); re-encode the video at another width",
            ) from exc
        raise _decord_error(p, exc) from exc
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(idx):
        raise VideoError(p, f"decoder returned frames of shape {frames.shape}, expected [{len(idx)}, H, W, 3]")
    return Clip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=starts[idx].copy(),
        indices=idx,
        fps=avg_fps,
        duration=duration,
        path=str(p),
    )
