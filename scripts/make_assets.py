"""Write the bundled sample clips from the synthetic video test split (:mod:`vtr.bench.synthqa`).

``assets/videos/*.mp4`` — short test-split clips (16 frames of 112x112 at 8 fps, H.264 via PyAV), named after
the question type they were drawn for. decord (``vtr.video``) reads them back. The items are fixed below;
rerunning rewrites the same content.

    python scripts/make_assets.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vtr.bench import synthqa

ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: file stem -> video test-split index
SAMPLE_CLIPS = {"few_frames": 0, "when": 2, "exist": 1, "describe": 71}
FPS = 8


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS, crf: int = 20) -> None:
    """``[T, H, W, 3]`` uint8 RGB frames (H, W even) as an H.264 MP4 (yuv420p)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS), help="assets folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for stem, index in SAMPLE_CLIPS.items():
        s = synthqa.sample("test", index, task="video")
        write_mp4(s.frames, videos / f"{stem}.mp4")
        print(f"{videos / f'{stem}.mp4'}: {s.question} -> {s.answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
