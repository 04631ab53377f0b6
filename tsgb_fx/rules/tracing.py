"""Whether a rule runs eagerly or is being traced into the explicit graph.

The explicit graph (:mod:`tsgb_fx.explicit`) is traced with a symbolic batch size. Eager-only
shortcuts (chunked channel sums, sum-pooling boxes, TSGB-FC on the target rows) read data or
use ops ONNX lacks, so the traced graph keeps their plain form.
"""

from __future__ import annotations

import torch


def is_traced(t: torch.Tensor) -> bool:
    """``t`` has a symbolic batch size: it is being traced, not computed."""
    return isinstance(t.shape[0], torch.SymInt)
