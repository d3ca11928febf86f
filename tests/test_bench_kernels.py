"""``vtr bench kernels``: the official DivPrune loop is loaded from a checkout outside vtr, or clearly absent.

Timings are not asserted (shared CPU); only which rows exist, that picks agree, and the messages.
"""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest
import torch

from vtr.bench import kernels as bench
from vtr.cli import main

# A stand-in checkout laid out like github.com/vbdi/divprune: the two methods the bench compiles, written here
# as a plain official-style loop (full distance matrix, min over the whole selected set at every step).
FAKE_ARCH = textwrap.dedent(
    """
    import torch
    from llava.model.multimodal_encoder.builder import build_vision_tower  # never executed by the bench


    class LlavaMetaForCausalLM:
        def pairwise_cosine_similarity(self, matrix):
            unit = matrix / matrix.norm(dim=1, keepdim=True)
            return unit @ unit.t()

        def DivPrune(self, visual_feature_vectors, image_feature_length, cosine_matrix=None, threshold_ratio=0.1):
            n_keep = int(round(threshold_ratio * image_feature_length))
            if cosine_matrix is None:
                cosine_matrix = 1.0 - self.pairwise_cosine_similarity(visual_feature_vectors)
            picks = []
            for i in range(n_keep):
                if i == 0:
                    scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
                else:
                    scores = cosine_matrix[torch.tensor(picks)].min(dim=0).values
                picks.append(int(torch.argmax(scores)))
            return torch.tensor(picks), cosine_matrix
    """
)


@pytest.fixture
def fake_checkout(tmp_path):
    arch = tmp_path / "divprune" / bench.OFFICIAL_FILE
    arch.parent.mkdir(parents=True)
    arch.write_text(FAKE_ARCH)
    return tmp_path / "divprune"


def bench_args(tmp_path, official=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--quick", "--repeats", "1", "--warmup", "0", "--no-progress", "--device", "cpu"]
    argv += ["--out", str(tmp_path / "out")] + (["--official", str(official)] if official else [])
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(bench, "QUICK_SHAPES", ((40, 5, 8),))
    monkeypatch.delenv(bench.OFFICIAL_ENV, raising=False)


def test_official_loop_is_compiled_from_the_checkout(tmp_path, fake_checkout):
    official = bench.load_official(fake_checkout)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    picks, _ = official.DivPrune(x, 30, threshold_ratio=7 / 30)
    assert sorted(picks.tolist()) == bench.naive_official_select(x, 7).sort().values.tolist()
    assert bench.load_official(fake_checkout / bench.OFFICIAL_FILE).source.endswith("llava_arch.py")


def test_bench_compares_with_the_official_loop(tmp_path, fake_checkout, capsys):
    assert bench.run(bench_args(tmp_path, official=fake_checkout)) == 0
    data = json.loads((tmp_path / "out" / "kernels.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["official"]["total_ms"] is not None and rows["official"]["same_picks_as_fallback"] is True
    assert rows["naive"]["same_picks_as_fallback"] is True
    assert data["official"].endswith("llava_arch.py")
    assert "| vs official |" in data["table"]


def test_bench_says_when_the_official_loop_is_absent(tmp_path, capsys):
    assert bench.run(bench_args(tmp_path)) == 0
    data = json.loads((tmp_path / "out" / "kernels.json").read_text())
    row = next(r for r in data["rows"] if r["method"] == "official")
    assert row["total_ms"] is None and "no official checkout" in row["note"] and bench.OFFICIAL_ENV in row["note"]
    assert "| vs naive |" in data["table"] and data["official"] is None
    assert "official DivPrune loop: not compared" in capsys.readouterr().err


def test_official_path_from_the_environment(tmp_path, fake_checkout, monkeypatch):
    monkeypatch.setenv(bench.OFFICIAL_ENV, str(fake_checkout))
    assert bench_args(tmp_path).official == str(fake_checkout)


def test_bad_official_paths(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="official DivPrune not found: .*nowhere.*vbdi/divprune"):
        bench.load_official(tmp_path / "nowhere")
    other = tmp_path / "llava_arch.py"
    other.write_text("def something():\n    pass\n")
    with pytest.raises(ValueError, match="no pairwise_cosine_similarity, DivPrune method"):
        bench.load_official(other)
    assert main(["bench", "kernels", "--quick", "--official", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtr: error: official DivPrune not found") and err.count("\n") == 1
