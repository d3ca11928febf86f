"""The demo's figures: baseline-vs-reduced rows, tokens per stage / LLM layer, kept-token panels (no Gradio).

Everything here is a pure function of a :class:`~vtr.report.Report`, the image layouts and measured
:class:`SideResult` values, so it is unit-tested without a browser or a model.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vtr.demos.geometry import ViewInputs, grid_slices, grid_views, unit_slots
from vtr.demos.overlay import draw_tokens, strip
from vtr.report import Report
from vtr.tokens import ImageLayout

__all__ = [
    "FigureRow",
    "Panel",
    "SideResult",
    "comparison_rows",
    "compose",
    "figures_html",
    "kv_cache_bytes",
    "layer_tokens",
    "stage_tokens",
    "token_panels",
    "tokens_plot",
]


@dataclass(frozen=True)
class SideResult:
    """What one side (baseline or reduced) measured.

    Attributes:
        answer: the generated text.
        new_tokens: tokens generated.
        ttft_s: seconds from the ``generate`` call to the first new token (``None``: no token came).
        total_s: seconds of the whole ``generate`` call.
        peak_bytes: peak memory above the level before the call (``None``: not measurable here).
    """

    answer: str
    new_tokens: int
    ttft_s: float | None
    total_s: float
    peak_bytes: int | None


@dataclass(frozen=True)
class FigureRow:
    """One compared figure; ``ratio`` is reduced / baseline.

    ``ratio`` is ``None`` when either value is missing or the baseline is 0, and for rough figures
    (``compare=False``) whose ratio would read as a finding when it is noise.
    """

    key: str
    label: str
    baseline: float | None
    reduced: float | None
    fmt: str = "{:.0f}"
    compare: bool = True

    @property
    def ratio(self) -> float | None:
        if not self.compare or self.baseline is None or self.reduced is None or self.baseline == 0:
            return None
        return self.reduced / self.baseline

    def text(self, value: float | None) -> str:
        return "n/a" if value is None else self.fmt.format(value)


def kv_cache_bytes(text_config: Any, rows_per_layer: Sequence[int], bytes_per_value: int) -> int:
    """Analytic KV-cache size: keys and values of ``rows_per_layer[l]`` rows in each decoder layer ``l``."""
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    if len(rows_per_layer) != text_config.num_hidden_layers:
        raise ValueError(f"{len(rows_per_layer)} row counts for {text_config.num_hidden_layers} decoder layers")
    return int(2 * kv * head_dim * bytes_per_value * sum(rows_per_layer))


def comparison_rows(
    base: SideResult,
    red: SideResult,
    report: Report,
    *,
    memory_label: str,
    memory_exact: bool,
    text_config: Any = None,
    bytes_per_value: int = 4,
    sample: int = 0,
) -> list[FigureRow]:
    """The side-by-side figures of one request: tokens, times, memory, analytic KV cache and FLOPs.

    ``memory_exact=False`` (CPU process RSS) shows the measured values without a ratio. With a decoder
    ``text_config`` the KV cache after prefill is computed from the prompt rows, per LLM layer when the
    report has :func:`layer_tokens`.
    """
    rows = [
        FigureRow(
            "visual_tokens",
            "visual tokens (after the last stage)",
            report.original_tokens[sample],
            report.tokens_out(sample),
        ),
    ]
    full = cut = None
    if len(report.prompt_tokens) > sample:
        full, cut = report.prompt_tokens[sample]
        rows.append(FigureRow("prompt_rows", "LLM prompt rows (text + visual)", full, cut))
    rows += [
        FigureRow("ttft", "time to first token (s)", base.ttft_s, red.ttft_s, "{:.3f}"),
        FigureRow("total", "total generate time (s)", base.total_s, red.total_s, "{:.3f}"),
        FigureRow("new_tokens", "new tokens", base.new_tokens, red.new_tokens),
        FigureRow(
            "peak_memory",
            f"{memory_label} (MB)",
            None if base.peak_bytes is None else base.peak_bytes / 2**20,
            None if red.peak_bytes is None else red.peak_bytes / 2**20,
            "{:.1f}",
            compare=memory_exact,
        ),
    ]
    if text_config is not None and full is not None and cut is not None:
        n_layers = text_config.num_hidden_layers
        layers = layer_tokens(report, sample)
        text_rows = full - report.original_tokens[sample]
        red_rows = [text_rows + n for n in layers] if layers else [cut] * n_layers
        rows.append(
            FigureRow(
                "kv_cache",
                "KV cache after prefill (MB, analytic)",
                kv_cache_bytes(text_config, [full] * n_layers, bytes_per_value) / 2**20,
                kv_cache_bytes(text_config, red_rows, bytes_per_value) / 2**20,
                "{:.3g}",
            )
        )
    if len(report.llm_prefill_flops) > sample:
        f0, f1 = report.llm_prefill_flops[sample]
        rows.append(FigureRow("prefill_gflops", "LLM prefill GFLOPs (analytic)", f0 / 1e9, f1 / 1e9, "{:.4g}"))
    return rows


def stage_tokens(report: Report, sample: int = 0) -> list[tuple[str, int]]:
    """``[(label, visual tokens)]``: the input, then after each operator of ``sample`` in order."""
    out = [("input", int(report.original_tokens[sample]))]
    out += [(f"{r.stage}: {r.operator}", int(r.tokens_out)) for r in report.records if r.sample == sample]
    return out


def layer_tokens(report: Report, sample: int = 0) -> list[int] | None:
    """Visual tokens per LLM layer of ``sample`` when the report has them (recipes that prune inside the LLM)."""
    per_sample = getattr(report, "layer_tokens", None)
    if not per_sample or len(per_sample) <= sample or not per_sample[sample]:
        return None
    return [int(v) for v in per_sample[sample]]


def tokens_plot(stages: Sequence[tuple[str, int]], layers: Sequence[int] | None = None) -> Image.Image:
    """Bar chart of visual tokens per stage (baseline = the input bar) and, when given, a line per LLM layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not stages:
        raise ValueError("tokens_plot needs at least the input stage")
    ncols = 2 if layers else 1
    fig = Figure(figsize=(4.2 * ncols + 0.6, 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, ncols, 1)
    labels = [s[0].replace(": ", "\n") for s in stages]
    counts = [s[1] for s in stages]
    colours = ["#888888"] + ["#1f77b4"] * (len(stages) - 1)
    bars = ax.bar(range(len(stages)), counts, color=colours)
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(stages)), labels, fontsize=8)
    ax.set_ylabel("visual tokens")
    ax.set_title("visual tokens per stage", fontsize=10)
    ax.set_ylim(0, max(counts) * 1.15 + 1)
    if layers:
        ax2 = fig.add_subplot(1, ncols, 2)
        ax2.plot(range(len(layers)), [counts[0]] * len(layers), "--", color="#888888", label="baseline")
        ax2.plot(range(len(layers)), layers, "-o", markersize=3, color="#1f77b4", label="reduced")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("LLM layer")
        ax2.set_ylabel("visual tokens")
        ax2.set_ylim(0, counts[0] * 1.1 + 1)
        ax2.set_title("visual tokens per LLM layer", fontsize=10)
        ax2.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def figures_html(rows: Sequence[FigureRow], stages: Sequence[tuple[str, int]], title: str) -> str:
    """An HTML table of ``rows`` (with ``data-metric``/``data-side`` hooks) and the tokens per stage."""
    esc = html.escape
    out = [f'<div class="vtr-figures"><p class="vtr-title">{esc(title)}</p><table id="figures-table">']
    out.append("<tr><th></th><th>baseline</th><th>reduced</th><th>reduced / baseline</th></tr>")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
        out.append(
            f'<tr data-metric="{r.key}"><td>{esc(r.label)}</td>'
            f'<td data-metric="{r.key}" data-side="baseline">{r.text(r.baseline)}</td>'
            f'<td data-metric="{r.key}" data-side="reduced">{r.text(r.reduced)}</td>'
            f'<td data-metric="{r.key}" data-side="ratio">{ratio}</td></tr>'
        )
    out.append('</table><table id="stages-table"><tr><th>stage</th><th>visual tokens</th></tr>')
    base = stages[0][1] if stages else 0
    for i, (label, n) in enumerate(stages):
        share = f" ({100 * n / base:.1f}%)" if base and i else ""
        out.append(f'<tr data-stage="{i}"><td>{esc(label)}</td><td>{n}{share}</td></tr>')
    out.append("</table></div>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------- panels
@dataclass(frozen=True)
class Panel:
    """One gallery item: an overlay (or a captioned strip of them) and its caption."""

    image: Image.Image
    caption: str


def token_panels(
    report: Report, layouts: Sequence[ImageLayout], picture: str | None, inputs: ViewInputs, sample: int = 0
) -> tuple[list[Panel], list[str]]:
    """One panel per operator and image of ``sample``: its kept tokens drawn on what the model saw.

    Args:
        report: the reduced call's report.
        layouts: the layouts of the images of ``sample`` (as the adapter found them).
        picture: the adapter's ``picture`` fact (selects the token-to-pixel mapping).
        inputs: the media and processor outputs the views are read from.

    Returns:
        ``(panels, notes)``: overlays (a strip with per-grid budgets when an image has several grids:
        video frames, tiles) and sentences about what is not drawn.
    """
    panels: list[Panel] = []
    notes: list[str] = []
    views: dict[int, tuple[list, list, int]] = {}
    records = [r for r in report.records if r.sample == sample]
    if not records:
        notes.append("no operator ran on this input: nothing to draw")
    many = len(layouts) > 1
    for rec in records:
        for im in rec.images:
            layout = layouts[im.image]
            if im.image not in views:
                slices, extra = grid_slices(layout)
                views[im.image] = (slices, grid_views(picture, layout, slices, inputs), extra)
                for v in views[im.image][1]:
                    if v.note and v.note not in notes:
                        notes.append(v.note)
            slices, grid_v, extra = views[im.image]
            slots = unit_slots(layout.n_tokens, im.kept, im.groups)
            sizes = np.bincount(slots[slots >= 0], minlength=len(im.kept))
            merged = (slots >= 0) & (sizes[slots.clip(min=0)] > 1)
            kept = np.asarray(im.kept, dtype=np.int64)
            overlays, captions = [], []
            for s, view in zip(slices, grid_v, strict=True):
                if view.picture is None:
                    continue
                cell = slice(s.start, s.stop)
                overlays.append(draw_tokens(view.picture, s.h, s.w, slots[cell], merged[cell]))
                n_kept = int(((kept >= s.start) & (kept < s.stop)).sum())
                captions.append(f"{view.label}: {n_kept}/{s.h * s.w}")
            if extra:
                n_extra = int((kept >= layout.n_tokens - extra).sum())
                note = f"{extra} newline rows (not drawn): {n_extra} kept after {rec.operator}"
                notes.append(note if not many else f"image {im.image}: {note}")
            if not overlays:
                continue
            image = overlays[0] if len(overlays) == 1 else strip(overlays, captions)
            where = f" · image {im.image}" if many else ""
            caption = f"{rec.stage} · {rec.operator}{where}: {im.tokens_out}/{im.tokens_in} tokens kept"
            if len(overlays) > 1:
                caption += f" ({layout.kind}: kept per {'frame' if layout.kind == 'video' else 'grid'} under each)"
            panels.append(Panel(image, caption))
    return panels, notes


def compose(panels: Sequence[Panel], per_row: int = 2) -> Image.Image | None:
    """All panels in one captioned picture (``None`` when there is none)."""
    if not panels:
        return None
    return strip([p.image for p in panels], [p.caption for p in panels], per_row=per_row)
