"""Prefill time and analytic FLOPs, baseline vs reduced, on a LLaVA-1.5-shaped random-weight model.

The vision tower is CLIP-L/336 (24 layers, 1024-d, 576 patch tokens); the LLM is Llama-shaped and scaled
to what the machine runs in about a minute (``--llm``). Both runs happen in the same process, so the
figures are ratios, not absolute claims.

    vtr bench efficiency --recipe divprune --keep 0.1
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

__all__ = ["LLM_SIZES", "add_arguments", "llava15_shaped", "run"]

#: Llama-shaped decoders: name -> (hidden, intermediate, layers, heads, kv heads).
LLM_SIZES = {
    "7b": (4096, 11008, 32, 32, 32),  # Vicuna-7B, as in LLaVA-1.5-7B
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B class
    "0.5b": (896, 4864, 24, 14, 2),  # Qwen2-0.5B class
    "tiny": (128, 512, 2, 4, 2),  # smoke tests
}


def llava15_shaped(llm: str = "0.5b", *, vision: str = "clip-l-336", seed: int = 0):
    """Random-weight ``LlavaForConditionalGeneration`` with LLaVA-1.5's vision side; returns (model, config)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if llm not in LLM_SIZES:
        raise ValueError(f"llm must be one of {sorted(LLM_SIZES)}, got {llm!r}")
    if vision == "clip-l-336":
        vc = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
    elif vision == "tiny":
        vc = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        )
    else:
        raise ValueError(f"vision must be 'clip-l-336' or 'tiny', got {vision!r}")
    h, i, layers, heads, kv = LLM_SIZES[llm]
    tc = LlamaConfig(
        vocab_size=32064,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    return model, cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="divprune", help="recipe to compare with the baseline")
    parser.add_argument("--keep", type=float, default=0.1, help="budget of the reduced run (default 0.1)")
    parser.add_argument("--llm", default="0.5b", choices=sorted(LLM_SIZES), help="size class of the LLM")
    parser.add_argument("--vision", default="clip-l-336", choices=("clip-l-336", "tiny"))
    parser.add_argument("--text-tokens", type=int, default=48, help="text tokens around the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="bench_out/efficiency", help="folder for results.json / results.md")


def run(args: argparse.Namespace) -> int:
    import vtr
    from vtr.profile import decoder_prefill_flops, interleaved_medians, vit_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = llava15_shaped(args.llm, vision=args.vision)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    half = args.text_tokens // 2
    ids = torch.cat(
        [
            torch.randint(3, 1000, (half,)),
            torch.full((n_img,), cfg.image_token_id),
            torch.randint(3, 1000, (half,)),
        ]
    ).unsqueeze(0)
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def prefill() -> None:
        model(**inputs, use_cache=False, logits_to_keep=1)

    def vision_only() -> None:
        model.model.get_image_features(pixel_values=pixels)

    print(f"LLaVA-1.5-shaped: vision {args.vision}, LLM {args.llm}; {ids.shape[1]} prompt tokens ({n_img} visual)")
    recipe = vtr.recipes.build(args.recipe, keep=args.keep)

    def reduced_prefill() -> None:
        with vtr.reduced(model, recipe):
            prefill()

    # Interleaved repeats (vision, baseline, reduced, vision, ...) so load from other processes hits all alike.
    t_vision, t_base, t_red = interleaved_medians([vision_only, prefill, reduced_prefill], args.repeats)
    with vtr.reduced(model, recipe), torch.inference_mode():
        prefill()
        rep = model.vtr.report
        kept = rep.tokens_out(0)
        op_seconds = rep.operator_seconds
    n_base, n_red = ids.shape[1], ids.shape[1] - n_img + kept
    vit = vit_flops(cfg.vision_config, n_img + 1, layers=cfg.vision_config.num_hidden_layers - 1)
    f_base = vit + decoder_prefill_flops(cfg.text_config, n_base)
    f_red = vit + decoder_prefill_flops(cfg.text_config, n_red)
    llm_base, llm_red = max(t_base - t_vision, 1e-9), max(t_red - t_vision, 1e-9)
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "llm": args.llm,
        "vision": args.vision,
        "recipe": args.recipe,
        "keep": args.keep,
        "visual_tokens": [n_img, kept],
        "prompt_tokens": [n_base, n_red],
        "prefill_s": [t_base, t_red],
        "vision_s": t_vision,
        "llm_prefill_s": [llm_base, llm_red],
        "operator_s": op_seconds,
        "tflops": [f_base / 1e12, f_red / 1e12],
        "speedup_measured": t_base / t_red,
        "speedup_ideal_flops": f_base / f_red,
        "llm_speedup_measured": llm_base / llm_red,
        "llm_speedup_ideal_flops": decoder_prefill_flops(cfg.text_config, n_base)
        / decoder_prefill_flops(cfg.text_config, n_red),
    }
    table = "\n".join(
        [
            "| | baseline | reduced | ratio |",
            "|---|---|---|---|",
            f"| visual tokens | {n_img} | {kept} | {kept / n_img:.3f} |",
            f"| prefill TFLOPs (analytic) | {f_base / 1e12:.3f} | {f_red / 1e12:.3f} | "
            f"{result['speedup_ideal_flops']:.2f}x ideal |",
            f"| prefill time, vision + LLM (s) | {t_base:.3f} | {t_red:.3f} | {result['speedup_measured']:.2f}x |",
            f"| LLM part of prefill (s) | {llm_base:.3f} | {llm_red:.3f} | {result['llm_speedup_measured']:.2f}x "
            f"(ideal {result['llm_speedup_ideal_flops']:.2f}x) |",
            f"| {args.recipe} operator time (ms) | - | {op_seconds * 1e3:.1f} | |",
        ]
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    sys.exit(run(p.parse_args()))
