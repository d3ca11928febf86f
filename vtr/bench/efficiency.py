"""Prefill, per-token decode time and KV-cache bytes, baseline vs reduced, on a LLaVA-1.5-shaped model.

The vision tower is CLIP-L/336 (24 layers, 1024-d, 576 patch tokens, features from ``hidden_states[-2]``); the
LLM is Llama-shaped and scaled to what the machine runs (``--llm``); weights are random. Every configuration runs
in the same process, interleaved, so the figures are ratios, not absolute claims:

* vision-tower time (``get_image_features``) and total prefill time (``use_cache=False``, last logits only);
* TPOT: the time of one cached decode step, median over ``--decode-steps`` steps after a cached prefill;
* KV-cache bytes after prefill (every layer's cache as it is, padding included);
* analytic FLOPs of the vision tower (per block, with the tokens each block sees) and of the LLM prefill (per
  layer, with the rows each layer sees), and the "ideal" speed-up they give.

``--scaling`` also times the LLM prefill alone at several prompt lengths and fits ``t(n) = a + b*n``: the fixed
part ``a`` (weights read per layer, the LM head, Python) is what no token reduction removes, so the achievable
LLM speed-up is ``t(n_base) / t(n_reduced)`` of the fit, not the FLOPs ratio.

    vtr bench efficiency                                             # every default configuration
    vtr bench efficiency --configs divprune:keep=0.1 fastv --llm 0.5b --scaling
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_CONFIGS", "LLM_SIZES", "add_arguments", "llava15_shaped", "run"]

#: Llama-shaped decoders: name -> (hidden, intermediate, layers, heads, kv heads).
LLM_SIZES = {
    "7b": (4096, 11008, 32, 32, 32),  # Vicuna-7B, as in LLaVA-1.5-7B
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B class
    "0.5b": (896, 4864, 24, 14, 2),  # Qwen2-0.5B class
    "tiny": (128, 512, 2, 4, 2),  # smoke tests
}

#: ``recipe[:field=value,...]`` configurations compared with the baseline (LLaVA-1.5 budgets 192/128/64).
DEFAULT_CONFIGS = (
    "divprune:keep=64",
    "tome:keep=192",
    "tome:keep=128",
    "tome:keep=64",
    "fastv:k=2,r=0.5",
    "hired:keep=64",
    "mustdrop:preset=64",
)


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
            num_hidden_layers=4,
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
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="recipe[:field=value,...] to compare with the baseline (default: %(default)s)",
    )
    parser.add_argument("--llm", default="0.5b", choices=sorted(LLM_SIZES), help="size class of the LLM")
    parser.add_argument("--vision", default="clip-l-336", choices=("clip-l-336", "tiny"))
    parser.add_argument("--text-tokens", type=int, default=48, help="text tokens around the image")
    parser.add_argument("--decode-steps", type=int, default=64, help="cached decode steps timed for TPOT")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", action="store_true", help="also fit LLM prefill time vs prompt length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="bench_out/efficiency", help="folder for results.json / results.md")


def _inputs(cfg, text_tokens: int) -> dict[str, torch.Tensor]:
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    half = text_tokens // 2
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.randint(3, 1000, (half,), generator=g),
            torch.full((n_img,), cfg.image_token_id),
            torch.randint(3, 1000, (text_tokens - half,), generator=g),
        ]
    ).unsqueeze(0)
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _time_decode(model, inputs: dict[str, torch.Tensor], steps: int) -> tuple[float, int]:
    """Median seconds of one cached decode step after a cached prefill; KV-cache bytes after prefill."""
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = out.cache
        kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
        nxt = out.logits[:, -1:].argmax(-1)
        mask = inputs["attention_mask"]
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            nxt = out.logits[:, -1:].argmax(-1)
    return statistics.median(times), kv


def run(args: argparse.Namespace) -> int:
    import vtr
    from vtr.profile import decoder_decode_flops, decoder_layerwise_flops, interleaved_medians

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = llava15_shaped(args.llm, vision=args.vision)
    inputs = _inputs(cfg, args.text_tokens)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    n_prompt = inputs["input_ids"].shape[1]
    print(f"LLaVA-1.5-shaped: vision {args.vision}, LLM {args.llm}; {n_prompt} prompt tokens ({n_img} visual)")
    configs: list[tuple[str, Any]] = [("baseline", None)]
    skipped: dict[str, str] = {}
    for text in args.configs:
        name, overrides = vtr.recipes.parse_spec(text)
        try:  # a trial prefill: some budgets are only checked against the real token counts
            recipe = vtr.recipes.build(name, **overrides)
            with vtr.reduced(model, recipe), torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
        except (ValueError, TypeError, NotImplementedError) as exc:
            skipped[text] = str(exc).splitlines()[0]
            continue
        configs.append((text, recipe))

    def scoped(recipe, fn):
        def call():
            if recipe is None:
                return fn()
            with vtr.reduced(model, recipe):
                return fn()

        return call

    def prefill():
        model(**inputs, use_cache=False, logits_to_keep=1)

    def vision():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])

    fns = [scoped(r, vision) for _, r in configs] + [scoped(r, prefill) for _, r in configs]
    times = interleaved_medians(fns, args.repeats)
    t_vision, t_prefill = times[: len(configs)], times[len(configs) :]
    rows = []
    text_cfg = cfg.text_config
    for (name, recipe), tv, tp in zip(configs, t_vision, t_prefill, strict=True):
        if recipe is None:
            tpot, kv = _time_decode(model, inputs, args.decode_steps)
            visual, layer_rows, tower_rows = n_img, [n_prompt] * text_cfg.num_hidden_layers, None
        else:
            with vtr.reduced(model, recipe):
                tpot, kv = _time_decode(model, inputs, args.decode_steps)
                rep = model.vtr.report
            visual = rep.tokens_out(0)
            text = n_prompt - n_img
            layers = rep.layer_tokens[0] if rep.layer_tokens else [visual] * text_cfg.num_hidden_layers
            layer_rows = [text + v for v in layers]
            tower_rows = rep.details.get("tower_tokens", [None])[0]
        f_vis = _tower_flops(cfg, tower_rows)
        f_llm = decoder_layerwise_flops(text_cfg, layer_rows)
        rows.append(
            {
                "config": name,
                "visual_tokens": visual,
                "mean_layer_tokens": sum(layer_rows) / len(layer_rows) - (n_prompt - n_img),
                "vision_s": tv,
                "prefill_s": tp,
                "llm_s": max(tp - tv, 1e-9),
                "tpot_s": tpot,
                "kv_bytes": kv,
                "vision_flops": f_vis,
                "llm_flops": f_llm,
                # mid-way through the timed steps, each layer's cache holds its prompt rows plus half of them
                "decode_flops": decoder_decode_flops(text_cfg, [n + args.decode_steps // 2 for n in layer_rows]),
            }
        )
    base = rows[0]
    for r in rows:
        r["speedup"] = base["prefill_s"] / r["prefill_s"]
        r["ideal"] = (base["vision_flops"] + base["llm_flops"]) / (r["vision_flops"] + r["llm_flops"])
        r["llm_speedup"] = base["llm_s"] / r["llm_s"]
        r["llm_ideal"] = base["llm_flops"] / r["llm_flops"]
        r["vision_speedup"] = base["vision_s"] / r["vision_s"]
        r["vision_ideal"] = base["vision_flops"] / r["vision_flops"]
        r["tpot_speedup"] = base["tpot_s"] / r["tpot_s"]
        r["tpot_ideal"] = base["decode_flops"] / r["decode_flops"]
        r["kv_ratio"] = r["kv_bytes"] / base["kv_bytes"]
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "llm": args.llm,
        "vision": args.vision,
        "prompt_tokens": n_prompt,
        "repeats": args.repeats,
        "decode_steps": args.decode_steps,
        "rows": rows,
        "skipped": skipped,
    }
    if args.scaling:
        result["scaling"] = _llm_scaling(model, cfg, n_prompt, args.repeats)
    table = _markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _tower_flops(cfg, tower_rows: list[tuple[int, int]] | None) -> float:
    """Tower FLOPs: every block at 577 tokens, or at the (attention, MLP) counts the vision stage reported."""
    from vtr.profile import vit_block_flops

    vc = cfg.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    counts = tower_rows if tower_rows else [(n, n)] * vc.num_hidden_layers
    return sum(vit_block_flops(vc, a, m) for a, m in counts)


def _llm_scaling(model, cfg, n_prompt: int, repeats: int) -> dict[str, Any]:
    """LLM prefill time at several lengths (embeddings fed directly) and a least-squares ``a + b*n`` fit."""
    from vtr.profile import interleaved_medians

    lm = model.model.language_model
    lengths = sorted({64, 128, 256, 384, n_prompt})
    h = cfg.text_config.hidden_size
    feeds = [torch.randn(1, n, h) for n in lengths]

    def make(x):
        return lambda: model.lm_head(lm(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1:])

    times = interleaved_medians([make(x) for x in feeds], repeats)
    n = torch.tensor(lengths, dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64)
    b = float(((n - n.mean()) * (t - t.mean())).sum() / ((n - n.mean()) ** 2).sum())
    a = float(t.mean() - b * n.mean())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    return {"lengths": lengths, "seconds": times, "fit_a_s": a, "fit_b_s_per_token": b, "weight_bytes": weight_bytes}


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"LLaVA-1.5-shaped model (CLIP-L/336 tower, {result['llm']} LLM, random weights), {result['prompt_tokens']} "
        f"prompt tokens, {result['machine']}, torch {result['torch']}; medians of {result['repeats']} interleaved "
        f"repeats, TPOT over {result['decode_steps']} cached steps.",
        "",
        "| config | visual tokens (LLM input / layer mean) | prefill s | speed-up (ideal) | vision s (ideal) | "
        "LLM s (ideal) | TPOT ms (ideal) | KV MB (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['visual_tokens']} / {r['mean_layer_tokens']:.0f} | {r['prefill_s']:.3f} | "
            f"{r['speedup']:.2f}x ({r['ideal']:.2f}x) | {r['vision_s']:.3f} ({r['vision_ideal']:.2f}x) | "
            f"{r['llm_s']:.3f} ({r['llm_speedup']:.2f}x of {r['llm_ideal']:.2f}x) | {r['tpot_s'] * 1e3:.1f} "
            f"({r['tpot_speedup']:.2f}x of {r['tpot_ideal']:.2f}x) | "
            f"{r['kv_bytes'] / 2**20:.1f} ({r['kv_ratio']:.3f}) |"
        )
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())]
    sc = result.get("scaling")
    if sc:
        lines += [
            "",
            "LLM prefill time vs prompt length (embeddings in, last logits out): "
            + ", ".join(f"{n}: {s:.3f} s" for n, s in zip(sc["lengths"], sc["seconds"], strict=True))
            + f"; fit t(n) = {sc['fit_a_s']:.3f} s + {sc['fit_b_s_per_token'] * 1e3:.2f} ms x n "
            f"(the LLM's weights: {sc['weight_bytes'] / 2**20:.0f} MB, read once per forward whatever n).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    sys.exit(run(p.parse_args()))
