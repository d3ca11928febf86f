"""Token-reduction operators: one module per method, each a functional core plus an Operator dataclass."""

from vtr.ops.base import STAGES, BudgetOperator, LayerOperator, OpContext, Operator, resolve_keep, validate_keep
from vtr.ops.baselines import Pool, Random
from vtr.ops.divprune import DivPrune
from vtr.ops.fastv import FastV

__all__ = [
    "STAGES",
    "BudgetOperator",
    "DivPrune",
    "FastV",
    "LayerOperator",
    "OpContext",
    "Operator",
    "Pool",
    "Random",
    "resolve_keep",
    "validate_keep",
]
