"""Gradio side-by-side demo: one model answers baseline and reduced, kept tokens drawn, live figures.

Launch with ``vtr demo`` (the bundled tiny model, fully offline) or ``vtr demo --model <id or path>``;
``python -m vtr.demos.side_by_side`` takes the same options. The page needs no internet: system fonts,
no analytics, no CDN (Gradio's frontend is served by the app itself).

One loaded model serves both sides (:class:`vtr.demos.engine.DemoEngine`, scoped ``vtr.reduced``), and
the model-using event has a concurrency limit of 1, so requests queue: concurrent users never see each
other's results and never find the model wrapped by someone else's recipe.
"""

from __future__ import annotations

import os

# Before Gradio is imported: no telemetry and no version check (both would reach the internet).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from vtr import recipes
from vtr.demos.engine import DemoEngine
from vtr.demos.figures import (
    comparison_rows,
    compose,
    figures_html,
    layer_tokens,
    stage_tokens,
    token_panels,
    tokens_plot,
)
from vtr.demos.inputs import (
    BUDGET_MODES,
    IMAGE_TYPES,
    VIDEO_TYPES,
    DemoError,
    UploadLimits,
    check_media,
    make_request,
)
from vtr.models import assets_dir

__all__ = ["build_app", "default_examples", "launch", "main", "media_outputs", "run_outputs", "serve", "theme"]

#: Example prompts per media kind (the bundled models answer these).
EXAMPLE_PROMPTS = {"image": "What colour is the circle?", "video": "Describe the video."}

CSS = """
#status p { margin: 0.2em 0; }
.vtr-error { color: #b00020; font-weight: 600; }
.vtr-figures table { border-collapse: collapse; margin: 0.4em 0 0.8em 0; font-size: 0.92em; }
.vtr-figures th, .vtr-figures td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
.vtr-figures td:first-child { text-align: left; }
.vtr-title { font-weight: 600; margin: 0.2em 0; }
"""


def theme() -> gr.themes.Base:
    """A theme with system fonts only (Gradio's default theme is local too, but never a Google font here)."""
    return gr.themes.Base(
        primary_hue="blue",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def default_examples(root: Path | None = None, *, videos: bool = True) -> list[list[str]]:
    """``[path, prompt]`` rows for the images in ``assets/`` and (``videos=True``) the clips in ``assets/videos/``."""
    root = assets_dir() if root is None else root
    rows = [[str(p), EXAMPLE_PROMPTS["image"]] for p in sorted(root.glob("*")) if p.suffix.lower() in IMAGE_TYPES]
    clips = root / "videos"
    if videos and clips.is_dir():
        rows += [[str(p), EXAMPLE_PROMPTS["video"]] for p in sorted(clips.iterdir()) if p.suffix.lower() in VIDEO_TYPES]
    return rows


def _status(text: str, error: bool = False) -> str:
    return f'<span class="vtr-error">Error: {text}</span>' if error else text


def media_outputs(engine: DemoEngine, limits: UploadLimits, path: str | None) -> tuple[Any, Any, Any]:
    """``(file, preview, status)`` after an upload: show it, or drop it and say why (the message stays)."""
    if not path:
        return gr.skip(), None, gr.skip()
    try:
        kind = check_media(engine, path, limits)
        if kind == "video":
            from vtr.video import read_video

            clip = read_video(path, num_frames=1)
            text = f"Video ready: {Path(path).name}, {clip.duration:.1f} s at {clip.fps:.1f} fps."
            return gr.skip(), clip.frames[0], text
        return gr.skip(), path, f"Image ready: {Path(path).name}."
    except DemoError as exc:
        return None, None, _status(str(exc), error=True)


def run_outputs(
    engine: DemoEngine,
    limits: UploadLimits,
    path: str | None,
    text: str | None,
    recipe_name: str | None,
    mode: str,
    value: float | None,
    n_new: float | None,
    n_frames: float | None,
) -> Iterator[tuple]:
    """The run event: ``(status, baseline answer, reduced answer, figures, overlay, plot, notes)`` per step.

    Streams both answers, then the figures. Any error ends in an error status, never in a dead server.
    """
    try:
        req = make_request(engine, path, text, recipe_name, mode, value, n_new, n_frames, limits)
    except DemoError as exc:
        yield (_status(str(exc), error=True), "", "", "", None, None, "")
        return
    budget = ", ".join(f"{k}={v!r}" for k, v in req.overrides.items()) or "recipe default"
    title = f"“{req.prompt}” — {req.recipe} ({budget}) on {Path(req.path).name}"
    skip = gr.skip()
    try:
        for up in engine.run(req):
            if up.phase != "done":
                where = "baseline" if up.phase == "baseline" else f"reduced ({req.recipe})"
                first = up.phase == "baseline" and not up.base_text
                clear = (None, None, "") if first else (skip, skip, skip)
                yield (f"Generating the {where} answer…", up.base_text, up.red_text, "" if first else skip, *clear)
                continue
            report = up.report
            rows = comparison_rows(
                up.base,
                up.red,
                report,
                memory_label=up.memory_label,
                memory_exact=up.memory_exact,
                text_config=engine.text_config,
                bytes_per_value=engine.bytes_per_value,
            )
            stages = stage_tokens(report)
            panels, notes = [], ["no layout found: overlays unavailable"]
            if up.layouts is not None:
                panels, notes = token_panels(report, up.layouts, engine.picture, up.views)
            yield (
                f"Done: {up.recipe_text}.",
                up.base_text or "(empty answer)",
                up.red_text or "(empty answer)",
                figures_html(rows, stages, title),
                compose(panels),
                tokens_plot(stages, layer_tokens(report)),
                "\n".join(f"* {n}" for n in notes),
            )
    except Exception as exc:  # shown in the page; the server keeps serving
        traceback.print_exc()
        yield (_status(f"{type(exc).__name__}: {exc}", error=True), skip, skip, skip, skip, skip, skip)


def build_app(
    engine: DemoEngine, *, limits: UploadLimits | None = None, examples: Sequence[Sequence[str]] | None = None
) -> gr.Blocks:
    """The Blocks app around ``engine`` (not launched; see :func:`launch`)."""
    limits = limits or UploadLimits()
    if examples is None:
        examples = default_examples(videos=engine.supports_video)
    examples = [list(e) for e in examples]
    names = recipes.names()
    described = recipes.describe()
    video_note = "images and videos" if engine.supports_video else "images (this model takes no videos)"

    with gr.Blocks(title="vtr: baseline vs reduced", analytics_enabled=False) as app:
        gr.Markdown(
            f"## vtr — visual token reduction, side by side\n"
            f"Model: **{engine.name}** ({engine.family} family), one instance serving both sides; it takes "
            f"{video_note}. Timings are single runs on this machine; FLOPs are analytic."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                media = gr.File(
                    label=f"Image or video (images ≤ {limits.image_mb:g} MB, videos ≤ {limits.video_mb:g} MB)",
                    file_types=list(IMAGE_TYPES + VIDEO_TYPES),
                    type="filepath",
                    elem_id="media",
                )
                preview = gr.Image(label="Input", interactive=False, elem_id="preview")
                prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPTS["image"], lines=2, elem_id="prompt")
                if examples:
                    gr.Examples(examples=examples, inputs=[media, prompt], label="Examples", elem_id="examples")
                recipe = gr.Dropdown(
                    choices=[(f"{n} — {described[n]}" if described[n] else n, n) for n in names],
                    value="divprune" if "divprune" in names else names[0],
                    label="Recipe",
                    elem_id="recipe",
                )
                with gr.Row():
                    budget_mode = gr.Radio(list(BUDGET_MODES), value="ratio", label="Budget", elem_id="budget-mode")
                    budget_value = gr.Number(
                        value=0.1, label="keep: ratio in (0, 1] or token count", elem_id="budget-value"
                    )
                with gr.Accordion("Advanced", open=False):
                    max_new = gr.Slider(
                        1,
                        limits.max_new_tokens,
                        value=engine.default_max_new_tokens,
                        step=1,
                        label="max new tokens",
                        elem_id="max-new-tokens",
                    )
                    frames = gr.Slider(
                        1,
                        limits.max_frames,
                        value=min(8, limits.max_frames),
                        step=1,
                        label="frames sampled from a video",
                        elem_id="frames",
                    )
                run = gr.Button("Run baseline and reduced", variant="primary", elem_id="run")
                status = gr.Markdown("Pick an example or upload an image.", elem_id="status")
            with gr.Column(scale=2, min_width=480):
                with gr.Row():
                    base_answer = gr.Textbox(
                        label="Baseline answer", lines=3, interactive=False, elem_id="baseline-answer"
                    )
                    red_answer = gr.Textbox(
                        label="Reduced answer", lines=3, interactive=False, elem_id="reduced-answer"
                    )
                figures = gr.HTML(elem_id="figures")
                overlay = gr.Image(
                    label="Kept tokens: dropped dimmed, kept outlined, merged tinted by group",
                    interactive=False,
                    format="png",
                    elem_id="overlay",
                )
                notes = gr.Markdown(elem_id="notes")
                plot = gr.Image(label="Visual tokens", interactive=False, elem_id="tokens-plot")

        outputs = [status, base_answer, red_answer, figures, overlay, plot, notes]

        def on_media(path: str | None) -> tuple[Any, Any, Any]:
            return media_outputs(engine, limits, path)

        def on_run(*values: Any) -> Iterator[tuple]:
            yield from run_outputs(engine, limits, *values)

        media.change(on_media, media, [media, preview, status], concurrency_limit=4, concurrency_id="uploads")
        run.click(
            on_run,
            [media, prompt, recipe, budget_mode, budget_value, max_new, frames],
            outputs,
            concurrency_limit=1,
            concurrency_id="model",
            show_progress="minimal",
        )
    return app


def launch(
    app: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    limits: UploadLimits | None = None,
    block: bool = True,
    quiet: bool = False,
):
    """Queue (one model request at a time) and serve ``app``; returns Gradio's ``(app, local_url, share_url)``."""
    limits = limits or UploadLimits()
    app.queue(default_concurrency_limit=1, max_size=64)
    # Gradio's own cap is the largest per-kind limit; check_upload gives the per-kind message.
    cap = int(max(limits.image_mb, limits.video_mb) * 2**20) + 1
    return app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=cap,
        ssr_mode=False,
        show_error=True,
        quiet=quiet,
        theme=theme(),
        css=CSS,
        allowed_paths=[str(assets_dir())],
        footer_links=[],
    )


def serve(engine: DemoEngine, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Warm ``engine`` up and serve the demo until interrupted (what ``vtr demo`` runs)."""
    engine.warmup()
    launch(build_app(engine), host=host, port=port, share=share)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vtr.demos.side_by_side [--model ...] [--host ...] [--port ...] [--share]``."""
    from vtr.demos import add_arguments

    parser = argparse.ArgumentParser(prog="python -m vtr.demos.side_by_side", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        engine = DemoEngine.load(args.model, dtype=args.dtype, device=args.device)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(engine, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
