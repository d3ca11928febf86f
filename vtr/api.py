"""Public entry points: :func:`wrap`, :func:`unwrap`, :func:`reduced`, :func:`load_recipe`."""

from __future__ import annotations

import dataclasses
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
        recipe: the operators and wrap-level options in force (operators bound to this model's family).
        pipeline: the validated operator chain.
        adapter: the model-family adapter that runs it.
        tokenizer: used to recover the prompt text for query-aware operators (``OpContext.query``).
        report: what the latest reduced prefill did (``None`` before the first call).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, recipe: Recipe, tokenizer: Any = None):
        # Operators may specialise for the family (e.g. ToMe in the tower or after the projector) or refuse it.
        ops = [op.bind(adapter) for op in recipe.ops]
        self.recipe = dataclasses.replace(recipe, ops=ops)
        self.pipeline = Pipeline(ops)
        self.pipeline.check_supported(adapter.supported_stages, adapter.name)
        adapter.set_options(self.recipe)
        #: The processor (or tokenizer) given to ``wrap``, and its tokenizer.
        self.processor = tokenizer
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        needy = [op.name for op in ops if op.needs_query]
        if needy and self.tokenizer is None:
            raise ValueError(
                f"{', '.join(needy)} read(s) the prompt text: pass the model's processor or tokenizer, "
                "vtr.wrap(model, recipe, processor=processor)"
            )
        self.adapter = adapter
        self.report: Report | None = None
        self._model_ref = model
        adapter.prepare(self)  # plans (and validates) the hook sets; the model is untouched until install

    def install(self) -> None:
        self.adapter.install()

    def remove(self) -> None:
        self.adapter.remove()

    def __repr__(self) -> str:
        ops = ", ".join(repr(op) for op in self.recipe.ops)
        return f"Reducer(adapter={self.adapter.name}, positions={self.recipe.positions!r}, ops=[{ops}])"


def wrap(model: nn.Module, recipe: RecipeLike, /, *, processor: Any = None, **overrides: Any) -> nn.Module:
    """Attach a token-reduction recipe to ``model`` (this instance only) and return it.

    Args:
        model: a supported Hugging Face VLM (see ``vtr.adapters.supported_classes()``) or timm ViT.
        recipe: a registered recipe name (``vtr recipes``), a YAML path, an operator or a list of them.
        processor: the model's processor or tokenizer; needed by query-aware operators (e.g. QuoTA),
            which read the prompt text.
        **overrides: operator fields to override (e.g. ``keep=0.1``, ``scope="frame"``) and wrap-level
            options (``positions="original" | "compact"``; family options such as ``drop_newlines=True``
            for LLaVA-NeXT/OneVision, validated by the model's adapter).

    Wrapping an already wrapped model replaces its recipe. ``model.vtr.report`` describes the latest call.
    A recipe the model cannot run (a stage or operator its family cannot host) raises here, before any
    hook is installed.
    """
    rec = recipes.build(recipe, **overrides)
    adapter = adapter_for(model)
    reducer = Reducer(model, adapter, rec, tokenizer=processor)  # validates before touching the model
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
    previous = (model.vtr.recipe, model.vtr.processor) if is_wrapped(model) else None
    wrap(model, recipe, **overrides)
    try:
        yield model
    finally:
        unwrap(model)
        if previous is not None:
            wrap(model, previous[0], processor=previous[1])
