"""``vtr bench quality``: the run plan (keep sweeps, per-frame and whole-clip budgets, recipes set by their own
parameters), the description scorer, bad input, and small end-to-end runs of each task on the bundled models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import vtr
from vtr.bench import quality, synthqa
from vtr.cli import main
from vtr.models import bundled_model_dir, load_model


def _needs(kind: str):
    path = bundled_model_dir(kind)
    return pytest.mark.skipif(not (path / "config.json").is_file(), reason=f"bundled {kind} model absent ({path})")


def test_parse_spec_casts_values_and_rejects_malformed_text():
    assert vtr.recipes.parse_spec("tome") == ("tome", {})
    assert vtr.recipes.parse_spec("tome:keep=192,prop_attn=false,mode=x,r=0.5,s=none") == (
        "tome",
        {"keep": 192, "prop_attn": False, "mode": "x", "r": 0.5, "s": None},
    )
    for bad in ("tome:keep", ":keep=1", "tome:=3"):
        with pytest.raises(ValueError, match="recipe\\[:field=value"):
            vtr.recipes.parse_spec(bad)


def test_plan_sweeps_bare_names_and_runs_settings_once():
    plan = quality._plan(["divprune", "mustdrop", "fastv:r=0.5"], [0.5, 0.25])
    assert plan[:2] == [("divprune", "divprune", {"keep": 0.5}), ("divprune", "divprune", {"keep": 0.25})]
    mustdrop = [p for p in plan if p[0] == "mustdrop"]
    assert [p[1] for p in mustdrop] == [f"mustdrop:{s}" for s in quality.DEFAULT_SETTINGS["mustdrop"]]
    assert mustdrop[-1][2] == {"preset": 64}
    assert plan[-1] == ("fastv", "fastv:r=0.5", {"r": 0.5})


def test_plan_for_videos_has_per_frame_and_whole_clip_budgets():
    plan = quality._plan(["random", "storm"], [0.25], quality.VIDEO_SCOPES)
    assert plan[:2] == [
        ("random", "random (per frame)", {"keep": 0.25, "scope": "frame"}),
        ("random", "random (whole clip)", {"keep": 0.25, "scope": "image"}),
    ]
    assert ("storm", "storm:k=1,p=2", {"k": 1, "p": 2}) in plan


def test_plan_labels_a_yaml_recipe_by_its_name():
    path = str(Path(__file__).resolve().parents[1] / "configs" / "quota_word.yaml")
    plan = quality._plan([path], [0.25], quality.VIDEO_SCOPES)
    assert [(label, overrides) for _, label, overrides in plan] == [
        ("quota_word (per frame)", {"keep": 0.25, "scope": "frame"}),
        ("quota_word (whole clip)", {"keep": 0.25, "scope": "image"}),
    ]
    assert all(recipe == path for recipe, _, _ in plan)


def test_plan_rejects_unknown_recipes_and_bad_keeps():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*registered"):
        quality._plan(["nope"], [0.5])
    with pytest.raises(ValueError, match="keep ratios must be in \\(0, 1\\], got 1.5"):
        quality._plan(["random"], [1.5])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "audio"], "argument --task: invalid choice: 'audio'"),
        (["--keep", "0"], "--keep takes ratios in (0, 1], got 0"),
        (["--keep", "1.5"], "--keep takes ratios in (0, 1], got 1.5"),
        (["--keep", "0.5", "half"], "--keep takes ratios in (0, 1], got 'half'"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "quality", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_and_task_are_one_line_errors_and_write_nothing(capsys, tmp_path):
    assert main(["bench", "quality", "--recipes", "divprune", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown recipe 'nope' in --recipes; registered:" in capsys.readouterr().out
    args = argparse.Namespace(task="sound", keep=[0.5], recipes=None)
    assert quality.run(args) == 2
    assert "unknown task 'sound'; expected one of ('image', 'describe', 'video')" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_description_scores_on_hand_cases():
    truth = "a red circle at the top left , a blue square on the right ."

    class S:
        answer = truth

    # Exact: P = R = F1 = 1.  One of two right, one wrong location: matched 1 of 2 predicted, of 2 true.
    exact = quality.description_scores([S()], [truth], with_location=True)
    assert exact == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "exact": 1.0}
    half = quality.description_scores([S()], ["a red circle at the top left , a blue square at the top ."],
                                      with_location=True)  # fmt: skip
    assert half["precision"] == half["recall"] == half["f1"] == 0.5 and half["exact"] == 0.0
    # Without locations the wrong location still matches; a third, invented object lowers precision only.
    extra = quality.description_scores(
        [S()], ["a red circle at the top left , a blue square at the top , a green star ."], with_location=False
    )
    assert extra["recall"] == 1.0 and extra["precision"] == pytest.approx(2 / 3)
    assert extra["f1"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))
    # Micro-averaged over items: counts add up before the ratios.
    two = quality.description_scores([S(), S()], [truth, "a red circle at the top left ."], with_location=True)
    assert two["precision"] == 1.0 and two["recall"] == pytest.approx(3 / 4) and two["exact"] == 0.5


def _run(tmp_path, task: str, recipes: list[str], *extra: str) -> dict:
    argv = ["bench", "quality", "--task", task, "--n", "8", "--batch-size", "4", "--keep", "0.5"]
    assert main([*argv, "--recipes", *recipes, "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / f"quality_{task}.json").read_text())


@_needs("image")
def test_image_task_places_fastv_by_its_layer_averaged_tokens(tmp_path):
    res = _run(tmp_path, "image", ["divprune", "fastv:r=0.5"])
    ref = res["reference"]
    assert ref["n"] == 8 and ref["visual_tokens"] == ref["layer_tokens"] == 196
    div = res["rows"]["divprune"]["runs"]["0.5"]
    assert div["visual_tokens"] == div["layer_tokens"] == 98  # matched budgets
    fastv = res["rows"]["fastv:r=0.5"]
    assert fastv["keep"] is None and fastv["runs"]["-"]["settings"] == {"r": 0.5}
    # FastV keeps all 196 at the LLM input and the top half from layer K=2 on: (2 * 196 + (L - 2) * 98) / L.
    n_layers = load_model(None)[0].config.text_config.num_hidden_layers
    assert fastv["runs"]["-"]["visual_tokens"] == 196
    assert fastv["runs"]["-"]["layer_tokens"] == pytest.approx((2 * 196 + (n_layers - 2) * 98) / n_layers)
    md = (tmp_path / "quality_image.md").read_text()
    assert "| divprune | " in md and "| fastv:r=0.5 | " in md and "Recipes set by their own parameters" in md
    assert (tmp_path / "quality_image.png").stat().st_size > 1000


@_needs("image")
def test_a_recipe_that_cannot_run_is_listed_as_skipped(tmp_path, monkeypatch):
    def refuse(model, recipe, /, **overrides):
        raise ValueError(f"{recipe} cannot act on this model")

    monkeypatch.setattr(vtr, "wrap", refuse)
    res = _run(tmp_path, "image", ["divprune", "random"], "--no-plot")
    assert res["rows"] == {}
    assert res["skipped"] == {
        "divprune": "divprune cannot act on this model",
        "random": "random cannot act on this model",
    }
    assert "Skipped: divprune: divprune cannot act" in (tmp_path / "quality_image.md").read_text()


@_needs("video")
def test_describe_task_reports_precision_recall_f1(tmp_path):
    res = _run(tmp_path, "describe", ["divprune"], "--no-plot")
    ref = res["reference"]
    assert set(ref["describe"]) == {"precision", "recall", "f1", "exact"}
    assert ref["score"] == ref["describe"]["f1"] and 0 <= ref["score"] <= 1
    assert ref["visual_tokens"] == (synthqa.IMAGE_SIZE // synthqa.CELL) ** 2
    assert not (tmp_path / "quality_describe.png").exists()
    assert "| precision | recall | f1 | exact |" in (tmp_path / "quality_describe.md").read_text()


@_needs("video")
def test_video_task_has_per_frame_and_whole_clip_rows_and_storm_settings(tmp_path):
    res = _run(tmp_path, "video", ["divprune", "storm:k=2"], "--no-plot")
    ref = res["reference"]
    per_clip = synthqa.VIDEO_GROUPS * (synthqa.VIDEO_SIZE // synthqa.CELL) ** 2
    assert ref["visual_tokens"] == per_clip
    assert set(ref["per_type"]) <= {"few_frames", "exist", "when", "describe"}
    assert set(res["rows"]) == {"divprune (per frame)", "divprune (whole clip)", "storm:k=2"}
    for label in ("divprune (per frame)", "divprune (whole clip)"):
        assert res["rows"][label]["runs"]["0.5"]["visual_tokens"] == per_clip // 2
    assert res["rows"]["storm:k=2"]["runs"]["-"]["visual_tokens"] == per_clip // 2
