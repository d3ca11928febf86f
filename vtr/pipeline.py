"""Ordering and validation of operators across stages; running one stage on a batch."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from vtr.ops.base import STAGES, OpContext, Operator
from vtr.report import Report
from vtr.tokens import VisualTokens

__all__ = ["Pipeline"]


class Pipeline:
    """An ordered chain of operators whose stages appear in ``STAGES`` order.

    Several operators may share a stage; they run in list order.
    """

    def __init__(self, ops: Sequence[Operator]):
        ops = list(ops)
        if not ops:
            raise ValueError("a pipeline needs at least one operator")
        for i, op in enumerate(ops):
            if not isinstance(op, Operator):
                raise TypeError(
                    f"pipeline entry {i} is {op!r} of type {type(op).__name__}; expected a vtr.ops.Operator"
                )
            if op.stage not in STAGES:
                raise ValueError(f"{op.name} declares stage {op.stage!r}; allowed: {STAGES}")
        for a, b in itertools.pairwise(ops):
            if STAGES.index(b.stage) < STAGES.index(a.stage):
                raise ValueError(
                    f"{b.name} (stage {b.stage!r}) cannot follow {a.name} (stage {a.stage!r}): "
                    f"stages must appear in the order {' -> '.join(STAGES)}"
                )
        self.ops = ops

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(op.stage for op in self.ops))

    def for_stage(self, stage: str) -> list[Operator]:
        return [op for op in self.ops if op.stage == stage]

    def check_supported(self, supported: Sequence[str], adapter_name: str) -> None:
        """Raise if an operator acts in a stage the adapter cannot run."""
        for op in self.ops:
            if op.stage not in supported:
                raise ValueError(
                    f"{op.name} acts in stage {op.stage!r}, which the {adapter_name} adapter does not support "
                    f"(supported: {tuple(supported)})"
                )

    def run(
        self,
        stage: str,
        batch: Sequence[VisualTokens],
        contexts: Sequence[OpContext],
        report: Report | None = None,
    ) -> list[VisualTokens]:
        """Apply this stage's operators to every sample independently."""
        out = []
        for tokens, ctx in zip(batch, contexts, strict=True):
            for op in self.for_stage(stage):
                t0 = time.perf_counter()
                new = op.apply(tokens, ctx)
                dt = time.perf_counter() - t0
                if report is not None:
                    report.add(sample=ctx.sample, stage=stage, operator=op.name, before=tokens, after=new, seconds=dt)
                tokens = new
            out.append(tokens)
        return out

    def __repr__(self) -> str:
        return f"Pipeline({self.ops!r})"
