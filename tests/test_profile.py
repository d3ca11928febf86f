"""Analytic FLOPs (golden hand computations) and the efficiency benchmark smoke run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vtr.profile import decoder_prefill_flops, interleaved_medians, vit_flops


def test_decoder_flops_hand_computed():
    cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=10, hidden_act="silu")
    n = 3
    head_dim = 4
    proj = 2 * n * (8 * 2 * head_dim * 2 + 8 * 1 * head_dim * 2)  # q,o full; k,v with one kv head
    mlp = 2 * n * 8 * 16 * 3
    attn = 2 * 2 * 2 * head_dim * n * (n + 1) / 2
    assert decoder_prefill_flops(cfg, n) == 2 * (proj + mlp + attn) + 2 * 8 * 10


def test_vit_flops_hand_computed():
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=3)
    n = 5
    per_layer = 2 * n * 16 * 4 + 2 * n * 2 * 32 + 2 * 2 * 4 * n * n
    assert vit_flops(cfg, n) == 3 * per_layer
    assert vit_flops(cfg, n, layers=1) == per_layer


def test_fewer_tokens_fewer_flops():
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=100, hidden_act="silu")
    assert decoder_prefill_flops(cfg, 100) > decoder_prefill_flops(cfg, 50) > 0


def test_interleaved_medians_orders_calls():
    calls = []
    interleaved_medians([lambda: calls.append("a"), lambda: calls.append("b")], repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3


@pytest.mark.slow
def test_efficiency_bench_smoke(tmp_path, capsys):
    from vtr.cli import main

    assert main(["bench", "efficiency", "--llm", "tiny", "--vision", "tiny", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["visual_tokens"] == [576, 58]
    assert res["speedup_ideal_flops"] > 1
    assert "| visual tokens | 576 | 58 |" in capsys.readouterr().out
