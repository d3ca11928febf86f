"""The bundled video model's training script (``scripts/train_tiny_vlm.py``): the hand-built training path equals
the stock processor and forward, shared-prefix packing scores each turn as if asked alone, batches are a pure
function of (seed, stage, step), the curriculum order, and the cell codes' positions. CI never trains."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_vlm.py"


@pytest.fixture(scope="module")
def T():
    spec = importlib.util.spec_from_file_location("train_tiny_vlm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny_vlm"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(T):
    model, processor = T.build_model(0)
    return model, processor, T.Batcher(processor.tokenizer, model.config)


def test_check_training_path_equals_processor_stock_forward_and_packing(T, built, capsys):
    model, processor, batcher = built
    T.check(model, processor, batcher)
    assert "packed turns score as asked alone" in capsys.readouterr().out


def test_packed_positions_and_mask_hand_case(T):
    """Prefix of 3 tokens, turns of 2 and 3 tokens, one padding column: turn 2 restarts at turn 1's positions
    and sees the prefix and itself; padding sees the prefix."""
    pos = torch.arange(9).view(1, 1, 9).expand(3, 1, 9)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    new_pos, attn = T.packed_positions_and_mask(pos, mask, [[3, 5]])
    assert new_pos[:, 0].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 8]] * 3
    a = attn[0, 0].int()
    assert a.shape == (9, 9)
    assert a[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # turn 1 token 2: prefix + itself so far
    assert a[6].tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0]  # turn 2 token 2: prefix + turn 2 only
    assert a[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # prefix stays causal
    assert a[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # padding row: the prefix, never an empty row


def test_batches_are_a_pure_function_of_seed_stage_step(T, built):
    _, _, batcher = built
    args = argparse.Namespace(qpi=4, qpv=3, p_desc=0.3, p_vdesc=0.3)
    mix = T.mixture(10**6, 100, args)

    def make(step: int):
        return T.Batch(batcher, np.random.default_rng([0, 0, step]), 3, 2, mix, args)

    a, b, c = make(7), make(7), make(8)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels_vid[0], b.labels_vid[0])
    assert not torch.equal(a.ids[:, : c.ids.shape[1]], c.ids[:, : a.ids.shape[1]])
    assert a.ids.shape[0] == 5 and len(a.starts) == 5
    for row, starts in zip(a.ids, a.starts, strict=True):  # each turn starts right after the shared prefix or an eos
        assert starts[0] == len(batcher.user) + len(batcher.visual(False)) or starts[0] == len(batcher.user) + len(
            batcher.visual(True)
        )
        assert all(int(row[s - 1]) == batcher.eos for s in starts[1:])


def test_curriculum_meets_tasks_in_order(T):
    args = argparse.Namespace(p_desc=0.3, p_vdesc=0.25)
    img, p_desc, vid, p_vdesc = T.mixture(0, 100, args)
    assert list(img) == ["colour"] and p_desc == 0 and not vid and p_vdesc == 0
    img, p_desc, vid, p_vdesc = T.mixture(650, 100, args)
    assert set(img) == set(T.IMAGE_WEIGHTS) and p_desc == 0.3 and not vid
    full = T.mixture(0, 0, args)
    assert full == (T.IMAGE_WEIGHTS, 0.3, T.VIDEO_WEIGHTS, 0.25)
    assert T.mixture(100 * (len(T.CURRICULUM) - 1), 100, args) == full


def test_cell_codes_position_bins(T):
    sym = T.Symbols(8, seed=0, positions=True)
    codes = sym.where(2 * 16, grid=4)  # two 4x4 frames: bins 0, 2, 4, 6 of the eight
    assert torch.allclose(codes[5], sym.row[2] + sym.col[2])
    assert torch.allclose(codes[16 + 15], sym.row[6] + sym.col[6])
    img = sym.where(64, grid=8)
    assert torch.allclose(img[8 * 3 + 7], sym.row[3] + sym.col[7])
    cc = torch.tensor([0, 1])
    cs = torch.tensor([0, 2])
    out = sym(torch.cat([cc, torch.zeros(14, dtype=torch.long)]), torch.cat([cs, torch.zeros(14, dtype=torch.long)]), 4)
    assert torch.allclose(out[1], sym.table[1 * sym.n_shapes + 2] + sym.row[0] + sym.col[2])
    labels_c = torch.cat([cc, torch.zeros(14, dtype=torch.long)])
    labels_s = torch.cat([cs, torch.zeros(14, dtype=torch.long)])
    exact, acc = sym.tower_loss([(out.detach(), labels_c, labels_s, 4)])
    assert acc == 1.0
    noisy, _ = sym.tower_loss([(out.detach() + 0.5 * torch.randn(out.shape), labels_c, labels_s, 4)])
    wrong, wrong_acc = sym.tower_loss([(out.detach(), labels_c.flip(0), labels_s.flip(0), 4)])
    assert float(exact) < float(noisy) and float(exact) < float(wrong) and wrong_acc == 0.0


def test_cell_codes_without_positions_are_the_label_vectors(T):
    sym = T.Symbols(8, seed=0)
    assert [n for n, _ in sym.named_parameters()] == ["table"]
    cc, cs = torch.tensor([3, 0]), torch.tensor([1, 0])
    assert torch.equal(sym(cc, cs, 8), sym.table[torch.tensor([3 * sym.n_shapes + 1, 0])])
