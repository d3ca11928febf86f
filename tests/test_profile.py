"""Analytic FLOPs (golden hand computations) and the efficiency benchmark smoke run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vtr.profile import decoder_decode_flops, decoder_prefill_flops, interleaved_medians, vit_flops


def _tiny_decoder() -> SimpleNamespace:
    """8-d, 2 layers, 2 query heads sharing 1 KV head (head_dim 4), gated MLP 16, vocabulary 10."""
    return SimpleNamespace(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=10,
        hidden_act="silu",
    )


def test_decoder_flops_hand_computed():
    cfg = _tiny_decoder()
    n = 3
    head_dim = 4
    proj = 2 * n * (8 * 2 * head_dim * 2 + 8 * 1 * head_dim * 2)  # q,o full; k,v with one kv head
    mlp = 2 * n * 8 * 16 * 3
    attn = 2 * 2 * 2 * head_dim * n * (n + 1) / 2
    assert decoder_prefill_flops(cfg, n) == 2 * (proj + mlp + attn) + 2 * 8 * 10


def test_decode_step_flops_hand_computed():
    """One new token per layer: its projections and MLP, attention over the layer's cache plus itself, LM head."""
    cfg = _tiny_decoder()
    head_dim = 4
    proj = 2 * (8 * 2 * head_dim * 2 + 8 * 1 * head_dim * 2)
    mlp = 2 * 8 * 16 * 3
    attn = [2 * 2 * 2 * head_dim * (kv + 1) for kv in (5, 2)]  # scores and weighted sum over kv + 1 keys
    assert decoder_decode_flops(cfg, [5, 2]) == 2 * (proj + mlp) + sum(attn) + 2 * 8 * 10
    assert decoder_decode_flops(cfg, [5, 5]) > decoder_decode_flops(cfg, [5, 2])


def test_vit_flops_hand_computed():
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=3)
    n = 5
    per_layer = 2 * n * 16 * 4 + 2 * n * 2 * 32 + 2 * 2 * 4 * n * n
    assert vit_flops(cfg, n) == 3 * per_layer
    assert vit_flops(cfg, n, layers=1) == per_layer


def test_fewer_tokens_fewer_flops():
    cfg = SimpleNamespace(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        hidden_act="silu",
    )
    assert decoder_prefill_flops(cfg, 100) > decoder_prefill_flops(cfg, 50) > 0


def test_interleaved_medians_orders_calls():
    calls = []
    interleaved_medians([lambda: calls.append("a"), lambda: calls.append("b")], repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3


@pytest.mark.slow
def test_efficiency_bench_smoke(tmp_path, capsys):
    from vtr.cli import main

    configs = ["divprune:keep=0.1", "tome:keep=192", "tome:keep=10", "fastv:k=1,r=0.5", "nope"]
    assert (
        main(
            [
                "bench",
                "efficiency",
                "--llm",
                "tiny",
                "--vision",
                "tiny",
                "--repeats",
                "1",
                "--decode-steps",
                "2",
                "--configs",
                *configs,
                "--scaling",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["baseline", "divprune:keep=0.1", "tome:keep=192", "fastv:k=1,r=0.5"]
    assert rows["divprune:keep=0.1"]["visual_tokens"] == 58 and rows["tome:keep=192"]["visual_tokens"] == 192
    # FastV: the LLM input is whole, the layers from k on see half; KV bytes shrink accordingly.
    assert rows["fastv:k=1,r=0.5"]["visual_tokens"] == 576 and rows["fastv:k=1,r=0.5"]["mean_layer_tokens"] == 432
    assert rows["fastv:k=1,r=0.5"]["kv_bytes"] < rows["baseline"]["kv_bytes"]
    # ToMe shrinks the tower's FLOPs, DivPrune only the LLM's; every reduced configuration has ideal > 1.
    assert rows["tome:keep=192"]["vision_ideal"] > 1 and rows["divprune:keep=0.1"]["vision_ideal"] == 1
    assert all(r["ideal"] > 1 for name, r in rows.items() if name != "baseline")
    assert "tome:keep=10" in res["skipped"] and "nope" in res["skipped"]
    assert len(res["scaling"]["seconds"]) == len(res["scaling"]["lengths"])
    assert "| baseline | 576 / 576 |" in capsys.readouterr().out
