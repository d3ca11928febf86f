"""Accuracy vs visual tokens kept, per recipe, on the synthetic visual QA test split (``vtr bench quality``).

Runs the bundled tiny trained VLM (``assets/tiny-vqa-llava``, or ``--model``) on :mod:`vtr.synthqa`
questions with no reduction (the reference) and with every registered recipe that can run on the model
at each ``--keep``. Accuracy is measured as the argmax over the answer vocabulary of the next-token
logits after ``ASSISTANT:`` (one batched, left-padded prefill per batch, no decoding), which equals the
greedy first word whenever the model answers with an answer word.

Writes ``quality.md`` (table), ``quality.json`` (everything, with per-question-type accuracy) and
``quality.png`` (accuracy vs mean visual tokens kept, one line per recipe, the reference as a
horizontal line) into ``--out``.

    vtr bench quality --n 500
    python -m vtr.bench.quality --recipes divprune random --keep 0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vtr import synthqa

__all__ = ["DEFAULT_KEEPS", "add_arguments", "answer_token_ids", "evaluate", "main", "prepare_batches", "run"]

DEFAULT_KEEPS = (0.5, 0.25, 0.11)


def answer_token_ids(processor) -> torch.Tensor:
    """Token ids of :data:`vtr.synthqa.ANSWERS`, in that order (each answer is one word-level token)."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(a) for a in synthqa.ANSWERS]
    if tok.unk_token_id in ids:
        missing = [a for a, i in zip(synthqa.ANSWERS, ids, strict=True) if i == tok.unk_token_id]
        raise ValueError(f"the tokenizer has no single token for answer word(s) {missing}: not a synthqa model")
    return torch.tensor(ids)


def prepare_batches(processor, samples: Sequence[synthqa.Sample], batch_size: int) -> list[dict[str, Any]]:
    """Processor inputs (left-padded, chat template) for ``samples`` in batches of ``batch_size``."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        texts = [
            processor.apply_chat_template(synthqa.prompt_messages(s.question), add_generation_prompt=True)
            for s in chunk
        ]
        inputs = processor(
            images=[synthqa.to_pil(s.image) for s in chunk], text=texts, return_tensors="pt", padding=True
        )
        out.append(dict(inputs))
    return out


@torch.no_grad()
def evaluate(
    model,
    processor,
    samples: Sequence[synthqa.Sample],
    *,
    batch_size: int = 50,
    batches: list[dict[str, Any]] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` (wrapped or not) on ``samples``.

    Returns ``{"accuracy", "per_type": {qtype: acc}, "visual_tokens": mean visual tokens reaching the
    LLM per sample, "n"}``. ``batches`` reuses :func:`prepare_batches` output; ``on_batch(k)`` is
    called with the number of questions done after each batch (progress bars).
    """
    import vtr

    ids = answer_token_ids(processor)
    tok = processor.tokenizer
    if batches is None:
        batches = prepare_batches(processor, samples, batch_size)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    correct: dict[str, list[bool]] = {t: [] for t in synthqa.QUESTION_TYPES}
    tokens: list[int] = []
    done = 0
    for inputs in batches:
        n = inputs["input_ids"].shape[0]
        chunk = samples[done: done + n]
        feed = {k: v.to(device) for k, v in inputs.items()}
        feed["pixel_values"] = feed["pixel_values"].to(dtype)
        logits = model(**feed, logits_to_keep=1).logits[:, -1].float()
        pred = ids[logits[:, ids.to(logits.device)].argmax(-1).cpu()]
        for s, p in zip(chunk, pred.tolist(), strict=True):
            correct[s.qtype].append(p == tok.convert_tokens_to_ids(s.answer))
        per_image = int((inputs["input_ids"] == model.config.image_token_id).sum(-1)[0])
        report = model.vtr.report if vtr.is_wrapped(model) else None
        tokens += [report.tokens_out(b) if report is not None else per_image for b in range(n)]
        done += n
        if on_batch is not None:
            on_batch(n)
    allc = [c for v in correct.values() for c in v]
    return {
        "accuracy": sum(allc) / max(1, len(allc)),
        "per_type": {t: sum(v) / len(v) for t, v in correct.items() if v},
        "visual_tokens": sum(tokens) / max(1, len(tokens)),
        "n": len(allc),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vtr bench quality``."""
    parser.add_argument("--model", default=None, help="model id/path (default: the bundled tiny VQA model)")
    parser.add_argument("--recipes", nargs="+", default=None, help="recipe names (default: every registered one)")
    parser.add_argument("--keep", nargs="+", type=float, default=list(DEFAULT_KEEPS), help="keep ratios")
    parser.add_argument("--n", type=int, default=None, help="questions (default: the whole test split, 2000)")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="bench_out/quality", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def _markdown(result: dict[str, Any]) -> str:
    keeps = result["keeps"]
    ref = result["reference"]
    lines = [
        f"Synthetic visual QA, {result['split']} split, {ref['n']} questions; accuracy (mean visual tokens "
        f"kept of {ref['visual_tokens']:.0f}).",
        "",
        "| recipe | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
        f"| no reduction | {ref['accuracy']:.3f} ({ref['visual_tokens']:.0f}) |" + " |" * (len(keeps) - 1),
    ]
    for name, runs in result["recipes"].items():
        cells = []
        for k in keeps:
            r = runs.get(f"{k:g}")
            cells.append("—" if r is None else f"{r['accuracy']:.3f} ({r['visual_tokens']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    types = list(ref["per_type"])
    lines += [
        "",
        "Per question type:",
        "",
        "| run | " + " | ".join(types) + " |",
        "|---|" + "---|" * len(types),
        "| no reduction | " + " | ".join(f"{ref['per_type'][t]:.3f}" for t in types) + " |",
    ]
    for name, runs in result["recipes"].items():
        for k, r in runs.items():
            lines.append(f"| {name} @ {k} | " + " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ref = result["reference"]
    label = f"no reduction ({ref['visual_tokens']:.0f} tokens)"
    ax.axhline(ref["accuracy"], color="black", linestyle="--", label=label)
    for name, runs in result["recipes"].items():
        pts = sorted((r["visual_tokens"], r["accuracy"]) for r in runs.values())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("visual tokens kept (mean per question)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"synthetic visual QA ({result['split']}, n={ref['n']})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns a process exit code."""
    from tqdm.auto import tqdm

    import vtr
    from vtr.models import bundled_model_dir, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None and not (bundled_model_dir() / "config.json").is_file():
        print(f"error: the bundled model is missing ({bundled_model_dir()}); train it with "
              "scripts/train_tiny_vqa.py or pass --model")
        return 2
    model, processor = load_model(args.model)
    try:
        answer_token_ids(processor)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    samples = synthqa.split(args.split, args.n)
    batches = prepare_batches(processor, samples, args.batch_size)
    names = args.recipes or vtr.recipes.names()
    configs = [(None, None)] + [(r, k) for r in names for k in args.keep]
    result: dict[str, Any] = {
        "split": args.split,
        "model": args.model or str(bundled_model_dir()),
        "metric": "argmax over the answer vocabulary of the next-token logits after 'ASSISTANT:'",
        "keeps": list(args.keep),
        "recipes": {},
        "skipped": {},
        "host": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    t0 = time.time()
    with tqdm(total=len(configs) * len(samples), desc="quality", unit="q") as bar:
        for recipe, keep in configs:
            if recipe is None:
                bar.set_postfix_str("no reduction")
                result["reference"] = evaluate(model, processor, samples, batches=batches, on_batch=bar.update)
                continue
            if recipe in result["skipped"]:
                bar.update(len(samples))
                continue
            bar.set_postfix_str(f"{recipe} keep={keep:g}")
            try:
                vtr.wrap(model, recipe, keep=keep)
            except (ValueError, NotImplementedError, TypeError) as exc:
                result["skipped"][recipe] = str(exc).splitlines()[0]
                bar.update(len(samples))
                continue
            try:
                r = evaluate(model, processor, samples, batches=batches, on_batch=bar.update)
            finally:
                vtr.unwrap(model)
            result["recipes"].setdefault(recipe, {})[f"{keep:g}"] = r
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    md = _markdown(result)
    (out / "quality.md").write_text(md)
    if not args.no_plot:
        _plot(result, out / "quality.png")
    print(md)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}" + ("" if args.no_plot else f", {out / 'quality.png'}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtr.bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
