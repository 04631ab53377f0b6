"""tsgb-fx: Target-Selective Gradient Backprop for any CNN, by graph rewriting.

>>> import tsgb_fx
>>> e = tsgb_fx.explainer(model)          # trace and rewrite once
>>> r = e(images, target=285)             # one forward + one backward per call
>>> r.saliency.shape                      # (N, 1, H, W)
"""

from .allocator import reuse_freed_memory
from .errors import TraceError, TSGBError
from .explainer import Explainer, Explanation, explainer
from .methods import METHODS, Method, Rule
from .rewrite import RuleSite

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Explainer",
    "Explanation",
    "Method",
    "Rule",
    "RuleSite",
    "TSGBError",
    "TraceError",
    "__version__",
    "explainer",
    "reuse_freed_memory",
]
