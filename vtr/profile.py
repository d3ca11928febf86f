"""Analytic FLOPs and wall-clock measurement helpers (baseline vs reduced, as ratios in one run)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "decoder_decode_flops",
    "decoder_layerwise_flops",
    "decoder_prefill_flops",
    "interleaved_medians",
    "vit_block_flops",
    "vit_flops",
]


def _mlp_matrices(cfg: Any) -> int:
    # Gated MLPs (Llama/Qwen: gate, up, down) have three hidden x intermediate matrices, plain MLPs two.
    gated = getattr(cfg, "hidden_act", "gelu") in ("silu", "swiglu") or hasattr(cfg, "mlp_bias")
    return 3 if gated else 2


def decoder_prefill_flops(cfg: Any, n_tokens: int, *, layers: int | None = None, head: bool = True) -> float:
    """FLOPs of a decoder-only LM prefill over ``n_tokens`` (2 FLOPs per multiply-add).

    Counts the q/k/v/o projections, the MLP, attention scores and the weighted sum (causal: half of the
    square) of ``layers`` layers (default all), and the LM head for the last position only (``head``). Norms and
    RoPE are ignored (< 1%).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_hidden_layers if layers is None else layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    proj = 2 * n_tokens * (h * heads * head_dim * 2 + h * kv * head_dim * 2)
    mlp = 2 * n_tokens * h * i * _mlp_matrices(cfg)
    attn = 2 * 2 * heads * head_dim * n_tokens * (n_tokens + 1) / 2
    lm_head = 2 * h * cfg.vocab_size if head else 0
    return float(layers * (proj + mlp + attn) + lm_head)


def decoder_layerwise_flops(cfg: Any, rows: list[int]) -> float:
    """Prefill FLOPs when layer ``l`` sees ``rows[l]`` rows (operators inside the LLM), LM head included."""
    return (
        sum(decoder_prefill_flops(cfg, n, layers=1, head=False) for n in rows) + 2.0 * cfg.hidden_size * cfg.vocab_size
    )


def decoder_decode_flops(cfg: Any, kv_rows: list[int]) -> float:
    """FLOPs of one decoding step (one new token) when layer ``l`` attends to ``kv_rows[l]`` cached rows:
    projections and MLP of one row per layer, its attention over the cache, and the LM head."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    one_row = decoder_prefill_flops(cfg, 1, layers=1, head=False) - 2 * 2 * heads * head_dim  # no self-attn term
    attn = sum(2 * 2 * heads * head_dim * (n + 1) for n in kv_rows)
    return float(len(kv_rows) * one_row + attn + 2 * h * cfg.vocab_size)


def vit_block_flops(cfg: Any, n_in: int, n_mid: int | None = None) -> float:
    """FLOPs of one ViT block whose attention sees ``n_in`` tokens and whose MLP sees ``n_mid`` (default ``n_in``;
    fewer when a token merger acts between them, e.g. ToMe)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    n_mid = n_in if n_mid is None else n_mid
    return float(2 * n_in * 4 * h * h + 2 * 2 * h * n_in * n_in + 2 * n_mid * 2 * h * i)


def vit_flops(cfg: Any, n_tokens: int, layers: int | None = None) -> float:
    """FLOPs of ``layers`` (default: all) bidirectional ViT blocks over ``n_tokens`` tokens."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_hidden_layers if layers is None else layers
    proj = 2 * n_tokens * 4 * h * h
    mlp = 2 * n_tokens * 2 * h * i
    attn = 2 * 2 * h * n_tokens * n_tokens
    return float(layers * (proj + mlp + attn))


def interleaved_medians(fns: list[Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Median wall time of each function, timing them round-robin so background load affects all alike."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
