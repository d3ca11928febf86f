"""The ``vtr`` command: ``run``, ``caption``, ``recipes``, ``demo``, ``bench``.

Every command defaults to the bundled tiny model in ``assets/`` so it works offline; ``--model`` takes a
Hugging Face id or a local path for real use.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _keep(text: str) -> int | float:
    """Parse ``--keep``: an int count (``64``) or a float ratio (``0.25``)."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--keep must be an int >= 1 (count) or a float in (0, 1] (ratio), got {text!r}"
            ) from None
    from vtr.ops.base import validate_keep

    try:
        return validate_keep(value, "--keep")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtr", description="Training-free visual token reduction for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt about an image or a video, baseline and reduced side by side")
    media = run.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="path to an image file")
    media.add_argument(
        "--video",
        help="path to a video file (for video models: Qwen2-VL/2.5-VL, LLaVA-OneVision; default the bundled one)",
    )
    run.add_argument("--prompt", required=True, help="question or instruction about the image or video")
    run.add_argument("--frames", type=int, default=None, help="video: frames sampled uniformly (default 8)")
    run.add_argument("--fps", type=float, default=None, help="video: sample at this rate instead of --frames")
    run.add_argument(
        "--model", default=None, help="Hugging Face id or local path (default: the bundled tiny image or video model)"
    )
    run.add_argument("--recipe", default="divprune", help="recipe name or YAML path (see `vtr recipes`)")
    run.add_argument("--keep", type=_keep, default=None, help="budget: int count or float ratio (recipe default)")
    run.add_argument("--positions", choices=("original", "compact"), default=None, help="position ids of kept tokens")
    run.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: the model's generation config, else 16)",
    )
    run.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    run.add_argument("--device", default="cpu")

    sub.add_parser("recipes", help="list the named recipes")

    demo = sub.add_parser("demo", help="Gradio app: baseline vs reduced answers side by side, kept tokens drawn")
    from vtr.demos import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    _add_caption_parser(sub)

    bench = sub.add_parser("bench", help="quality and speed benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from vtr.bench import BENCHMARKS

    for name in BENCHMARKS:
        mod = _bench_module(name)
        p = bench_sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod else name)
        if mod is not None:
            mod.add_arguments(p)
    return parser


def _add_caption_parser(sub) -> None:
    cap = sub.add_parser(
        "caption",
        help="caption many videos into JSONL (resumes after a crash, records failures)",
        description="Caption every video of INPUT into OUT.jsonl, one record per video. A rerun skips videos "
        "already recorded, so an interrupted run resumes where it stopped. Flags override --config.",
    )
    cap.add_argument("input", help="a folder (searched recursively), a glob, a text file of paths, or a video")
    cap.add_argument("--out", help="the JSONL file (created, or resumed when it exists)")
    cap.add_argument("--config", help="YAML run config (keys: the long option names, e.g. configs/runs/caption.yaml)")
    cap.add_argument("--recipe", help="recipe name or YAML path, or 'none' for no reduction (default divprune)")
    cap.add_argument("--keep", type=_keep, help="budget: int count or float ratio (recipe default)")
    cap.add_argument("--prompt", help="instruction given with every video")
    cap.add_argument("--frames", type=int, help="frames sampled uniformly per video (default 8)")
    cap.add_argument("--fps", type=float, help="sample at this rate instead of a fixed count")
    cap.add_argument("--max-frames", type=int, help="cap on the frames of one video")
    cap.add_argument("--model", help="Hugging Face id or local path (default: the bundled video model)")
    cap.add_argument("--batch-size", type=int, help="videos per generate call (default 4)")
    cap.add_argument("--workers", type=int, help="decode worker processes, local engine (default 2)")
    cap.add_argument("--retry-errors", action="store_true", default=None, help="redo videos recorded with an error")
    cap.add_argument("--max-new-tokens", type=int, help="caption length cap (default: model's config, else 32)")
    cap.add_argument("--max-duration", type=float, help="record videos longer than this (s) as errors")
    cap.add_argument("--dtype", help="torch dtype of the model (default float32)")
    cap.add_argument("--device", help="auto (default), cpu, cuda, ...")
    cap.add_argument("--engine", choices=("local", "ray"), help="local (default) or ray (Ray Data, extra 'ray')")
    cap.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    cap.add_argument("--num-actors", type=int, help="model replicas with --engine ray (default 1)")
    cap.add_argument("--num-gpus-per-actor", type=float, help="GPUs per model actor (default: 1 if any, else 0)")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_caption(args: argparse.Namespace) -> int:
    from vtr.video.caption import CONFIG_KEYS, CaptionConfig, caption_videos, load_config

    values = load_config(args.config) if args.config else {}
    for key in CONFIG_KEYS:  # flags given on the command line override the config file
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if not values.get("out"):
        raise ValueError("vtr caption needs --out OUT.jsonl (or 'out:' in --config)")
    try:
        summary = caption_videos(CaptionConfig(**values), progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:  # the model failed on every video it tried, a decode worker cannot start, ...
        print(f"vtr: error: {exc}", file=sys.stderr)
        return 1
    return 130 if summary.interrupted else 0


def _bench_module(name: str):
    module = f"vtr.bench.{name.replace('-', '_')}"  # `vtr bench video-speed` lives in vtr/bench/video_speed.py
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def _cmd_recipes() -> int:
    from vtr import recipes

    width = max(len(n) for n in recipes.names())
    for name, desc in recipes.describe().items():
        ops = ", ".join(repr(op) for op in recipes.get(name))
        print(f"{name:<{width}}  {desc}\n{'':<{width}}  {ops}")
    return 0


def _load_model_or_explain(load_model, args: argparse.Namespace, kind: str = "image"):
    """``load_model`` whose failures to find the model are one ``FileNotFoundError`` line, not a traceback;
    ``kind`` picks the bundled model when ``--model`` is not given."""
    name = args.model
    if name is not None and _looks_like_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"--model {name}: no such folder (give a saved Hugging Face model folder or a hub id)")
    try:
        return load_model(name, kind=kind, dtype=args.dtype, device=args.device)
    except FileNotFoundError:  # already one line (e.g. a folder without config.json)
        raise
    except OSError as exc:  # transformers: neither a local folder nor resolvable on the hub (offline, typo, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"--model {name}: cannot load it as a local folder or from the hub: {first}") from exc


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, relative with a dot or ``~``, or deeper."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    import vtr
    from vtr.media import load_image
    from vtr.models import load_model

    clip = None
    if args.video is not None:
        from vtr.video import read_video

        frames = args.frames if args.frames is not None or args.fps is not None else 8
        clip = read_video(args.video, num_frames=frames, fps=args.fps)
    elif args.frames is not None or args.fps is not None:
        raise ValueError("--frames and --fps apply to --video")
    else:
        image = load_image(args.image)
    overrides = {}
    if args.keep is not None:
        overrides["keep"] = args.keep
    if args.positions is not None:
        overrides["positions"] = args.positions
    vtr.recipes.build(args.recipe, **overrides)  # validate before loading the model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI prints a table; weight-loading bars only clutter it
    model, processor = _load_model_or_explain(load_model, args, kind="image" if clip is None else "video")
    if clip is not None:
        from vtr.video import video_inputs

        inputs = video_inputs(processor, [clip], [args.prompt]).to(args.device)
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt").to(args.device)
    prompt_len = inputs["input_ids"].shape[1]
    max_new = args.max_new_tokens or getattr(model.generation_config, "max_new_tokens", None) or 16

    def answer() -> tuple[str, float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            t1 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
            t2 = time.perf_counter()
        return processor.decode(out[0, prompt_len:], skip_special_tokens=True).strip(), t1 - t0, t2 - t1

    with torch.inference_mode():  # warm-up, so neither side pays first-call costs
        model(**inputs, use_cache=False, logits_to_keep=1)
    base_answer, base_prefill, base_gen = answer()
    with vtr.reduced(model, args.recipe, processor=processor, **overrides):
        red_answer, red_prefill, red_gen = answer()
        report = model.vtr.report
        recipe_desc = ", ".join(repr(op) for op in model.vtr.recipe.ops)
        layout = report.layouts[0]
    n_before, n_after = report.original_tokens[0], report.tokens_out(0)
    rows = [
        ("", "baseline", f"reduced ({args.recipe})"),
        ("answer", base_answer or "(empty)", red_answer or "(empty)"),
        ("visual tokens", str(n_before), f"{n_after} ({100 * n_after / max(n_before, 1):.1f}%)"),
        ("prefill ms", f"{base_prefill * 1e3:.1f}", f"{red_prefill * 1e3:.1f}"),
        ("generate ms", f"{base_gen * 1e3:.1f}", f"{red_gen * 1e3:.1f}"),
    ]
    video_line = ""
    if clip is not None:
        video_line, video_rows = _video_rows(clip, processor, layout, report)
        rows += video_rows
    if report.llm_prefill_flops:
        f0, f1 = report.llm_prefill_flops[0]
        rows.append(("LLM prefill GFLOPs", f"{f0 / 1e9:.3f}", f"{f1 / 1e9:.3f} ({100 * f1 / f0:.1f}%)"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    bundled = f"bundled {'image' if clip is None else 'video'} model"
    print(f"model: {args.model or bundled}   recipe: {recipe_desc}")
    print(f"prompt: {args.prompt}")
    if video_line:
        print(f"video: {args.video}: {video_line}")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    print(f"operator time: {report.operator_seconds * 1e3:.2f} ms")
    return 0


def _video_rows(clip, processor, layout, report) -> tuple[str, list[tuple[str, str, str]]]:
    """``vtr run --video``: a line on the frames used, and the visual tokens per token frame (baseline, reduced)."""
    from vtr.video import tokens_per_frame, usable_frames

    i, im = next((i, im) for i, im in enumerate(layout) if im.kind == "video")
    used = usable_frames(processor, clip)
    line = (
        f"frames used: {used} of {len(clip)} sampled ({clip.timestamps[0]:.2f}-{clip.timestamps[used - 1]:.2f} s of "
        f"{clip.duration:.2f} s), {len(im.grids)} token frames"
    )
    base = " ".join(str(t * h * w) for t, h, w in im.grids)
    reduced = " ".join(map(str, tokens_per_frame(im, report.kept(0, i))))
    return line, [("tokens per frame", base, reduced)]


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from vtr.demos.side_by_side import DemoEngine, serve
    except ModuleNotFoundError as exc:
        if exc.name == "gradio":
            print("vtr demo needs Gradio: pip install 'vtr[demo]'", file=sys.stderr)
            return 2
        raise
    engine = DemoEngine.load(args.model, dtype=args.dtype, device=args.device)  # errors: one line, exit 2
    serve(engine, host=args.host, port=args.port, share=args.share)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vtr`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "recipes":
            return _cmd_recipes()
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "caption":
            return _cmd_caption(args)
        if args.command == "bench":
            mod = _bench_module(args.bench)
            if mod is None:
                print(f"vtr bench {args.bench}: not available in this installation", file=sys.stderr)
                return 2
            return int(mod.run(args) or 0)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"vtr: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
