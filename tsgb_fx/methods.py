"""Methods as data: a map from op kind to the rule that replaces its backward.

A :class:`Rule` names a graph-level function (an op whose backward is the rule) and the extra
keyword options it takes. A method maps each op kind of :mod:`tsgb_fx.ops` to a rule; a kind
that is absent (or maps to None) keeps the plain autograd gradient. The kind ``"classifier"`` is
the linear op found to produce the logits (:func:`tsgb_fx.rewrite.find_classifiers`); other
linear ops are of kind ``"linear"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .rules.avgpool import ratio_avg_pool
from .rules.batchnorm import ratio_batch_norm
from .rules.conv import CONV_GROUPS, tsgb_conv
from .rules.linear import tsgb_linear

RULE_KINDS = ("conv", "classifier", "linear", "batchnorm", "avgpool")
CLASSIFIER_CHOICES = ("last", "all")


@dataclass(frozen=True)
class Rule:
    """A rule: ``function(**normalised op arguments, **options)`` computes the op, and its backward is the rule."""

    name: str
    function: Callable
    options: Mapping[str, Any] = field(default_factory=dict)


def tsgb(conv_groups: str = "reference", classifier: str = "last") -> dict[str, Rule]:
    """TSGB (TSGB.md): TSGB-Conv, TSGB-FC at the classifier, ratio rules for batch norm and avg pooling."""
    if conv_groups not in CONV_GROUPS:
        raise ValueError(f"conv_groups must be one of {CONV_GROUPS}, got {conv_groups!r}")
    if classifier not in CLASSIFIER_CHOICES:
        raise ValueError(f"classifier must be one of {CLASSIFIER_CHOICES}, got {classifier!r}")
    fully_connected = Rule("tsgb_fc", tsgb_linear)
    return {
        "conv": Rule("tsgb_conv", tsgb_conv, {"conv_groups": conv_groups}),
        "classifier": fully_connected,
        "linear": fully_connected if classifier == "all" else None,
        "batchnorm": Rule("ratio_batchnorm", ratio_batch_norm),
        "avgpool": Rule("ratio_avgpool", ratio_avg_pool),
    }


METHODS: dict[str, Callable[..., dict[str, Rule]]] = {"tsgb": tsgb}
