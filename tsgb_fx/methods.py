"""Methods as data: a map from op kind (or module name) to the rule that replaces its backward.

A :class:`Rule` names a graph-level function (an op whose backward is the rule) and the extra
keyword options it takes. A :class:`Method` maps op kinds of :mod:`tsgb_fx.ops` to rules and
says how the attribution is formed from the signal that reaches the input. A kind that is
absent (or maps to None) keeps the plain autograd gradient. The kind ``"classifier"`` is the
linear op found to produce the logits (:func:`tsgb_fx.rewrite.find_classifiers`); other linear
ops are of kind ``"linear"``; ``"relu"`` covers ReLU, ReLU6 and Hardtanh in every spelling.

Built-in methods (:data:`METHODS`), all through the same rewrite and one backward pass:

================= ============================================ =================================
method            rules                                        attribution
================= ============================================ =================================
tsgb              TSGB-Conv, TSGB-FC, ratio BN and avg pool    signal * input
gradient          none (plain autograd)                        signal (the input gradient)
grad_x_input      none (plain autograd)                        signal * input
guided_backprop   rectifiers: 1[x passes] * max(g, 0)          signal (as Captum's GuidedBackprop)
deconvnet         rectifiers: max(g, 0)                        signal (as Captum's Deconvolution)
================= ============================================ =================================

Mixing rules, in the spirit of Zennit's composites: a user map's keys are op kinds
(:data:`RULE_KINDS`) or module names (``"layer4.1.conv2"``, as in ``model.named_modules()``); a
module-name key applies to the ops that module calls itself and overrides the kind's rule there::

    rules = {**tsgb().rules, "relu": Rule("guided", guided_relu), "layer4.1.conv2": None}
    e = tsgb_fx.explainer(model, method=rules)                 # attribution = signal * input
    e = tsgb_fx.explainer(model, method=Method("mine", rules, times_input=False))

A key that is a kind name is read as the kind (a module called ``classifier`` is the classifier
kind's business); every other key must name a module that calls a recognised op, else the
rewrite raises ``ValueError`` with the closest names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .rules.avgpool import ratio_avg_pool
from .rules.batchnorm import ratio_batch_norm
from .rules.conv import CONV_GROUPS, tsgb_conv
from .rules.linear import tsgb_linear
from .rules.relu import deconvnet_relu, guided_relu

RULE_KINDS = ("conv", "classifier", "linear", "batchnorm", "avgpool", "relu", "silu")
CLASSIFIER_CHOICES = ("last", "all")


@dataclass(frozen=True)
class Rule:
    """A rule: ``function(**normalised op arguments, **options)`` computes the op, and its backward is the rule."""

    name: str
    function: Callable
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A saliency method: ``rules`` (op kind or module name -> :class:`Rule` or None) and its attribution.

    ``times_input``: the attribution is the signal at the input times the input (TSGB, gradient
    x input, LRP-style methods) when True, the signal itself (gradient, guided backprop,
    deconvnet) when False. ``options``: the choices the method was built with, for the record.
    """

    name: str
    rules: Mapping[str, Rule | None]
    times_input: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"a method's name must be a str, got {type(self.name).__name__}")
        if not isinstance(self.rules, Mapping):
            raise TypeError(f"a method's rules must be a mapping, got {type(self.rules).__name__}")
        for key, rule in self.rules.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"method keys must be op kinds {RULE_KINDS} or module names (str), got {key!r}")
            if rule is not None and not isinstance(rule, Rule):
                raise TypeError(
                    f"method[{key!r}] must be a tsgb_fx.Rule or None (plain gradient), got {type(rule).__name__}"
                )
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


def tsgb(conv_groups: str = "reference", classifier: str = "last") -> Method:
    """TSGB (TSGB.md): TSGB-Conv, TSGB-FC at the classifier, ratio rules for batch norm and avg pooling."""
    if conv_groups not in CONV_GROUPS:
        raise ValueError(f"conv_groups must be one of {CONV_GROUPS}, got {conv_groups!r}")
    if classifier not in CLASSIFIER_CHOICES:
        raise ValueError(f"classifier must be one of {CLASSIFIER_CHOICES}, got {classifier!r}")
    fully_connected = Rule("tsgb_fc", tsgb_linear)
    rules = {
        "conv": Rule("tsgb_conv", tsgb_conv, {"conv_groups": conv_groups}),
        "classifier": fully_connected,
        "linear": fully_connected if classifier == "all" else None,
        "batchnorm": Rule("ratio_batchnorm", ratio_batch_norm),
        "avgpool": Rule("ratio_avgpool", ratio_avg_pool),
    }
    return Method("tsgb", rules, times_input=True, options={"conv_groups": conv_groups, "classifier": classifier})


def gradient() -> Method:
    """The input gradient (Simonyan et al. 2014): plain autograd everywhere, attribution = gradient."""
    return Method("gradient", {}, times_input=False)


def grad_x_input() -> Method:
    """Gradient times input (Shrikumar et al. 2016): plain autograd, attribution = gradient * input."""
    return Method("grad_x_input", {}, times_input=True)


def guided_backprop() -> Method:
    """Guided backprop: rectifiers pass ``1[x passes] * max(g, 0)``; attribution = the signal (as Captum)."""
    return Method("guided_backprop", {"relu": Rule("guided_relu", guided_relu)}, times_input=False)


def deconvnet() -> Method:
    """Deconvnet: rectifiers pass ``max(g, 0)`` whatever their input; attribution = the signal (as Captum)."""
    return Method("deconvnet", {"relu": Rule("deconvnet_relu", deconvnet_relu)}, times_input=False)


METHODS: dict[str, Callable[..., Method]] = {
    "tsgb": tsgb,
    "gradient": gradient,
    "grad_x_input": grad_x_input,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
}


def resolve_method(method: str | Method | Mapping[str, Rule | None], **options: Any) -> Method:
    """A :class:`Method` from a name in :data:`METHODS` (with its options), a Method, or a rule map.

    ``options`` whose value is None are left at the method's default; an option given for a
    method that does not take it (``conv_groups`` for ``"gradient"``) raises ValueError, as do
    options given with a Method or a map (they carry their own rules). A plain map becomes
    ``Method("custom", map, times_input=True)``.
    """
    given = {name: value for name, value in options.items() if value is not None}
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, a tsgb_fx.Method or a rule map; got {method!r}")
        factory = METHODS[method]
        accepted = inspect.signature(factory).parameters
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
            raise ValueError(f"method {method!r} {takes}; {', '.join(unknown)} applies to other methods (e.g. 'tsgb')")
        return factory(**given)
    if given:
        raise ValueError(
            f"{', '.join(sorted(given))} applies to named methods only; a Method or rule map carries its own rules"
        )
    if isinstance(method, Method):
        return method
    if isinstance(method, Mapping):
        return Method("custom", method, times_input=True)
    raise TypeError(f"method must be a name {tuple(METHODS)}, a tsgb_fx.Method or a rule map, got {type(method).__name__}")
