"""The ``vtr`` command: run, recipes, and its error messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vtr
from vtr.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample.png"


def run(*args: str, prompt: str = "What colour is the circle?") -> int:
    return main(["run", "--image", str(SAMPLE), "--prompt", prompt, *args])


def visual_tokens(out: str) -> tuple[int, int]:
    """(before, after) from the ``visual tokens`` row of ``vtr run``."""
    line = next(line for line in out.splitlines() if line.startswith("visual tokens"))
    return int(line.split()[2]), int(line.split()[3])


def test_run_prints_both_answers_tokens_and_timings(capsys):
    assert run("--keep", "0.25") == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "reduced (divprune)" in out
    before, after = visual_tokens(out)
    assert after == round(0.25 * before)
    assert "prefill ms" in out and "generate ms" in out and "LLM prefill GFLOPs" in out


def test_default_model_answers_meaningfully(capsys):
    """The bundled trained model sees a purple circle in the sample image, with and without reduction."""
    assert run("--keep", "0.25") == 0
    answer_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("answer"))
    assert answer_row.split()[1:] == ["purple", "purple"]


def test_run_with_yaml_recipe_and_compact_positions(capsys, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("ops:\n  - op: Pool\n    keep: 0.25\n")
    assert run("--recipe", str(f), "--positions", "compact", "--max-new-tokens", "1", prompt="what ?") == 0
    assert "Pool(keep=0.25" in capsys.readouterr().out


def test_recipes_lists_names(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("divprune", "random", "pool"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "missing.png"], "image file not found: missing.png"),
        (["--recipe", "nope"], f"unknown recipe 'nope'; available recipes: {', '.join(vtr.recipes.names())}"),
    ],
)
def test_run_errors(capsys, argv, message):
    base = {"--image": str(SAMPLE), "--prompt": "what ?"}
    for k, v in zip(argv[::2], argv[1::2], strict=True):
        base[k] = v
    assert main(["run", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_corrupt_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    assert main(["run", "--image", str(bad), "--prompt", "what ?"]) == 2
    assert f"cannot read image {bad}: not a valid image file" in capsys.readouterr().err


@pytest.mark.parametrize(("keep", "message"), [("0", "got 0"), ("1.5", "got 1.5"), ("x", "got 'x'")])
def test_bad_keep(capsys, keep, message):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--image", str(SAMPLE), "--prompt", "what ?", "--keep", keep])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--keep" in err and message in err


def test_console_script_installed():
    exe = shutil.which("vtr")
    cmd = [exe] if exe else [sys.executable, "-m", "vtr.cli"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "run" in res.stdout and "bench" in res.stdout


@pytest.mark.parametrize("factory", ["tiny_qwen2_vl", "tiny_internvl"])
def test_run_with_local_model_dir(capsys, tmp_path, factory):
    import vtr.testing

    model, processor = getattr(vtr.testing, factory)()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert run("--model", str(tmp_path), "--keep", "0.25", "--max-new-tokens", "2", prompt="what colour ?") == 0
    before, after = visual_tokens(capsys.readouterr().out)
    assert after == round(0.25 * before) and before > 0


def test_run_with_a_folder_that_is_not_a_model(capsys, tmp_path):
    assert main(["run", "--model", str(tmp_path), "--image", str(SAMPLE), "--prompt", "what ?"]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def test_run_with_a_missing_model_path_is_one_line(capsys):
    assert run("--model", "/no/such/path") == 2
    err = capsys.readouterr().err
    assert err.startswith("vtr: error: --model /no/such/path: no such folder") and err.count("\n") == 1
    assert "Traceback" not in err


def test_run_with_an_unresolvable_hub_id_is_one_line(capsys, monkeypatch):
    import huggingface_hub

    # Offline: transformers must resolve the id from the local cache, which does not have it (no network here).
    monkeypatch.setattr(sys.modules[huggingface_hub.is_offline_mode.__module__], "HF_HUB_OFFLINE", True)
    assert run("--model", "vtr-tests/no-such-model") == 2
    err = capsys.readouterr().err
    assert err.startswith("vtr: error: --model vtr-tests/no-such-model: cannot load it") and err.count("\n") == 1


def test_missing_bundled_model_is_an_error_not_random_weights(tmp_path, monkeypatch):
    from vtr.models import load_model

    monkeypatch.setenv("VTR_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"the bundled model is missing: no config.json in {tmp_path}"):
        load_model(None)
