"""ToMe on a timm ViT: images/s with no merging, vtr's ToMe, and the official ToMe timm patch, in one run.

The official patch (facebookresearch/ToMe) is loaded from a checkout OUTSIDE the project (``--official PATH`` or
``$VTR_TOME_OFFICIAL``; it is never copied into vtr) and applied to a deep copy of the same model, so all runs use
the same random weights. Timings are interleaved medians; the logits of vtr and the official patch are compared.

    vtr bench tome --official ~/src/ToMe                          # ViT-B/16, batch 32, r=13
    vtr bench tome --model vit_tiny_patch16_224 --batch 4 --r 4   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_arguments", "load_official", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--r", type=int, default=13, help="tokens merged per block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--official",
        default=os.environ.get("VTR_TOME_OFFICIAL"),
        help="checkout of facebookresearch/ToMe (default: $VTR_TOME_OFFICIAL)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="bench_out/tome", help="folder for results.json / results.md")


def load_official(path: str | None):
    """The official ``tome`` package from a checkout, or ``None`` (with the reason) when unavailable."""
    if not path:
        return None, "no checkout given (--official PATH or $VTR_TOME_OFFICIAL)"
    if not (Path(path) / "tome" / "__init__.py").is_file():
        return None, f"{path} is not a facebookresearch/ToMe checkout (no tome/__init__.py)"
    sys.path.insert(0, str(path))
    try:
        import tome
    finally:
        sys.path.pop(0)
    return tome, None


def run(args: argparse.Namespace) -> int:
    import timm

    import vtr
    from vtr.ops import ToMe
    from vtr.profile import interleaved_medians

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tome, why = load_official(args.official)
    official = None
    if tome is not None:
        official = copy.deepcopy(model)
        tome.patch.timm(official)
        official.r = args.r

    def plain():
        model(x)

    def ours():
        with vtr.reduced(model, ToMe(r=args.r)):
            model(x)

    fns = [plain, ours] + ([lambda: official(x)] if official is not None else [])
    times = interleaved_medians(fns, args.repeats)
    with torch.inference_mode(), vtr.reduced(model, ToMe(r=args.r)):
        out = model(x)
        tokens = model.vtr.report.tokens_out(0)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": args.model,
        "batch": args.batch,
        "r": args.r,
        "tokens_left": tokens,
        "images_per_s": {"no merging": args.batch / times[0], "vtr ToMe": args.batch / times[1]},
    }
    if official is not None:
        with torch.inference_mode():
            ref = official(x)
        result["images_per_s"]["official ToMe patch"] = args.batch / times[2]
        result["max_abs_logit_diff_vs_official"] = float((out - ref).abs().max())
    else:
        result["official"] = why
    ips = result["images_per_s"]
    lines = [
        f"{args.model}, random weights, batch {args.batch}, 224 px, r={args.r} ({tokens} of 196 patch tokens left); "
        f"{result['machine']}, torch {result['torch']}, timm {result['timm']}; medians of {args.repeats} "
        "interleaved repeats.",
        "",
        "| run | images/s | vs no merging |",
        "|---|---|---|",
    ] + [f"| {k} | {v:.1f} | {v / ips['no merging']:.2f}x |" for k, v in ips.items()]
    if official is not None:
        lines += [
            "",
            f"vtr vs official: {ips['vtr ToMe'] / ips['official ToMe patch']:.2f}x the images/s; max |logit "
            f"difference| {result['max_abs_logit_diff_vs_official']:.1e}.",
        ]
    else:
        lines += ["", f"Official patch not timed: {why}."]
    table = "\n".join(lines)
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0
