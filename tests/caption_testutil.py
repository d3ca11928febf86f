"""Helpers shared by the ``vtr caption`` tests: tiny videos made with PyAV, a saved tiny video VLM, readers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np


def make_video(path: Path, *, frames: int = 12, width: int = 64, height: int = 48, fps: int = 8, seed: int = 0) -> Path:
    """An MPEG-4 clip: a coloured background with a white bar moving right (decodable by decord)."""
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        background = rng.integers(0, 256, 3, dtype=np.uint8)
        for i in range(frames):
            img = np.empty((height, width, 3), np.uint8)
            img[:] = background
            x = (4 * i) % (width - 8)
            img[:, x : x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_video_folder(root: Path, n_good: int = 4) -> dict[str, list[str]]:
    """``n_good`` clips (one in a subfolder, one with 3 frames), an empty file, a corrupt file, a one-frame
    clip (too short for Qwen2-VL, which takes frames in pairs) and a text file.

    Returns ``{"good": [...], "bad": [...]}`` absolute paths (the text file is not a video: not listed).
    """
    good = []
    for i in range(n_good):
        sub = "nested/" if i == 0 else ""
        good.append(str(make_video(root / f"{sub}clip{i}.mp4", frames=3 if i == 1 else 12, seed=i).absolute()))
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = root / "corrupt.mkv"
    corrupt.write_bytes(b"\x1a\x45\xdf\xa3 this is not really a matroska file " * 20)
    single = make_video(root / "single.mp4", frames=1, seed=99)
    (root / "notes.txt").write_text("not a video\n")
    bad = [str(p.absolute()) for p in (corrupt, empty, single)]
    return {"good": sorted(good), "bad": bad}


def save_tiny_video_model(folder: Path) -> Path:
    """Save ``vtr.testing.tiny_qwen2_vl()`` (random weights: valid, meaningless captions) for ``--model``."""
    from vtr.testing import tiny_qwen2_vl

    model, processor = tiny_qwen2_vl()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def read_records(path: Path) -> list[dict]:
    """Every complete line of a caption log, parsed (fails on a malformed line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- stand-in readers
class FakeClip:
    def __init__(self, path: str):
        self.path, self.duration = path, 10.0 * ("long" in path)
        self.frames = np.zeros((2, 8, 8, 3), np.uint8)


def fake_reader(path: str, **kwargs) -> FakeClip:
    """A reader without files: ``...crash...`` segfaults its process, ``...hang...`` never returns,
    ``...bad...`` raises ``ValueError``; anything else gives a 2-frame clip (``...long...``: 10 s long)."""
    if "crash" in path:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "hang" in path:
        time.sleep(600)
    if "bad" in path:
        raise ValueError(f"cannot read {path}")
    return FakeClip(path)


def crashing_reader(path: str, **kwargs):
    """``vtr.video.read_video``, except that a file named ``crash*`` kills the process reading it (SIGSEGV)."""
    from vtr.video.io import read_video

    if Path(path).name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return read_video(path, **kwargs)
