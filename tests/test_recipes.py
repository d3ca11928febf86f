"""Recipe registry, overrides and YAML loading."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtr
from vtr import recipes
from vtr.ops import DivPrune, Pool, Random

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_builtin_names():
    assert {"divprune", "random", "pool"} <= set(recipes.names())


def test_get_applies_overrides():
    (op,) = recipes.get("divprune", keep=0.5, scope="sample")
    assert op == DivPrune(keep=0.5, scope="sample")


def test_unknown_recipe_lists_available():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*divprune"):
        recipes.get("nope")


def test_unknown_override_lists_accepted():
    with pytest.raises(ValueError, match="unknown option .alpha.*accepted: backend, keep, scope"):
        recipes.get("divprune", alpha=1)


def test_build_accepts_ops_and_positions():
    rec = recipes.build([Pool(keep=0.5), Random(keep=0.2)], positions="compact", keep=0.3)
    assert [op.keep for op in rec.ops] == [0.3, 0.3] and rec.positions == "compact"
    with pytest.raises(ValueError, match="positions must be one of"):
        recipes.build("divprune", positions="weird")
    with pytest.raises(TypeError, match="recipe must be"):
        recipes.build(42)


def test_shipped_configs_load():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ should ship example recipes"
    for f in files:
        rec = vtr.load_recipe(f)
        assert rec.ops


def test_yaml_chain(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: mine\npositions: compact\nops:\n  - op: Pool\n    keep: 0.5\n  - op: DivPrune\n    keep: 16\n")
    rec = vtr.load_recipe(f)
    assert rec.ops == [Pool(keep=0.5), DivPrune(keep=16)] and rec.positions == "compact" and rec.name == "mine"


def test_yaml_named_recipe_with_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("recipe: random\noverrides:\n  keep: 0.1\n  seed: 3\n")
    assert vtr.load_recipe(f).ops == [Random(keep=0.1, seed=3)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("recipe: divprune\nbudget: 3\n", r"unknown key\(s\) \['budget'\]; allowed keys: \['name'"),
        ("ops:\n  - op: DivPrune\n    kep: 0.1\n", r"unknown key\(s\) \['kep'\]; allowed keys: \['keep', 'scope'"),
        ("ops:\n  - op: FooPrune\n", r"unknown operator 'FooPrune'; allowed: \["),
        ("ops:\n  - op: DivPrune\n    keep: 2.0\n", r"keep must be a float in \(0, 1\].*2.0"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("recipe: divprune\nops: []\n", "exactly one of 'ops'"),
    ],
)
def test_yaml_errors(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        vtr.load_recipe(f)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("recipe: divprune\noverrides:\n  keep: [0.1\n", 4),  # unclosed flow sequence, found at the end
        ("ops:\n  - op: DivPrune\n   keep: 0.1\n", 3),  # bad indentation
        ("recipe: divprune\n\tkeep: 0.1\n", 2),  # a tab
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=rf"broken\.yaml: malformed YAML at line {line}, column \d+: ") as err:
        vtr.load_recipe(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("recipe: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError|python/object"):
        vtr.load_recipe(f)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        vtr.load_recipe("no/such/file.yaml")


def test_wrap_level_options():
    rec = recipes.build("divprune", drop_newlines=True, positions="compact", keep=0.2)
    assert (rec.options, rec.positions, rec.ops[0].keep) == ({"drop_newlines": True}, "compact", 0.2)
    assert recipes.build("divprune").options == {}


def test_family_option_validated_by_the_adapter():
    from vtr.testing import tiny_llava_next

    model, _ = tiny_llava_next()
    with pytest.raises(TypeError, match="drop_newlines must be True or False, got 'yes'"):
        vtr.wrap(model, "divprune", drop_newlines="yes")
    assert not vtr.is_wrapped(model)


def test_yaml_family_options(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("options: {drop_newlines: true}\nrecipe: pool\n")
    assert vtr.load_recipe(f).options == {"drop_newlines": True}
    f.write_text("options: {drop_newline: true}\nrecipe: pool\n")
    with pytest.raises(ValueError, match=r"unknown family option\(s\) \[.drop_newline.\]; known"):
        vtr.load_recipe(f)


def test_drop_newlines_refused_without_newline_rows():
    from vtr.testing import tiny_llava

    model, _ = tiny_llava()
    with pytest.raises(ValueError, match=r"option drop_newlines=True does not apply to the LLaVA-1.5 adapter"):
        vtr.wrap(model, "divprune", drop_newlines=True)
    assert not vtr.is_wrapped(model)
