"""Quality vs visual tokens kept, per recipe, on the synthetic tasks (``vtr bench quality --task ...``).

Each task has its instrument (a bundled tiny trained model and the generator it was trained on):

* ``image``    — visual QA on :mod:`vtr.bench.synthqa_v1` scenes with the bundled image model
  (``assets/tiny-vqa-llava``). Accuracy is the argmax over the one-word answers of the next-token logits
  after ``ASSISTANT:`` (one batched, left-padded prefill per batch, no decoding), which equals the greedy
  first word whenever the model answers with an answer word.
* ``describe`` — image descriptions (:mod:`vtr.bench.synthqa`) with the bundled video model
  (``assets/tiny-synth-vl``, a Qwen2-VL that reads images too): object-level precision / recall / F1 of
  greedy descriptions generated up to the end token, each parsed into (colour, shape, 3x3 location) items
  and matched against the scene (micro-averaged over the split).
* ``video``    — clip QA (``few_frames``, ``exist``, ``when``: accuracy as for images) and video
  descriptions (F1 over colour and shape) with the bundled video model, through Qwen2-VL's own video input
  (each frame group is a frame of ``scope="frame"``). Recipes with a ``keep`` run with a per-frame budget
  (``scope="frame"``) and a whole-clip budget (``scope="image"``).

No reduction is the reference. A recipe name is swept over ``--keep`` (matched budgets: every recipe keeps
the same share of tokens); recipes without a token budget (FastV's ratio, MustDrop's threshold presets,
STORM's pooling factors) run at their own settings (:data:`DEFAULT_SETTINGS`, or ``--recipes
name:field=value,...``). Every run is placed by the visual tokens averaged over the LLM's layers, which is
the LLM-input count for recipes that act before the LLM. A recipe that cannot act on the model is listed as
skipped with its error.

Writes ``quality_<task>.md`` (tables), ``quality_<task>.json`` (everything, incl. per-type scores) and
``quality_<task>.png`` (score vs mean visual tokens kept; the reference as a horizontal line) into ``--out``.

    vtr bench quality --task image
    vtr bench quality --task video --recipes divprune random storm --keep 0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vtr.bench import synthqa, synthqa_v1

__all__ = [
    "DEFAULT_KEEPS",
    "DEFAULT_SETTINGS",
    "TASKS",
    "VIDEO_SCOPES",
    "add_arguments",
    "answer_token_ids",
    "evaluate",
    "generator",
    "main",
    "prepare_batches",
    "run",
]

TASKS = ("image", "describe", "video")
DEFAULT_KEEPS = (0.5, 0.25, 0.11)
#: Recipes set by their own parameters instead of ``keep``, and the settings the default run measures
#: (MustDrop's presets target 192/128/64 of 576 layer-averaged tokens, its window merge a similarity
#: threshold; STORM pools ``k`` frame groups in time and ``p x p`` cells in space).
DEFAULT_SETTINGS: dict[str, tuple[str, ...]] = {
    "mustdrop": ("preset=192", "preset=128", "preset=64"),
    "mustdrop_vision": ("threshold=0.8", "threshold=0.6", "threshold=0.4"),
    "storm": ("k=2", "k=4", "k=8", "k=1,p=2"),
}
#: Budget scopes compared on videos: per frame group, and over the whole clip.
VIDEO_SCOPES = ("frame", "image")
_SCOPE_NAMES = {"frame": "per frame", "image": "whole clip"}
_METRICS = {
    "image": "accuracy: argmax over the one-word answers of the next-token logits after 'ASSISTANT:'",
    "describe": "object-level F1 (colour, shape, 3x3 location) of greedy descriptions, micro-averaged",
    "video": "QA accuracy (argmax over the one-word answers); describe: object-level F1 (colour, shape)",
}
_SCORE_NAMES = {"image": "QA accuracy", "describe": "description F1", "video": "clip QA accuracy"}


def generator(task: str) -> ModuleType:
    """The synthetic generator of ``task``: the one its bundled model was trained on."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return synthqa_v1 if task == "image" else synthqa


def _model_kind(task: str) -> str:
    return "image" if task == "image" else "video"


def answer_token_ids(processor, gen: ModuleType = synthqa_v1) -> torch.Tensor:
    """Token ids of ``gen.ANSWERS``, in that order (each answer is one word-level token)."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(a) for a in gen.ANSWERS]
    if tok.unk_token_id in ids:
        missing = [a for a, i in zip(gen.ANSWERS, ids, strict=True) if i == tok.unk_token_id]
        raise ValueError(f"the tokenizer has no single token for answer word(s) {missing}: not a synthqa model")
    return torch.tensor(ids)


def _is_video(sample) -> bool:
    return isinstance(sample, synthqa.VideoSample)


def prepare_batches(
    processor, samples: Sequence, batch_size: int, gen: ModuleType = synthqa_v1
) -> list[dict[str, Any]]:
    """Processor inputs (left-padded, chat template) for ``samples`` (all images or all clips) in batches."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        video = _is_video(chunk[0])
        kwargs = {"video": True} if video else {}
        texts = [
            processor.apply_chat_template(gen.prompt_messages(s.question, **kwargs), add_generation_prompt=True)
            for s in chunk
        ]
        if video:
            inputs = processor(videos=[s.frames for s in chunk], text=texts, return_tensors="pt", padding=True)
        else:
            images = [gen.to_pil(s.image) for s in chunk]
            inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out.append(dict(inputs))
    return out


def _counts(model, inputs: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Visual tokens at the LLM input and per LLM layer (mean over layers) of each sample of the last call."""
    import vtr

    n = inputs["input_ids"].shape[0]
    if vtr.is_wrapped(model):
        report = model.vtr.report
        return [report.tokens_out(b) for b in range(n)], [report.mean_layer_tokens(b) for b in range(n)]
    ids = inputs["input_ids"]
    visual = torch.zeros_like(ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id"):
        tid = getattr(model.config, name, None)
        if tid is not None:
            visual |= ids == tid
    counts = visual.sum(-1).tolist()
    return counts, [float(c) for c in counts]


def _feed(model, inputs: dict[str, Any]) -> dict[str, Any]:
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    feed = {k: v.to(device) for k, v in inputs.items()}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in feed:
            feed[k] = feed[k].to(dtype)
    return feed


@torch.no_grad()
def _answers(model, processor, samples, batches, gen, on_batch):
    ids = answer_token_ids(processor, gen)
    tok = processor.tokenizer
    correct: dict[str, list[bool]] = {}
    tokens: list[int] = []
    layer_tokens: list[float] = []
    done = 0
    for inputs in batches:
        n = inputs["input_ids"].shape[0]
        logits = model(**_feed(model, inputs), logits_to_keep=1).logits[:, -1].float()
        pred = ids[logits[:, ids.to(logits.device)].argmax(-1).cpu()]
        for s, p in zip(samples[done : done + n], pred.tolist(), strict=True):
            correct.setdefault(s.qtype, []).append(p == tok.convert_tokens_to_ids(s.answer))
        a, b = _counts(model, inputs)
        tokens, layer_tokens = tokens + a, layer_tokens + b
        done += n
        if on_batch is not None:
            on_batch(n)
    return correct, tokens, layer_tokens


@torch.no_grad()
def _descriptions(model, processor, batches, on_batch):
    cap = getattr(model.generation_config, "max_new_tokens", None) or 64
    texts: list[str] = []
    tokens: list[int] = []
    layer_tokens: list[float] = []
    for inputs in batches:
        n = inputs["input_ids"].shape[0]
        out = model.generate(**_feed(model, inputs), max_new_tokens=cap, do_sample=False)
        texts += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        a, b = _counts(model, inputs)
        tokens, layer_tokens = tokens + a, layer_tokens + b
        if on_batch is not None:
            on_batch(n)
    return texts, tokens, layer_tokens


def description_scores(samples: Sequence, texts: Sequence[str], *, with_location: bool) -> dict[str, float]:
    """Micro-averaged object-level precision, recall and F1 of ``texts`` against the samples' descriptions,
    and the share of exactly right descriptions (:func:`vtr.bench.synthqa.description_counts`)."""
    m = p = t = exact = 0
    for s, text in zip(samples, texts, strict=True):
        a, b, c = synthqa.description_counts(text, s.answer, with_location=with_location)
        m, p, t = m + a, p + b, t + c
        exact += int(a == b == c)
    prec, rec = m / max(1, p), m / max(1, t)
    f1 = 2 * prec * rec / max(1e-12, prec + rec)
    return {"precision": prec, "recall": rec, "f1": f1, "exact": exact / max(1, len(samples))}


def split_batches(
    processor, samples: Sequence, batch_size: int, gen: ModuleType = synthqa_v1
) -> dict[str, list[dict[str, Any]]]:
    """:func:`prepare_batches` for the one-word questions (``"qa"``) and the descriptions (``"describe"``)."""
    qa = [s for s in samples if s.qtype != "describe"]
    desc = [s for s in samples if s.qtype == "describe"]
    return {
        "qa": prepare_batches(processor, qa, batch_size, gen) if qa else [],
        "describe": prepare_batches(processor, desc, batch_size, gen) if desc else [],
    }


def evaluate(
    model,
    processor,
    samples: Sequence,
    *,
    gen: ModuleType = synthqa_v1,
    batch_size: int = 50,
    batches: dict[str, list[dict[str, Any]]] | None = None,
    on_batch: Callable[[int], None] | None = None,
    keep_texts: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (wrapped or not) on ``samples`` of one task, drawn from generator ``gen``.

    One-word questions are scored by answer accuracy, ``describe`` items by object-level F1 (with the 3x3
    location for images, colour and shape only for videos). Returns ``{"score", "per_type": {type: accuracy
    or F1}, "visual_tokens": mean visual tokens reaching the LLM per sample, "layer_tokens": mean visual
    tokens per LLM layer (equal to ``visual_tokens`` unless an operator acts inside the LLM), "n"}``, plus
    ``"accuracy"`` when there are questions and ``"describe": {precision, recall, f1, exact}`` when there are
    descriptions; ``score`` is the QA accuracy, or the description F1 for a describe-only set. ``batches``
    reuses :func:`split_batches` output; ``on_batch(k)`` is called with the items done after each batch.
    """
    qa = [s for s in samples if s.qtype != "describe"]
    desc = [s for s in samples if s.qtype == "describe"]
    if batches is None:
        batches = split_batches(processor, samples, batch_size, gen)
    result: dict[str, Any] = {"per_type": {}, "n": len(samples)}
    tokens: list[int] = []
    layer_tokens: list[float] = []
    if qa:
        correct, a, b = _answers(model, processor, qa, batches["qa"], gen, on_batch)
        tokens, layer_tokens = tokens + a, layer_tokens + b
        result["per_type"] = {t: sum(v) / len(v) for t, v in correct.items()}
        allc = [c for v in correct.values() for c in v]
        result["accuracy"] = sum(allc) / len(allc)
    if desc:
        texts, a, b = _descriptions(model, processor, batches["describe"], on_batch)
        tokens, layer_tokens = tokens + a, layer_tokens + b
        result["describe"] = description_scores(desc, texts, with_location=not _is_video(desc[0]))
        result["per_type"]["describe"] = result["describe"]["f1"]
        if keep_texts:
            result["texts"] = texts
    result["score"] = result["accuracy"] if qa else result["describe"]["f1"]
    result["visual_tokens"] = sum(tokens) / max(1, len(tokens))
    result["layer_tokens"] = sum(layer_tokens) / max(1, len(layer_tokens))
    return result


def keep_ratio(text: str) -> float:
    """Parse one ``--keep`` value: a ratio in (0, 1] (budgets are matched across recipes as ratios)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes ratios in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--keep takes ratios in (0, 1], got {value:g}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vtr bench quality``."""
    parser.add_argument("--task", choices=TASKS, default="image", help="image QA, image descriptions or video QA")
    parser.add_argument("--model", default=None, help="model id/path (default: the task's bundled tiny model)")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        help="recipe names, swept over --keep, or recipe:field=value,... run once at those settings "
        "(default: every registered recipe; those without a budget at DEFAULT_SETTINGS)",
    )
    parser.add_argument(
        "--keep", nargs="+", type=keep_ratio, default=list(DEFAULT_KEEPS), help="keep ratios in (0, 1]"
    )
    parser.add_argument("--n", type=int, default=None, help="items (default: the whole split)")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="bench_out/quality", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def _plan(
    specs: Sequence[str], keeps: Sequence[float], scopes: Sequence[str | None] = (None,)
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(recipe, row label, overrides)`` of every reduced run.

    A bare name is swept over ``keeps`` in each of ``scopes`` (or run at its :data:`DEFAULT_SETTINGS`);
    ``name:field=value,...`` runs once at those settings. Runs of one row share a label.
    """
    import vtr

    plan: list[tuple[str, str, dict[str, Any]]] = []
    for spec in specs:
        name, overrides = vtr.recipes.parse_spec(spec)
        try:  # a registered name or a YAML file, checked (and a YAML file parsed) before any model runs
            recipe = vtr.recipes.load_recipe(name)
        except FileNotFoundError:
            raise ValueError(
                f"unknown recipe {name!r} in --recipes; registered: {vtr.recipes.names()} (or a YAML file)"
            ) from None
        shown = name if name in vtr.recipes.names() else (recipe.name or Path(name).stem)
        if overrides:
            plan.append((name, spec, overrides))
        elif name in DEFAULT_SETTINGS:
            plan += [(name, f"{name}:{text}", vtr.recipes.parse_spec(f"{name}:{text}")[1]) for text in
                     DEFAULT_SETTINGS[name]]  # fmt: skip
        else:
            for scope in scopes:
                label = shown if scope is None else f"{shown} ({_SCOPE_NAMES[scope]})"
                for k in keeps:
                    if not 0 < k <= 1:
                        raise ValueError(f"--keep ratios must be in (0, 1], got {k}")
                    plan.append((name, label, {"keep": k} if scope is None else {"keep": k, "scope": scope}))
    return plan


def _cell(r: dict[str, Any]) -> str:
    return f"{r['score']:.3f} ({r['layer_tokens']:.0f})"


def _markdown(result: dict[str, Any]) -> str:
    keeps = result["keeps"]
    ref = result["reference"]
    task = result["task"]
    rows = result["rows"]
    lines = [
        f"Synthetic {task} task, {result['split']} split, {ref['n']} items; {_SCORE_NAMES[task]} (mean visual "
        f"tokens per LLM layer, of {ref['visual_tokens']:.0f}; for recipes acting before the LLM this is the "
        "count at the LLM input).",
        "",
        "| recipe | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
        f"| no reduction | {_cell(ref)} |" + " |" * (len(keeps) - 1),
    ]
    swept = {label: row for label, row in rows.items() if row["keep"] is not None}
    for label, row in swept.items():
        cells = [_cell(row["runs"][f"{k:g}"]) if f"{k:g}" in row["runs"] else "—" for k in keeps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fixed = [(label, row["runs"]["-"]) for label, row in rows.items() if row["keep"] is None]
    if fixed:
        lines += [
            "",
            "Recipes set by their own parameters:",
            "",
            f"| recipe | {_SCORE_NAMES[task]} | visual tokens at the LLM input | per LLM layer (mean) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {lb} | {r['score']:.3f} | {r['visual_tokens']:.0f} | {r['layer_tokens']:.1f} |" for lb, r in
                  fixed]  # fmt: skip
    if result["skipped"]:
        by_reason: dict[str, list[str]] = {}
        for label, why in result["skipped"].items():
            by_reason.setdefault(why, []).append(label)
        lines += ["", "Skipped: " + "; ".join(f"{', '.join(labels)}: {why}" for why, labels in by_reason.items())]
    runs = [("no reduction", ref)] + [
        (label if k == "-" else f"{label} @ {k}", r) for label, row in rows.items() for k, r in row["runs"].items()
    ]
    if task == "describe":
        head = ["precision", "recall", "f1", "exact"]
        lines += ["", "Descriptions:", "", "| run | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        lines += [f"| {name} | " + " | ".join(f"{r['describe'][h]:.3f}" for h in head) + " |" for name, r in runs]
        return "\n".join(lines) + "\n"
    types = list(ref["per_type"])
    lines += [
        "",
        "Per question type" + (" (describe: F1)" if "describe" in types else "") + ":",
        "",
        "| run | " + " | ".join(types) + " |",
        "|---|" + "---|" * len(types),
    ]
    lines += [f"| {name} | " + " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types) + " |" for name, r in
              runs]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    ref = result["reference"]
    ax.axhline(ref["score"], color="black", linestyle="--", label=f"no reduction ({ref['layer_tokens']:.0f} tokens)")
    colours: dict[str, Any] = {}
    lines: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    for label, row in result["rows"].items():
        # A recipe's fixed settings form one line, as its keep sweep does; one colour per recipe.
        key = label if row["keep"] is not None else row["recipe"]
        lines.setdefault(key, (row["recipe"], []))[1].extend((r["layer_tokens"], r["score"]) for r in
                                                              row["runs"].values())  # fmt: skip
        colours.setdefault(row["recipe"], f"C{len(colours) % 10}")
    for key, (recipe, pts) in lines.items():
        pts.sort()
        style = "--" if "whole clip" in key else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colours[recipe], label=key)
    ax.set_xlabel("visual tokens kept (mean per item and LLM layer)")
    ax.set_ylabel(_SCORE_NAMES[result["task"]])
    ax.set_title(f"synthetic {result['task']} ({result['split']}, n={ref['n']})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)  # outside: the curves crowd the plot
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns a process exit code (2 with a one-line error for bad input)."""
    from tqdm.auto import tqdm

    import vtr
    from vtr.models import bundled_model_dir, load_model

    task = getattr(args, "task", "image")
    try:
        gen = generator(task)
        scopes: tuple[str | None, ...] = VIDEO_SCOPES if task == "video" else (None,)
        plan = _plan(args.recipes or vtr.recipes.names(), args.keep, scopes)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    kind = _model_kind(task)
    if args.model is None and not (bundled_model_dir(kind) / "config.json").is_file():
        print(f"error: the bundled {kind} model is missing ({bundled_model_dir(kind)}); pass --model")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would interleave with the bench's own bar
    model, processor = load_model(args.model, kind=kind)
    try:
        answer_token_ids(processor, gen)
        if task == "video" and getattr(processor, "video_processor", None) is None:
            raise ValueError(f"--task video needs a model with video input; {type(model).__name__} has none")
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    samples = gen.split(args.split, args.n) if task == "image" else gen.split(args.split, args.n, task=task)
    batches = split_batches(processor, samples, args.batch_size, gen)
    result: dict[str, Any] = {
        "task": task,
        "split": args.split,
        "model": args.model or str(bundled_model_dir(kind)),
        "metric": _METRICS[task],
        "keeps": list(args.keep),
        "rows": {},
        "skipped": {},
        "host": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    t0 = time.time()
    with tqdm(total=(len(plan) + 1) * len(samples), desc=f"quality {task}", unit="item") as bar:
        bar.set_postfix_str("no reduction")
        result["reference"] = evaluate(model, processor, samples, gen=gen, batches=batches, on_batch=bar.update)
        for recipe, label, overrides in plan:
            if label in result["skipped"]:
                bar.update(len(samples))
                continue
            bar.set_postfix_str(f"{label} {overrides}")
            before = bar.n
            try:
                vtr.wrap(model, recipe, processor=processor, **overrides)
                r = evaluate(model, processor, samples, gen=gen, batches=batches, on_batch=bar.update)
            except (ValueError, NotImplementedError, TypeError) as exc:
                # A recipe that cannot act on this model says why at wrap (or first call): listed, not hidden.
                result["skipped"][label] = str(exc).splitlines()[0]
                bar.update(before + len(samples) - bar.n)
                continue
            finally:
                if vtr.is_wrapped(model):
                    vtr.unwrap(model)
            keep = overrides.get("keep") if set(overrides) <= {"keep", "scope"} else None
            row = result["rows"].setdefault(label, {"recipe": recipe, "keep": keep, "runs": {}})
            row["runs"]["-" if keep is None else f"{keep:g}"] = r | {"settings": overrides}
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality_{task}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = _markdown(result)
    (out / f"{stem}.md").write_text(md)
    if not args.no_plot:
        _plot(result, out / f"{stem}.png")
    print(md)
    written = [f"{stem}.md", f"{stem}.json"] + ([] if args.no_plot else [f"{stem}.png"])
    print(f"wrote {', '.join(str(out / w) for w in written)} in {result['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtr.bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
