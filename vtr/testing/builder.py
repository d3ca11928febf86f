"""The one builder behind every tiny factory: config fields shared by all families, seeding, finishing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["build", "text_fields", "vision_fields"]


def text_fields(tokenizer, hidden: int, layers: int, *, mlp_ratio: int = 2, max_positions: int = 4096) -> dict:
    """Config fields every tiny decoder shares (4 heads, 2 KV heads, the tokenizer's special ids)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * mlp_ratio,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def vision_fields(hidden: int, layers: int, image_size: Any, patch_size: Any) -> dict:
    """Config fields every tiny CLIP/SigLIP/InternViT tower shares (4 heads, MLP ratio 2)."""
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def build(
    model_cls: type,
    config: Any,
    tokenizer: Any,
    processor: Any,
    *,
    seed: int,
    attn_implementation: str,
    init: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    """Seed, instantiate ``model_cls(config)``, run ``init(model)`` (family-specific weight touches), set the
    attention backend and the generation config from the tokenizer; return ``(model in eval mode, processor)``."""
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = model_cls(config)
    if init is not None:
        with torch.no_grad():
            init(model)
    model.set_attn_implementation(attn_implementation)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    return model.eval(), processor
