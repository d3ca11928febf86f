"""Named recipes (operator chains) and YAML loading.

A recipe is a list of operators plus wrap-level options: ``positions`` (every model) and family options
(e.g. ``drop_newlines`` for LLaVA-NeXT/OneVision), which the model's adapter validates at ``wrap``. Named
recipes are factories registered with :func:`register`; ``vtr recipes`` lists them.

YAML format (``configs/*.yaml``)::

    name: divprune_llava          # optional
    description: ...              # optional
    positions: original           # optional: "original" (default) or "compact"
    options: {drop_newlines: true}   # optional family options (validated by the model's adapter)
    ops:                          # either an explicit chain ...
      - op: DivPrune
        keep: 0.098
    recipe: divprune              # ... or a named recipe
    overrides: {keep: 0.1}        # optional overrides for a named recipe
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vtr import ops as _ops
from vtr.ops.base import Operator

__all__ = [
    "POSITIONS",
    "WRAP_OPTIONS",
    "Recipe",
    "build",
    "describe",
    "get",
    "load_recipe",
    "names",
    "operator_classes",
    "parse_spec",
    "register",
]

POSITIONS = ("original", "compact")
#: Options of a wrapped model as a whole, not of one operator (family options go to ``Recipe.options``).
WRAP_OPTIONS = ("positions",)


@dataclass
class Recipe:
    """Operators plus wrap-level options."""

    ops: list[Operator]
    positions: str = "original"
    name: str | None = None
    description: str = ""
    #: Family options (e.g. ``{"drop_newlines": True}``), validated by the model's adapter at ``wrap``.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.options, dict):
            raise TypeError(f"Recipe.options must be a mapping of family options, got {self.options!r}")


_REGISTRY: dict[str, tuple[Callable[[], list[Operator]], str]] = {}


def register(name: str, factory: Callable[[], list[Operator]], description: str = "") -> None:
    """Register a named recipe (lowercase name -> factory returning fresh operators)."""
    if name != name.lower():
        raise ValueError(f"recipe names are lowercase, got {name!r}")
    _REGISTRY[name] = (factory, description)


def names() -> list[str]:
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    return {n: _REGISTRY[n][1] for n in names()}


def operator_classes() -> dict[str, type[Operator]]:
    """Operator classes that YAML ``op:`` entries may name."""
    out: dict[str, type[Operator]] = {}
    for name in dir(_ops):
        obj = getattr(_ops, name)
        if isinstance(obj, type) and issubclass(obj, Operator) and dataclasses.is_dataclass(obj):
            if obj.__name__ not in ("Operator", "BudgetOperator"):
                out[obj.__name__] = obj
    return out


def get(name: str, **overrides: Any) -> list[Operator]:
    """Fresh operators of the named recipe with ``overrides`` applied (see :func:`apply_overrides`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}; available recipes: {', '.join(names())}")
    return apply_overrides(_REGISTRY[name][0](), overrides)


def operator_fields(chain: list[Operator]) -> set[str]:
    """Field names any operator of ``chain`` accepts as an override."""
    accepted: set[str] = set()
    for op in chain:
        accepted |= {f.name for f in dataclasses.fields(op)}
    return accepted


def apply_overrides(chain: list[Operator], overrides: dict[str, Any]) -> list[Operator]:
    """Set each override on every operator that has a field of that name (re-validated).

    An override no operator accepts raises ``ValueError`` listing the accepted names.
    """
    accepted = operator_fields(chain)
    for key in overrides:
        if key not in accepted:
            raise ValueError(
                f"unknown option {key!r} for recipe [{', '.join(op.name for op in chain)}]; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )
    out = []
    for op in chain:
        fields = {f.name for f in dataclasses.fields(op)}
        mine = {k: v for k, v in overrides.items() if k in fields}
        out.append(dataclasses.replace(op, **mine) if mine else op)
    return out


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """A recipe with inline settings, as the benches take it on the command line.

    ``"tome:keep=192,prop_attn=false"`` -> ``("tome", {"keep": 192, "prop_attn": False})``; values become
    int, float, bool or None where they parse as one, else stay strings.
    """
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"bad recipe setting {text!r}: expected recipe[:field=value,...]")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad recipe setting {text!r}: expected recipe[:field=value,...]")
        overrides[key] = _literal(value)
    return name, overrides


def _literal(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def build(recipe: str | Operator | list[Operator] | Recipe, **overrides: Any) -> Recipe:
    """Normalise anything :func:`vtr.wrap` accepts into a :class:`Recipe`.

    ``recipe`` is a registered name, a path to a YAML file, one operator, a list of operators or a
    ``Recipe``. Wrap-level options in ``overrides`` (``WRAP_OPTIONS``) set the recipe's fields; names no
    operator accepts become family options (``Recipe.options``, validated by the model's adapter at
    ``wrap``); the rest go to operators.
    """
    options = {k: overrides.pop(k) for k in WRAP_OPTIONS if k in overrides}
    family = {k: overrides.pop(k) for k in list(overrides) if k in family_options()}
    if isinstance(recipe, Recipe):
        rec = dataclasses.replace(recipe, ops=apply_overrides(list(recipe.ops), overrides))
    elif isinstance(recipe, Operator):
        rec = Recipe(apply_overrides([recipe], overrides))
    elif isinstance(recipe, (list, tuple)):
        rec = Recipe(apply_overrides(list(recipe), overrides))
    elif isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text in _REGISTRY:
            rec = Recipe(get(text, **overrides), name=text, description=_REGISTRY[text][1])
        elif text.endswith((".yaml", ".yml")) or Path(text).exists():
            rec = load_recipe(text)
            rec = dataclasses.replace(rec, ops=apply_overrides(rec.ops, overrides))
        else:
            raise ValueError(
                f"unknown recipe {text!r}; available recipes: {', '.join(names())} (or a path to a .yaml file)"
            )
    else:
        raise TypeError(
            f"recipe must be a name, a YAML path, an Operator or a list of Operators, got {type(recipe).__name__}"
        )
    if family:
        options["options"] = {**rec.options, **family}
    return dataclasses.replace(rec, **options) if options else rec


def family_options() -> tuple[str, ...]:
    """Option names some model family accepts (each adapter validates its own; see ``Adapter.options``)."""
    from vtr.adapters import family_options as _family_options

    return _family_options()


_TOP_KEYS = ("name", "description", "positions", "options", "ops", "recipe", "overrides")


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file (``yaml.safe_load``) or return a named one.

    Unknown keys — at the top level or in an operator entry — raise ``ValueError`` listing the allowed
    keys.
    """
    text = str(path_or_name)
    if text in _REGISTRY and not Path(text).exists():
        return build(text)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {text} (named recipes: {', '.join(names())})")
    data = _safe_load(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe file must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed keys: {list(_TOP_KEYS)}")
    if ("ops" in data) == ("recipe" in data):
        raise ValueError(f"{path}: give exactly one of 'ops' (a chain) or 'recipe' (a registered name)")
    if "recipe" in data:
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: 'overrides' must be a mapping")
        chain = get(str(data["recipe"]), **overrides)
    else:
        if "overrides" in data:
            raise ValueError(f"{path}: 'overrides' only applies with 'recipe'; set fields in 'ops' instead")
        chain = [_op_from_dict(entry, path, i) for i, entry in enumerate(data["ops"] or [])]
    fam = data.get("options") or {}
    if not isinstance(fam, dict):
        raise ValueError(f"{path}: 'options' must be a mapping of family options such as {{drop_newlines: true}}")
    unknown = sorted(set(fam) - set(family_options()))
    if unknown:
        raise ValueError(f"{path}: unknown family option(s) {unknown}; known: {list(family_options())}")
    return Recipe(
        ops=chain,
        positions=data.get("positions", "original"),
        options=dict(fam),
        name=data.get("name", path.stem),
        description=data.get("description", ""),
    )


def _safe_load(path: Path) -> Any:
    """``yaml.safe_load`` of ``path``; a YAML error becomes a ``ValueError`` naming the file and the line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = "; ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ValueError(f"{path}: malformed YAML{where}: {what or err}") from err


def _op_from_dict(entry: Any, path: Path, i: int) -> Operator:
    classes = operator_classes()
    if not isinstance(entry, dict) or "op" not in entry:
        raise ValueError(f"{path}: ops[{i}] must be a mapping with an 'op' key naming one of {sorted(classes)}")
    entry = dict(entry)
    cls_name = entry.pop("op")
    if cls_name not in classes:
        raise ValueError(f"{path}: ops[{i}]: unknown operator {cls_name!r}; allowed: {sorted(classes)}")
    cls = classes[cls_name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: ops[{i}] ({cls_name}): unknown key(s) {unknown}; allowed keys: {allowed}")
    return cls(**entry)


# ---------------------------------------------------------------------- built-in recipes
register("divprune", lambda: [_ops.DivPrune()], "DivPrune: max-min diverse subset, pre-LLM (keep 0.098)")
register("random", lambda: [_ops.Random()], "Random: seeded uniform subset, pre-LLM baseline (keep 0.25)")
register("pool", lambda: [_ops.Pool()], "Pool: 2-D average pooling of the token grid, pre-LLM baseline (keep 0.25)")
register(
    "tome",
    lambda: [_ops.ToMe(keep=0.333)],
    "ToMe: merge similar tokens (in the CLIP/SigLIP/timm tower; after the projector on Qwen2-VL, InternVL); keep 1/3",
)
register(
    "fastv",
    lambda: [_ops.FastV()],
    "FastV: from LLM layer k=2 keep the visual tokens the last prompt token attends to most (r=0.5 removed)",
)
register(
    "storm",
    lambda: _ops.storm.storm_chain(),
    "STORM-style training-free pooling of videos: temporal pool k=4, spatial pool p=1, temporal sample stride=1",
)
register(
    "quota",
    lambda: [_ops.QuoTA()],
    "QuoTA: query-aware frame budgets (vlm scorer, query decoupling, bilinear resize), pre-LLM (keep 1.0 of video)",
)
register(
    "ats",
    lambda: [_ops.ATS()],
    "ATS: adaptive token sampling in the vision encoder (CLS attention x value norm; mean received on CLS-free "
    "encoders) from block depth/4 to the feature layer; counts adapt per image",
)
register(
    "hired",
    lambda: [_ops.HiRED()],
    "HiRED: per-image budgets for the full view and its tiles from early encoder attention, top tokens per "
    "partition by feature-layer attention, pre-LLM (keep 0.2, alpha 0.5)",
)
register(
    "mustdrop",
    lambda: [_ops.MustDropMerge(), _ops.MustDropKeys(), _ops.MustDropFilter(), _ops.MustDropCache()],
    "MustDrop: 3x3 window merge after encoder block 0, 8% key set, dual-attention filter at LLM layers "
    "{2,6,10,14}/32 (preset 192|128|64), KV cache compacted from the first pruning layer",
)
register(
    "mustdrop_vision",
    lambda: [_ops.MustDropMerge(), _ops.MustDropKeys()],
    "MustDrop's vision stage only: 3x3 window merge after encoder block 0 and the protected 8% key set",
)
