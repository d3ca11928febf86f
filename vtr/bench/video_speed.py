"""Video speed: decoding throughput of ``vtr.video`` and prefill time with STORM-style pooling and QuoTA.

Two measurements, each a set of ratios taken in one process (never absolute claims):

1. **Decoding**: frames delivered per second by :func:`vtr.video.read_video` (decodes only the sampled frames)
   vs a naive full decode (every frame decoded in order, the sampled ones kept), on ``--video`` or on a
   synthetic clip written with PyAV.
2. **Prefill** of a Qwen2-VL-shaped random-weight model on a ``--frames``-frame clip: no reduction vs ``storm``
   (temporal pooling, k = 1 / keep) vs ``quota`` at the same ``--keep``, next to the analytic FLOPs ideal. The
   QuoTA run includes its frame scorer (``--quota-scorer``: a random-weight open_clip ViT-B-32 by default, so its
   cost is real; no weights download). Query decoupling is off: it is one short greedy generation by the answering
   model, reported separately by callers that use it.

The model runs on synthetic processor outputs (no processor), so the benchmark hands the question and the frames
to QuoTA itself (see :class:`_BenchQuoTA`). Timings are interleaved medians (:func:`vtr.profile.interleaved_medians`).

    vtr bench video-speed                                  # defaults: 32 frames at 224 px, 0.5B-class LLM
    vtr bench video-speed --frames 64 --llm 2b --vision qwen2-vl --keep 0.25
    vtr bench video-speed --llm tiny --vision tiny --frames 8 --size 56 --decode-seconds 2   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["LLM_SIZES", "VISION_SIZES", "add_arguments", "qwen2_vl_shaped", "run"]

#: Qwen2-style decoders: name -> (hidden, intermediate, layers, heads, kv heads).
LLM_SIZES = {
    "2b": (1536, 8960, 28, 12, 2),  # Qwen2-VL-2B
    "0.5b": (896, 4864, 24, 14, 2),  # Qwen2-0.5B class
    "tiny": (128, 256, 2, 4, 2),  # smoke tests
}
#: Qwen2-VL vision towers: name -> (depth, embed dim, heads).
VISION_SIZES = {"qwen2-vl": (32, 1280, 16), "tiny": (2, 64, 4)}
VOCAB = 151936
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def qwen2_vl_shaped(llm: str = "0.5b", vision: str = "tiny", *, seed: int = 0):
    """Random-weight ``Qwen2VLForConditionalGeneration`` with Qwen2-VL's token ids and M-RoPE; ``(model, config)``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if llm not in LLM_SIZES:
        raise ValueError(f"llm must be one of {sorted(LLM_SIZES)}, got {llm!r}")
    if vision not in VISION_SIZES:
        raise ValueError(f"vision must be one of {sorted(VISION_SIZES)}, got {vision!r}")
    hidden, inter, layers, heads, kv = LLM_SIZES[llm]
    half = hidden // heads // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 64 -> [16, 24, 24] as in Qwen2-VL
    depth, embed, vheads = VISION_SIZES[vision]
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=depth, embed_dim=embed, hidden_size=hidden, num_heads=vheads, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, mlp_ratio=4,
        ),
        text_config=dict(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
        ),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval(), cfg


def video_prefill_inputs(cfg, frames: int, size: int, text_tokens: int = 48, seed: int = 0) -> dict[str, Any]:
    """Processor-shaped inputs of one ``frames``-frame ``size x size`` video: ids, mask, patches, grid."""
    if frames % 2 or size % 28:
        raise ValueError(f"frames must be even and size a multiple of 28, got frames={frames}, size={size}")
    g = torch.Generator().manual_seed(seed)
    t, h, w = frames // 2, size // 14, size // 14
    n_vis = t * h * w // 4
    half = text_tokens // 2
    ids = torch.cat([
        torch.randint(1000, 100_000, (half,), generator=g), torch.tensor([VISION_START]),
        torch.full((n_vis,), VIDEO_PAD), torch.tensor([VISION_END]), torch.randint(1000, 100_000, (half,), generator=g),
    ]).unsqueeze(0)  # fmt: skip
    patch_dim = 3 * 2 * 14 * 14
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == VIDEO_PAD).to(torch.int32) * 2,  # text 0, image 1, video 2
        "pixel_values_videos": torch.randn(t * h * w, patch_dim, generator=g),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }


def _quota_class():
    from vtr.ops.quota import QuoTA

    @dataclasses.dataclass
    class _BenchQuoTA(QuoTA):
        """QuoTA with the question and frames handed over directly (the adapter does not pass them yet)."""

        bench_query: str = "where is the red car ?"
        bench_frames: Any = None
        needs_query: ClassVar[bool] = False  # the benchmark hands the question over itself

        def apply(self, tokens, ctx):
            extras = {**ctx.extras, "video_frames": [self.bench_frames]}
            return super().apply(tokens, dataclasses.replace(ctx, query=self.bench_query, extras=extras))

    return _BenchQuoTA


# ------------------------------------------------------------------------------------------------ decoding
def write_synthetic_clip(path: Path, seconds: float, fps: int = 30, size: tuple[int, int] = (360, 640)) -> Path:
    """A moving-gradient MPEG-4 clip written with PyAV (``pip install av``)."""
    try:
        import av
    except ImportError as exc:
        raise ImportError("the synthetic clip needs PyAV (pip install av), or pass --video PATH") from exc
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=fps)
    stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
    stream.bit_rate = 2_000_000
    for i in range(int(seconds * fps)):
        frame = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (3 * i) % 256)], -1)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def naive_full_decode(path: str | Path, indices: np.ndarray) -> np.ndarray:
    """Decode every frame in order (decord, sequential) and keep those at ``indices``: the naive baseline."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    wanted = set(int(i) for i in indices)
    kept = []
    for i in range(len(reader)):
        frame = reader.next().asnumpy()
        if i in wanted:
            kept.append(frame)
    return np.stack(kept)


def measure_decoding(path: Path, num_frames: int, repeats: int) -> dict[str, Any]:
    from vtr.profile import interleaved_medians
    from vtr.video import read_video

    clip = read_video(path, num_frames=num_frames)
    total = round(clip.duration * clip.fps)
    ref = naive_full_decode(path, clip.indices)
    if not np.array_equal(ref, clip.frames):
        raise AssertionError("read_video and the full decode disagree on the sampled frames")
    t_read, t_full = interleaved_medians(
        [lambda: read_video(path, num_frames=num_frames), lambda: naive_full_decode(path, clip.indices)],
        repeats=repeats,
        warmup=0,
    )
    return {
        "video": str(path),
        "file_frames": total,
        "resolution": list(clip.frames.shape[1:3]),
        "sampled_frames": len(clip),
        "read_video_s": t_read,
        "full_decode_s": t_full,
        "read_video_frames_per_s": len(clip) / t_read,
        "full_decode_frames_per_s": total / t_full,
        "speedup": t_full / t_read,
    }


# ------------------------------------------------------------------------------------------------ prefill
def measure_prefill(args: argparse.Namespace) -> dict[str, Any]:
    import vtr
    from vtr.ops.storm import TemporalPool
    from vtr.profile import decoder_prefill_flops, interleaved_medians

    model, cfg = qwen2_vl_shaped(args.llm, args.vision)
    inputs = video_prefill_inputs(cfg, args.frames, args.size)
    rng = np.random.default_rng(0)
    frames = (rng.random((args.frames, args.size, args.size, 3)) * 255).astype(np.uint8)
    n_vis = int((inputs["input_ids"] == VIDEO_PAD).sum())
    if args.quota_scorer == "clip":
        from vtr.ops.quota_scorers import ClipScorer

        scorer: Any = ClipScorer(model_name="ViT-B-32", pretrained=None)
    else:
        scorer = "constant"
    recipes = {
        "storm": [TemporalPool(keep=args.keep)],
        "quota": [_quota_class()(keep=args.keep, scorer=scorer, decouple=False, bench_frames=frames)],
    }

    def prefill() -> None:
        model(**inputs, use_cache=False, logits_to_keep=1)

    def vision_only() -> None:
        model.model.get_video_features(
            pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
        )

    def reduced(ops):
        def fn() -> None:
            with vtr.reduced(model, ops):
                prefill()

        return fn

    t_scorer = 0.0
    if args.quota_scorer == "clip":  # the scorer alone, once loaded (it runs inside QuoTA's prefill too)
        scorer(frames[:2], "warm up")
        t0 = time.perf_counter()
        scorer(frames, "where is the red car ?")
        t_scorer = time.perf_counter() - t0
    times = interleaved_medians([vision_only, prefill] + [reduced(ops) for ops in recipes.values()], args.repeats)
    t_vision, t_base, *t_red = times
    n_text = inputs["input_ids"].shape[1] - n_vis
    f_base = decoder_prefill_flops(cfg.text_config, n_text + n_vis)
    rows = {"baseline": {"visual_tokens": n_vis, "prefill_s": t_base, "llm_prefill_s": t_base - t_vision}}
    rows["baseline"]["llm_tflops"] = f_base / 1e12
    for (name, ops), t in zip(recipes.items(), t_red, strict=True):
        with vtr.reduced(model, ops), torch.inference_mode():
            prefill()
            kept = model.vtr.report.tokens_out(0)
            op_s = model.vtr.report.operator_seconds
        f = decoder_prefill_flops(cfg.text_config, n_text + kept)
        rows[name] = {
            "visual_tokens": kept,
            "prefill_s": t,
            "llm_prefill_s": t - t_vision,
            "operator_s": op_s,
            "llm_tflops": f / 1e12,
            "speedup_measured": t_base / t,
            "llm_speedup_measured": (t_base - t_vision) / max(t - t_vision, 1e-9),
            "llm_speedup_ideal_flops": f_base / f,
        }
    return {
        "model": f"Qwen2-VL-shaped, LLM {args.llm}, vision {args.vision}, random weights",
        "frames": args.frames,
        "size": args.size,
        "keep": args.keep,
        "quota_scorer": args.quota_scorer,
        "quota_scorer_s": t_scorer,
        "vision_s": t_vision,
        "runs": rows,
    }


def _markdown(result: dict[str, Any]) -> str:
    lines = []
    dec = result.get("decoding")
    if dec:
        lines += [
            f"Decoding {dec['sampled_frames']} of {dec['file_frames']} frames ({dec['resolution'][1]}x"
            f"{dec['resolution'][0]}, {Path(dec['video']).name}):",
            "",
            "| reader | seconds | sampled frames / s | ratio |",
            "|---|---|---|---|",
            f"| full decode, then sample | {dec['full_decode_s']:.3f} | "
            f"{dec['sampled_frames'] / dec['full_decode_s']:.1f} | 1.00x |",
            f"| vtr.video.read_video | {dec['read_video_s']:.3f} | {dec['read_video_frames_per_s']:.1f} | "
            f"{dec['speedup']:.2f}x |",
            "",
        ]
    pre = result.get("prefill")
    if pre:
        lines += [
            f"Prefill, {pre['model']}, {pre['frames']} frames at {pre['size']} px, keep {pre['keep']:g} "
            f"(QuoTA scorer: {pre['quota_scorer']}, {pre['quota_scorer_s'] * 1e3:.0f} ms alone):",
            "",
            "| run | visual tokens | prefill s | LLM + operator s | speedup of that part | LLM FLOPs ideal | "
            "operator ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in pre["runs"].items():
            speed = f"{r['llm_speedup_measured']:.2f}x" if "llm_speedup_measured" in r else "1.00x"
            ideal = f"{r['llm_speedup_ideal_flops']:.2f}x" if "llm_speedup_ideal_flops" in r else "1.00x"
            op = f"{r['operator_s'] * 1e3:.1f}" if "operator_s" in r else "-"
            lines.append(
                f"| {name} | {r['visual_tokens']} | {r['prefill_s']:.3f} | {r['llm_prefill_s']:.3f} | {speed} | "
                f"{ideal} | {op} |"
            )
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["prefill"]["runs"]
    names = list(runs)
    base = runs["baseline"]["llm_prefill_s"]
    measured = [base / max(runs[n]["llm_prefill_s"], 1e-9) for n in names]
    ideal = [runs[n].get("llm_speedup_ideal_flops", 1.0) for n in names]
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, measured, 0.4, label="measured (prefill minus vision: LLM + operator)")
    ax.bar(x + 0.2, ideal, 0.4, label="analytic FLOPs ideal")
    ax.set_xticks(x, names)
    ax.set_ylabel("speedup vs no reduction")
    ax.set_title(f"{result['prefill']['frames']}-frame clip, keep {result['prefill']['keep']:g}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vtr bench video-speed``."""
    parser.add_argument("--video", default=None, help="video for the decoding part (default: a synthetic clip)")
    parser.add_argument("--decode-seconds", type=float, default=60.0, help="length of the synthetic clip (s)")
    parser.add_argument("--decode-frames", type=int, default=32, help="frames sampled in the decoding part")
    parser.add_argument("--frames", type=int, default=32, help="frames of the prefill clip (even; 32-64)")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels (a multiple of 28)")
    parser.add_argument("--keep", type=float, default=0.25, help="token budget of storm and quota (ratio)")
    parser.add_argument("--llm", default="0.5b", choices=sorted(LLM_SIZES), help="size class of the LLM")
    parser.add_argument("--vision", default="tiny", choices=sorted(VISION_SIZES), help="vision tower size")
    parser.add_argument("--quota-scorer", default="clip", choices=("clip", "constant"), help="QuoTA frame scorer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--skip", choices=("decoding", "prefill"), default=None, help="leave one part out")
    parser.add_argument("--out", default="bench_out/video_speed", help="folder for results.json/.md/.png")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns a process exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    if args.skip != "decoding":
        path = Path(args.video) if args.video else out / f"synthetic_{args.decode_seconds:g}s.mp4"
        if not args.video and not path.is_file():
            print(f"writing a {args.decode_seconds:g} s synthetic clip to {path}")
            write_synthetic_clip(path, args.decode_seconds)
        result["decoding"] = measure_decoding(path, args.decode_frames, args.repeats)
    if args.skip != "prefill":
        result["prefill"] = measure_prefill(args)
    md = _markdown(result)
    print(md)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(md)
    if "prefill" in result:
        _plot(result, out / "prefill.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (", prefill.png" if "prefill" in result else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser(prog="python -m vtr.bench.video_speed", description=__doc__)
    add_arguments(p)
    sys.exit(run(p.parse_args()))
