"""vtr: training-free visual token reduction for Hugging Face vision-language models.

import vtr
model = vtr.wrap(model, "divprune", keep=0.1)
out = model.generate(**inputs)
model.vtr.report
"""

from vtr import ops
from vtr.api import Reducer, is_wrapped, load_recipe, reduced, unwrap, wrap
from vtr.recipes import Recipe
from vtr.tokens import VisualTokens

__version__ = "0.1.0"

__all__ = [
    "Recipe",
    "Reducer",
    "VisualTokens",
    "__version__",
    "is_wrapped",
    "load_recipe",
    "ops",
    "reduced",
    "unwrap",
    "wrap",
]
