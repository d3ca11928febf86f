"""Vision-encoder facts per encoder type: how each block's pieces are called (for the block runner).

Each ``*_parts`` function takes one encoder block and returns :class:`~vtr.adapters.vision.BlockParts`
built from the block's own modules and weights, so the runner computes exactly what the block computes
(checked by the identity contracts) while it can stop between attention and MLP, mask padded keys and
read q/k/v for signals.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vtr.adapters.vision import BlockParts

__all__ = ["clip_parts", "internvit_parts", "patch_units", "qwen_vit_parts", "timm_parts", "unit_grid_2x2"]


def _heads(x: Tensor, h: int) -> Tensor:
    """``[S, L, H*d] -> [S, H, L, d]``."""
    s, length, _ = x.shape
    return x.view(s, length, h, -1).transpose(1, 2)


def clip_parts(layer: nn.Module) -> BlockParts:
    """CLIP and SigLIP encoder layers (``layer_norm1``, ``self_attn`` with q/k/v/out projections, ``mlp``)."""
    attn = layer.self_attn
    h = attn.num_heads

    def qkv(x: Tensor, cos, sin):
        return _heads(attn.q_proj(x), h), _heads(attn.k_proj(x), h), _heads(attn.v_proj(x), h)

    return BlockParts(
        norm1=layer.layer_norm1, qkv=qkv, out=attn.out_proj, scale=attn.scale, norm2=layer.layer_norm2, mlp=layer.mlp
    )


def internvit_parts(layer: nn.Module) -> BlockParts:
    """InternViT layers (q/k norms on the full width, ``projection_layer``, LayerScale ``lambda_1/2``)."""
    attn = layer.attention
    h = attn.num_heads

    def qkv(x: Tensor, cos, sin):
        q = attn.q_norm(attn.q_proj(x))
        k = attn.k_norm(attn.k_proj(x))
        return _heads(q, h), _heads(k, h), _heads(attn.v_proj(x), h)

    def out(o: Tensor) -> Tensor:
        return attn.projection_dropout(attn.projection_layer(o))

    def mlp(x: Tensor) -> Tensor:
        return layer.dropout(layer.mlp(x))

    lam2 = layer.lambda_2
    return BlockParts(
        norm1=layer.layernorm_before,
        qkv=qkv,
        out=out,
        scale=attn.scale,
        norm2=layer.layernorm_after,
        mlp=mlp,
        ls1=lambda a: layer.lambda_1 * a,
        ls2=None if lam2 is None else (lambda m: lam2 * m),
    )


def qwen_vit_parts(block: nn.Module) -> BlockParts:
    """Qwen2-VL / Qwen2.5-VL vision blocks (fused ``qkv``, 2-D rotary embedding, ``proj``)."""
    attn = block.attn
    h = attn.num_heads
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision

    def qkv(x: Tensor, cos: Tensor, sin: Tensor):
        s, length, _ = x.shape
        q, k, v = attn.qkv(x).reshape(s, length, 3, h, -1).unbind(2)  # each [S, L, H, d]
        q, k = rope(q, k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    return BlockParts(norm1=block.norm1, qkv=qkv, out=attn.proj, scale=attn.scaling, norm2=block.norm2, mlp=block.mlp)


def timm_parts(block: nn.Module) -> BlockParts:
    """timm ``Block`` (fused ``qkv``, optional q/k norms, LayerScale ``ls1/ls2``, drop paths inactive in eval)."""
    attn = block.attn
    h = attn.num_heads

    def qkv(x: Tensor, cos, sin):
        s, length, _ = x.shape
        q, k, v = attn.qkv(x).reshape(s, length, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out(o: Tensor) -> Tensor:
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated timm attention is not supported")
        return attn.proj_drop(attn.proj(attn.norm(o)))

    return BlockParts(
        norm1=block.norm1,
        qkv=qkv,
        out=out,
        scale=attn.scale,
        norm2=block.norm2,
        mlp=block.mlp,
        ls1=lambda a: block.drop_path1(block.ls1(a)),
        ls2=lambda m: block.drop_path2(block.ls2(m)),
    )


def patch_units(grid: tuple[int, int]) -> Tensor:
    """One patch per unit: ``[h*w, 1]``."""
    return torch.arange(grid[0] * grid[1]).view(-1, 1)


def unit_grid_2x2(grid: tuple[int, int]) -> Tensor:
    """Qwen2-VL order: the processor emits the 4 patches of each 2x2 unit consecutively: ``[h*w/4, 4]``."""
    return torch.arange(grid[0] * grid[1]).view(-1, 4)
