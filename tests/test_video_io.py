"""vtr.video: decord reading, frame sampling, errors naming the file, model inputs per video family.

Videos are written on the fly with PyAV. Frame ``i`` of a test video is filled with the grey level
``LEVEL * i`` so decoded frames can be matched to their frame numbers (MPEG-4 is lossy: within a few levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.video import Clip, VideoError, read_video, sample_indices, usable_frames, video_inputs

av = pytest.importorskip("av")

LEVEL = 12


def write_video(
    path: Path,
    frames: int | np.ndarray = 20,
    *,
    fps: int = 10,
    size: tuple[int, int] = (32, 64),
    codec: str = "mpeg4",
    pix_fmt: str = "yuv420p",
    container: str | None = None,
) -> Path:
    """Write a video with PyAV: ``frames`` is a count (grey levels ``LEVEL * i``) or ``[T, H, W, 3]`` uint8.

    ``frames=0`` writes a container with a video stream and no frame. Widths of 16, 24, 48 and 72 pixels
    trip a decord bug (see :func:`vtr.video.read_video`); the default is 64.
    """
    if isinstance(frames, int):
        h, w = size
        frames = np.broadcast_to(
            (LEVEL * np.arange(frames) % 256).astype(np.uint8)[:, None, None, None], (frames, h, w, 3)
        )
    out = av.open(str(path), "w", format=container)
    stream = out.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    if len(frames) == 0:
        out.start_encoding()
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def levels(clip: Clip) -> list[int]:
    """Frame numbers recovered from the grey levels of ``clip``'s frames."""
    return [round(float(f.mean()) / LEVEL) for f in clip.frames]


@pytest.fixture(scope="module")
def clip20(tmp_path_factory) -> Path:
    """20 frames at 10 fps (2 s), 32x64."""
    return write_video(tmp_path_factory.mktemp("v") / "clip20.mp4", 20)


# ------------------------------------------------------------------------------------------------ sampling
def test_uniform_count(clip20):
    clip = read_video(clip20, num_frames=5)
    assert clip.indices.tolist() == [0, 4, 9, 14, 19]  # int(linspace(0, 19, 5))
    assert levels(clip) == [0, 4, 9, 14, 19]
    assert clip.frames.shape == (5, 32, 64, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_allclose(clip.timestamps, [0.0, 0.4, 0.9, 1.4, 1.9], atol=1e-6)
    assert clip.indices.dtype == np.int64 and clip.timestamps.dtype == np.float64
    assert clip.fps == pytest.approx(10.0) and clip.duration == pytest.approx(2.0)
    assert clip.path == str(clip20) and len(clip) == 5


def test_target_fps_and_cap(clip20):
    clip = read_video(clip20, num_frames=None, fps=2)
    assert clip.indices.tolist() == [0, 5, 10, 15]  # times 0, 0.5, 1.0, 1.5 s
    assert levels(clip) == [0, 5, 10, 15]
    assert clip.sampled_fps == pytest.approx(2.0)
    capped = read_video(clip20, num_frames=None, fps=10, max_frames=4)
    assert capped.indices.tolist() == [0, 6, 12, 19]
    # A rate above the file's gives every frame once.
    assert read_video(clip20, num_frames=None, fps=50).indices.tolist() == list(range(20))


def test_window_and_short_videos(clip20):
    clip = read_video(clip20, num_frames=3, start=0.5, end=1.5)
    assert clip.indices.tolist() == [5, 9, 14]
    assert levels(clip) == [5, 9, 14]
    assert read_video(clip20, num_frames=3, start=1.0).indices.tolist() == [10, 14, 19]
    # More frames than the window holds: every frame once, never repeated.
    assert read_video(clip20, num_frames=64, start=1.5).indices.tolist() == [15, 16, 17, 18, 19]
    assert read_video(clip20, num_frames=8, max_frames=2).indices.tolist() == [0, 19]
    assert read_video(clip20, num_frames=4, end=100.0).indices.tolist() == [0, 6, 12, 19]  # end past the file


def test_decodes_only_the_sampled_frames(clip20, monkeypatch):
    """``read_video`` asks decord for the sampled frames only (one ``get_batch``), never for the whole video."""
    import decord

    calls: list[list[int]] = []
    real = decord.VideoReader

    class Spy(real):
        def get_batch(self, indices):
            calls.append(list(indices))
            return super().get_batch(indices)

        def __getitem__(self, idx):
            raise AssertionError("read_video must not index frames one by one")

    monkeypatch.setattr(decord, "VideoReader", Spy)
    clip = read_video(clip20, num_frames=3)
    assert calls == [[0, 9, 19]] and len(clip) == 3


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    rate=st.floats(1.0, 60.0),
    num=st.one_of(st.none(), st.integers(1, 400)),
    fps=st.floats(0.1, 100.0),
    cap=st.one_of(st.none(), st.integers(1, 50)),
    lo=st.floats(0.0, 1.0),
    hi=st.floats(0.0, 1.0),
)
def test_sample_indices_properties(n, rate, num, fps, cap, lo, hi):
    """Ascending distinct frames inside the window; uniform counts are exact when the window is long enough."""
    starts = np.arange(n) / rate
    duration = n / rate
    start, end = lo * duration, lo * duration + (hi + 1e-3) * duration
    tol = 0.1 / rate if n > 1 else 0.1  # a tenth of a frame: decord's float32 times
    in_window = np.nonzero((starts >= start - tol) & (starts < end - tol))[0]
    kwargs = dict(num_frames=num, fps=None if num else fps, max_frames=cap, start=start, end=end)
    if len(in_window) == 0:
        with pytest.raises(ValueError, match="no frame starts in"):
            sample_indices(starts, **kwargs)
        return
    idx = sample_indices(starts, **kwargs)
    assert len(idx) >= 1 and idx.dtype == np.int64
    assert bool((np.diff(idx) > 0).all())
    assert set(idx.tolist()) <= set(in_window.tolist())
    if cap is not None:
        assert len(idx) <= cap
    if num is not None:
        assert len(idx) == min(num, cap or num, len(in_window))
        assert idx[0] == in_window[0] and (len(idx) == 1 or idx[-1] == in_window[-1])


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found: .*nope.mp4"):
        read_video(tmp_path / "nope.mp4")


def _check(path: Path, message: str) -> None:
    with pytest.raises(VideoError, match=message) as info:
        read_video(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_directory(tmp_path):
    _check(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.mp4"
    f.touch()
    _check(f, r"empty \(0 bytes\)")


def test_corrupt_file(tmp_path):
    f = tmp_path / "corrupt.mp4"
    f.write_bytes(b"this is not a video" * 50)
    _check(f, "cannot read video")


def test_truncated_file(tmp_path, clip20):
    data = clip20.read_bytes()
    f = tmp_path / "truncated.mp4"
    f.write_bytes(data[: len(data) // 2])  # the MP4 index (moov) is written last: it is gone
    _check(f, "no decodable video frames")


def test_zero_frames(tmp_path):
    _check(write_video(tmp_path / "zero.mp4", 0), "no decodable video frames")


def test_audio_only(tmp_path):
    f = tmp_path / "audio.mp4"
    out = av.open(str(f), "w")
    stream = out.add_stream("aac", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for packet in [*stream.encode(frame), *stream.encode()]:
        out.mux(packet)
    out.close()
    _check(f, "no decodable video frames")


def test_unsupported_codec(tmp_path):
    """AV1: PyAV can encode it, the FFmpeg inside decord 0.6 cannot decode it."""
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("PyAV was built without an AV1 encoder")
    _check(write_video(tmp_path / "av1.mp4", 4, codec="libsvtav1", size=(64, 64)), "unsupported codec")


def test_decord_width_limitation(tmp_path):
    _check(write_video(tmp_path / "w48.mp4", 4, size=(32, 48)), "decord cannot return frames of this width")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_frames=4, fps=2.0), "exactly one of num_frames"),
        (dict(num_frames=None), "exactly one of num_frames"),
        (dict(num_frames=0), "num_frames must be an int >= 1, got 0"),
        (dict(num_frames=2.5), "num_frames must be an int >= 1, got 2.5"),
        (dict(num_frames=None, fps=-1.0), "fps must be a finite number > 0, got -1.0"),
        (dict(num_frames=None, fps=float("nan")), "fps must be a finite number > 0"),
        (dict(max_frames=0), "max_frames must be an int >= 1, got 0"),
        (dict(start=-1.0), "start must be a finite number of seconds >= 0, got -1.0"),
        (dict(start=1.0, end=1.0), "end must be after start"),
    ],
)
def test_bad_arguments(clip20, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        read_video(clip20, **kwargs)
    # Arguments are checked before the file is touched.
    with pytest.raises(ValueError, match=message):
        read_video(tmp_path / "missing.mp4", **kwargs)


def test_window_past_the_end(clip20):
    with pytest.raises(ValueError, match=r"no frame starts in \[start=5, end=inf\) s; the last frame starts at 1.9"):
        read_video(clip20, start=5.0)


# ------------------------------------------------------------------------------------------------ model inputs
def _processor(family: str):
    from vtr import testing as vt

    return {"qwen2_vl": vt.tiny_qwen2_vl, "qwen2_5_vl": vt.tiny_qwen2_5_vl, "llava_onevision": vt.tiny_llava_onevision}[
        family
    ]()[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Clip]:
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    a = write_video(d / "a.mp4", (rng.random((12, 32, 32, 3)) * 255).astype(np.uint8), fps=6)
    b = write_video(d / "b.mp4", (rng.random((10, 32, 64, 3)) * 255).astype(np.uint8), fps=5)
    return {
        "a4": read_video(a, num_frames=4),
        "a5": read_video(a, num_frames=5),
        "a1": read_video(a, num_frames=1),
        "b4": read_video(b, num_frames=4),
        "b6": read_video(b, num_frames=6),
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_video_inputs_batch(family, clips):
    """One left-padded sample per (clip, prompt); the video rows match the frames given."""
    processor = _processor(family)
    pair = [clips["a4"], clips["b4"]]
    inputs = video_inputs(
        processor, pair, ["what colour is the circle ?", "how many squares are there in the picture ?"]
    )
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # left padding
    tok = processor.tokenizer
    video_id = tok.convert_tokens_to_ids(tok.video_token)
    rows = (inputs["input_ids"] == video_id).sum(-1).tolist()
    if family.startswith("qwen"):
        grid = inputs["video_grid_thw"].tolist()
        assert [g[0] for g in grid] == [2, 2]  # 4 frames = 2 temporal steps of 2 frames
        assert rows == [t * h * w // 4 for t, h, w in grid]
    else:
        assert tuple(inputs["pixel_values_videos"].shape[:2]) == (2, 4)
        assert rows[0] == rows[1] == 4 * 16 + 1  # 4 frames of 4x4 pooled tokens + one newline
    if family == "qwen2_5_vl":
        # 4 of 12 frames at 6 fps: one frame every 11/3/6 s; 2 frames per step.
        step = float(np.median(np.diff(clips["a4"].timestamps)))
        assert inputs["second_per_grid_ts"][0] == pytest.approx(2 * step, rel=0.02)


def test_qwen_odd_frame_counts(clips):
    processor = _processor("qwen2_vl")
    assert usable_frames(processor, clips["a5"]) == 4
    inputs = video_inputs(processor, [clips["a5"]], ["what ?"])
    assert inputs["video_grid_thw"][0, 0] == 2
    with pytest.raises(VideoError, match=r"packs 2 frames per temporal step but the clip has only 1 frame") as info:
        video_inputs(processor, [clips["a1"]], ["what ?"])
    assert info.value.path == clips["a1"].path
    # LLaVA-OneVision takes any count, one frame included.
    assert usable_frames(_processor("llava_onevision"), clips["a5"]) == 5


def test_video_inputs_errors(clips):
    processor = _processor("llava_onevision")
    with pytest.raises(ValueError, match="same frame count; got \\[4, 6\\]"):
        video_inputs(processor, [clips["a4"], clips["b6"]], ["a ?", "b ?"])
    with pytest.raises(ValueError, match="one prompt per clip, got 2 clips and 1 prompts"):
        video_inputs(processor, [clips["a4"], clips["b4"]], ["a ?"])
    with pytest.raises(ValueError, match="at least one clip"):
        video_inputs(processor, [], [])
    from vtr.testing import tiny_llava

    with pytest.raises(ValueError, match="has no video processor"):
        video_inputs(tiny_llava()[1], [clips["a4"]], ["a ?"])
    # Qwen takes different frame counts in one call.
    qwen = _processor("qwen2_vl")
    grid = video_inputs(qwen, [clips["a4"], clips["b6"]], ["a ?", "b ?"])["video_grid_thw"]
    assert grid[:, 0].tolist() == [2, 3]


# ------------------------------------------------------------------------------------------------ vtr run --video
@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory) -> Path:
    """A saved tiny random Qwen2-VL (``--model`` takes its folder)."""
    from vtr.testing import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl()
    path = tmp_path_factory.mktemp("qwen") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip24(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return write_video(
        tmp_path_factory.mktemp("run") / "clip.mp4", (rng.random((24, 32, 64, 3)) * 255).astype(np.uint8), fps=8
    )


def _run_video(capsys, *args: str) -> tuple[int, str, str]:
    from vtr.cli import main

    code = main(["run", "--prompt", "what colour is the circle ?", "--max-new-tokens", "2", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _row(out: str, name: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(name))
    return line[len(name) :].split()


@pytest.mark.parametrize(
    ("recipe", "frames", "base", "reduced", "visual"),
    [
        ("storm", ["--frames", "8"], "32 32 32 32", "32 0 0 0", ["128", "32", "(25.0%)"]),
        ("configs/storm_spool2.yaml", ["--fps", "2"], "32 32 32", "8 8 8", ["96", "24", "(25.0%)"]),
        ("storm_tsample", ["--frames", "7"], "32 32 32", "32 0 32", ["96", "64", "(66.7%)"]),
    ],
)
def test_run_video(capsys, saved_qwen, clip24, tmp_path, recipe, frames, base, reduced, visual):
    """Frames used and visual tokens per token frame, baseline and reduced (Qwen: 2 frames per token frame)."""
    if recipe == "storm_tsample":
        recipe = str(tmp_path / "tsample.yaml")
        Path(recipe).write_text("ops:\n  - op: TemporalSample\n    stride: 2\n")
    code, out, err = _run_video(capsys, "--video", str(clip24), "--model", str(saved_qwen), "--recipe", recipe, *frames)
    assert code == 0, err
    n_tok = len(base.split())
    assert f"video: {clip24}: frames used: {2 * n_tok} of" in out and f"{n_tok} token frames" in out
    assert _row(out, "tokens per frame") == base.split() + reduced.split()
    assert _row(out, "visual tokens") == visual
    if "--frames" in frames and frames[1] == "7":
        assert "frames used: 6 of 7 sampled" in out  # Qwen drops the odd last frame


def test_run_video_errors(capsys, saved_qwen, clip24, tmp_path):
    code, _, err = _run_video(capsys, "--video", str(tmp_path / "missing.mp4"))
    assert code == 2 and "video file not found" in err
    code, _, err = _run_video(capsys, "--video", str(clip24), "--frames", "4", "--fps", "2")
    assert code == 2 and "exactly one of num_frames" in err
    code, _, err = _run_video(capsys, "--image", str(clip24), "--frames", "4")
    assert code == 2 and "--frames and --fps apply to --video" in err
    # The adapter gives QuoTA the question, frames, processor and model: the default scorer then needs the
    # answer letters, which this word-level tokenizer lacks (a clear one-line error).
    code, _, err = _run_video(capsys, "--video", str(clip24), "--model", str(saved_qwen), "--recipe", "quota")
    assert code == 2 and "the tokenizer has no token for the answer 'B'" in err


# ------------------------------------------------------------------------------------------------ vtr bench video-speed
def test_bench_video_speed_runs_on_tiny_settings(tmp_path, capsys):
    """The benchmark runs end to end (figures are not checked: timings here are noise)."""
    import json

    from vtr.cli import main

    out = tmp_path / "out"
    argv = ["bench", "video-speed", "--llm", "tiny", "--vision", "tiny", "--frames", "8", "--size", "56"]
    argv += ["--decode-seconds", "1", "--decode-frames", "4", "--repeats", "1", "--quota-scorer", "constant"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["decoding"]["sampled_frames"] == 4 and result["decoding"]["file_frames"] == 30
    runs = result["prefill"]["runs"]
    assert runs["baseline"]["visual_tokens"] == 16  # 4 temporal steps of a 2x2 merged grid
    assert runs["storm"]["visual_tokens"] == 4 and runs["quota"]["visual_tokens"] == 4
    assert (out / "prefill.png").is_file() and "| quota | 4 |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ bundled clips
ASSET_VIDEOS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "assets" / "videos").glob("*") if p.suffix in (".mp4", ".mkv")
)


@pytest.mark.skipif(not ASSET_VIDEOS, reason="no sample clips in assets/videos/ yet (they come with the bundled model)")
def test_run_bundled_clip_offline(capsys):
    """``vtr run --video assets/videos/<clip> --recipe storm`` works offline with the bundled video model."""
    code, out, err = _run_video(capsys, "--video", str(ASSET_VIDEOS[0]), "--recipe", "storm")
    assert code == 0, err
    base, reduced = _row(out, "visual tokens")[:2]
    assert int(reduced) < int(base)
    assert "tokens per frame" in out and "frames used" in out
