"""Token-reduction operators: one module per method, each a functional core plus an Operator dataclass."""

from vtr.ops.ats import ATS
from vtr.ops.base import (
    STAGES,
    BudgetOperator,
    LayerOperator,
    OpContext,
    Operator,
    VisionOperator,
    resolve_keep,
    validate_keep,
)
from vtr.ops.baselines import Pool, Random
from vtr.ops.divprune import DivPrune
from vtr.ops.fastv import FastV
from vtr.ops.hired import HiRED
from vtr.ops.mustdrop import MustDropCache, MustDropFilter, MustDropKeys, MustDropMerge
from vtr.ops.quota import QuoTA
from vtr.ops.storm import SpatialPool, TemporalPool, TemporalSample
from vtr.ops.tome import ToMe

__all__ = [
    "ATS",
    "STAGES",
    "BudgetOperator",
    "DivPrune",
    "FastV",
    "HiRED",
    "LayerOperator",
    "MustDropCache",
    "MustDropFilter",
    "MustDropKeys",
    "MustDropMerge",
    "OpContext",
    "Operator",
    "Pool",
    "QuoTA",
    "Random",
    "SpatialPool",
    "TemporalPool",
    "TemporalSample",
    "ToMe",
    "VisionOperator",
    "resolve_keep",
    "validate_keep",
]
