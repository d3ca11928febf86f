"""Public entry points: :func:`wrap`, :func:`unwrap`, :func:`reduced`, :func:`load_recipe`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from vtr import recipes
from vtr.adapters import Adapter, adapter_for
from vtr.ops.base import Operator
from vtr.pipeline import Pipeline
from vtr.recipes import Recipe, load_recipe
from vtr.report import Report

__all__ = ["Reducer", "load_recipe", "reduced", "unwrap", "wrap"]

RecipeLike = str | Operator | list[Operator] | Recipe


class Reducer:
    """The state vtr attaches to a wrapped model as ``model.vtr``.

    Attributes:
        recipe: the operators and wrap-level options in force.
        pipeline: the validated operator chain.
        adapter: the model-family adapter that runs it.
        report: what the latest reduced prefill did (``None`` before the first call).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, recipe: Recipe):
        self.recipe = recipe
        self.pipeline = Pipeline(recipe.ops)
        self.pipeline.check_supported(adapter.supported_stages, adapter.name)
        if recipe.drop_newlines is not None and not hasattr(adapter, "drop_newlines"):
            raise ValueError(
                f"drop_newlines applies to models with newline rows (LLaVA-NeXT, LLaVA-OneVision); "
                f"the {adapter.name} adapter has none"
            )
        self.adapter = adapter
        self.report: Report | None = None
        self._model_ref = model

    def install(self) -> None:
        self.adapter.install(self)

    def remove(self) -> None:
        self.adapter.remove()

    def __repr__(self) -> str:
        ops = ", ".join(repr(op) for op in self.recipe.ops)
        return f"Reducer(adapter={self.adapter.name}, positions={self.recipe.positions!r}, ops=[{ops}])"


def wrap(model: nn.Module, recipe: RecipeLike, /, **overrides: Any) -> nn.Module:
    """Attach a token-reduction recipe to ``model`` (this instance only) and return it.

    Args:
        model: a supported Hugging Face VLM (see ``vtr.adapters.supported_classes()``).
        recipe: a registered recipe name (``vtr recipes``), a YAML path, an operator or a list of them.
        **overrides: operator fields to override (e.g. ``keep=0.1``, ``scope="frame"``) and wrap-level
            options (``positions="original" | "compact"``; ``drop_newlines=True`` for LLaVA-NeXT/OneVision).

    Wrapping an already wrapped model replaces its recipe. ``model.vtr.report`` describes the latest call.
    """
    rec = recipes.build(recipe, **overrides)
    adapter = adapter_for(model)
    reducer = Reducer(model, adapter, rec)  # validates before touching the model
    if is_wrapped(model):
        unwrap(model)
    reducer.install()
    model.vtr = reducer
    return model


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(getattr(model, "vtr", None), Reducer)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook vtr installed on ``model`` and the ``model.vtr`` attribute."""
    if not is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is not wrapped by vtr")
    model.vtr.remove()
    del model.vtr
    return model


@contextmanager
def reduced(model: nn.Module, recipe: RecipeLike, /, **overrides: Any) -> Iterator[nn.Module]:
    """Context manager: ``model`` runs ``recipe`` inside the block and is restored afterwards.

    A recipe the model already had is put back on exit.
    """
    previous = model.vtr.recipe if is_wrapped(model) else None
    wrap(model, recipe, **overrides)
    try:
        yield model
    finally:
        unwrap(model)
        if previous is not None:
            wrap(model, previous)
