"""Captioning throughput of ``vtr caption``: videos/min per engine setup and recipe, in one run.

Setups: the local engine with 1 and 2 decode worker processes, and Ray Data with 1 and 2 model actors (on a
local Ray instance over all CPUs). Recipes: the baseline (no reduction), ``storm`` and ``quota`` at the same
budget (``--keep``, default 0.25); a recipe that is not registered, or that cannot run on the model, is
skipped with a note. Every (setup, recipe) pair captions the same videos into a fresh log.

Two rates per run: end to end (model loading and worker start-up included: what a short job sees) and
steady state (after the first batch is out: what a long job converges to). Figures are only comparable
within one run on an otherwise idle machine; the command warns when the load average says otherwise.

    vtr bench caption-speed                                     # 24 synthetic clips, bundled model
    vtr bench caption-speed --videos 4 --setups local-w1 --recipes none,storm    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["SETUPS", "add_arguments", "make_clips", "run"]

#: name -> (engine, decode workers, model actors)
SETUPS: dict[str, tuple[str, int, int]] = {
    "local-w1": ("local", 1, 1),
    "local-w2": ("local", 2, 1),
    "ray-a1": ("ray", 1, 1),
    "ray-a2": ("ray", 1, 2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="folder of videos to caption (default: synthetic clips made here)")
    parser.add_argument("--videos", type=int, default=24, help="synthetic clips to make (default 24)")
    parser.add_argument("--size", default="224x224", help="synthetic clip size WxH (default 224x224)")
    parser.add_argument("--clip-frames", type=int, default=48, help="frames per synthetic clip (default 48)")
    parser.add_argument("--model", help="Hugging Face id or local path (default: bundled model)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video (default 8)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", type=float, default=0.25, help="budget of the reduced recipes (default 0.25)")
    parser.add_argument("--recipes", default="none,storm,quota", help="comma-separated; 'none' is the baseline")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {list(SETUPS)}")
    parser.add_argument("--out", default="bench_out/caption_speed", help="folder for results.json/.md/.png")


def make_clips(
    folder: Path, n: int, *, size: tuple[int, int] = (224, 224), frames: int = 48, fps: int = 12
) -> list[Path]:
    """``n`` seeded MPEG-4 clips of moving coloured squares (needs PyAV: ``pip install av``)."""
    try:
        import av
    except ImportError as exc:
        raise ImportError("making synthetic clips needs PyAV: pip install av (or pass --input FOLDER)") from exc
    import numpy as np

    width, height = size
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = folder / f"clip{i:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            colour = rng.integers(0, 256, 3, dtype=np.uint8)
            side = max(8, min(width, height) // 4)
            x0, y0 = rng.integers(0, width - side), rng.integers(0, height - side)
            vx, vy = rng.integers(-6, 7, 2)
            for t in range(frames):
                img = np.full((height, width, 3), 32, np.uint8)
                x = int(np.clip(x0 + vx * t, 0, width - side))
                y = int(np.clip(y0 + vy * t, 0, height - side))
                img[y : y + side, x : x + side] = colour
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def _parse_list(text: str, allowed: list[str] | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} needs at least one name")
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {bad}; choose from {allowed}")
    return items


def _one_run(config, n_videos: int) -> dict[str, Any]:
    """Caption with ``config``; returns rates and mean visual tokens, or ``{"error": ...}``."""
    from vtr.video.caption import caption_videos

    stamps: list[float] = []
    tokens: list[tuple[int, int]] = []

    def on_record(record: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        if record["error"] is None:
            tokens.append((record["visual_tokens_before"], record["visual_tokens_after"]))

    t0 = time.perf_counter()
    try:
        summary = caption_videos(config, progress=False, log=lambda _: None, on_record=on_record)
    except Exception as exc:  # a recipe that cannot run on this model: note it, go on with the others
        reason = getattr(exc, "first_error", None) or f"{type(exc).__name__}: {exc}"
        return {"error": reason.splitlines()[0][:160]}
    total = time.perf_counter() - t0
    # Steady state: from the end of the first burst of records (the first batch) to the last record.
    first = [s for s in stamps if s - stamps[0] < 0.05] if stamps else []
    span = stamps[-1] - first[-1] if stamps else 0.0
    steady = 60.0 * (len(stamps) - len(first)) / span if span > 0 else None
    return {
        "videos": summary.processed,
        "failed": summary.failed,
        "seconds": round(total, 2),
        "videos_per_min": round(60.0 * summary.processed / total, 2),
        "steady_videos_per_min": None if steady is None else round(steady, 2),
        "visual_tokens_before": round(sum(b for b, _ in tokens) / len(tokens), 1) if tokens else None,
        "visual_tokens_after": round(sum(a for _, a in tokens) / len(tokens), 1) if tokens else None,
        "expected_videos": n_videos,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setup | recipe | videos/min (end to end) | videos/min (steady) | vs baseline (steady) | visual tokens |",
        "|---|---|---|---|---|---|",
    ]
    base = {r["setup"]: r for r in rows if r["recipe"] == "none" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['recipe']} | skipped: {r['error']} | | | |")
            continue
        b = base.get(r["setup"])
        ratio = ""
        if b and b["steady_videos_per_min"] and r["steady_videos_per_min"]:
            ratio = f"{r['steady_videos_per_min'] / b['steady_videos_per_min']:.2f}x"
        steady = "" if r["steady_videos_per_min"] is None else f"{r['steady_videos_per_min']:.1f}"
        tok = ""
        if r["visual_tokens_after"] is not None:
            tok = f"{r['visual_tokens_after']:g} / {r['visual_tokens_before']:g}"
        lines.append(f"| {r['setup']} | {r['recipe']} | {r['videos_per_min']:.1f} | {steady} | {ratio} | {tok} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r["steady_videos_per_min"]]
    if not ok:
        return
    setups = list(dict.fromkeys(r["setup"] for r in ok))
    recipes = list(dict.fromkeys(r["recipe"] for r in ok))
    width = 0.8 / len(recipes)
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(setups), 3.6))
    for j, recipe in enumerate(recipes):
        xs, ys = [], []
        for i, setup in enumerate(setups):
            match = [r for r in ok if r["setup"] == setup and r["recipe"] == recipe]
            if match:
                xs.append(i + (j - (len(recipes) - 1) / 2) * width)
                ys.append(match[0]["steady_videos_per_min"])
        ax.bar(xs, ys, width, label="baseline" if recipe == "none" else recipe)
    ax.set_xticks(range(len(setups)), setups)
    ax.set_ylabel("videos / min (steady state)")
    ax.set_title("vtr caption throughput")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from vtr import recipes as registry
    from vtr.video.caption import CaptionConfig, find_videos

    setups = _parse_list(args.setups, list(SETUPS), "setups")
    wanted = _parse_list(args.recipes, None, "recipes")
    notes: list[str] = []
    recipes = []
    for name in wanted:
        if name == "none" or name in registry.names() or Path(name).is_file():  # a name or a YAML recipe
            recipes.append(name)
        else:
            notes.append(f"recipe {name!r} is neither registered in this installation nor a YAML file: skipped")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 1.5:
        notes.append(f"load average {load:.1f} when starting: other work competes for the CPU, figures are noisy")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vtr-caption-speed-"))
    ray_started = False
    try:
        if args.input:
            folder = args.input
        else:
            w, h = (int(v) for v in args.size.lower().split("x"))
            make_clips(work / "videos", args.videos, size=(w, h), frames=args.clip_frames)
            folder = str(work / "videos")
        n_videos = len(find_videos(folder))
        if any(SETUPS[s][0] == "ray" for s in setups):
            import ray

            if not ray.is_initialized():  # one local instance for every Ray setup: start-up is not measured
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
                ray_started = True
        rows = []
        for setup in setups:
            engine, workers, actors = SETUPS[setup]
            for recipe in recipes:
                config = CaptionConfig(
                    input=folder,
                    out=str(work / "logs" / f"{setup}-{recipe}.jsonl"),
                    model=args.model,
                    recipe=recipe,
                    keep=None if recipe == "none" else args.keep,
                    frames=args.frames,
                    batch_size=args.batch_size,
                    workers=workers,
                    engine=engine,
                    num_actors=actors,
                )
                print(f"caption-speed: {setup} / {recipe} ...", flush=True)
                rows.append({"setup": setup, "recipe": recipe, **_one_run(config, n_videos)})
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "command": "vtr bench caption-speed "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k in ("videos", "size", "clip_frames", "frames", "batch_size", "keep", "recipes", "setups") and v
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "model": args.model or "bundled",
        "videos": n_videos,
        "notes": notes,
    }
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = _table(rows)
    (out_dir / "results.md").write_text(table + "".join(f"\n* {n}" for n in notes) + "\n")
    _plot(rows, out_dir / "results.png")
    print(table)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out_dir}/results.json, results.md, results.png")
    return 0
