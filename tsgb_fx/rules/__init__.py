"""The rules: autograd Functions whose forward is the op and whose backward is a TSGB rule.

One small file per kind; each exposes a pure ``*_backward`` (or helper) function of the forward's
input/output and the incoming signal, and the graph-level function the rewrite calls. The
rectifier rules (guided backprop, deconvnet) serve the baseline methods of :mod:`tsgb_fx.methods`.

The Functions use the classic ``forward(ctx, ...)``, not a separate ``setup_context``: for the
latter, ``Function.apply`` binds the forward's signature with ``inspect`` on every call, about
75 us, more than the arithmetic of a small layer (the rules need no vmap or functorch support).
"""

from .avgpool import ratio_avg_pool
from .batchnorm import ratio_batch_norm
from .conv import tsgb_conv
from .linear import tsgb_linear
from .relu import deconvnet_relu, guided_relu

__all__ = ["deconvnet_relu", "guided_relu", "ratio_avg_pool", "ratio_batch_norm", "tsgb_conv", "tsgb_linear"]
