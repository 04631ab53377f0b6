"""Rewrite a traced graph: every recognised op whose kind the method covers becomes its rule.

The node is replaced by a ``call_function`` of the rule's function with the op's normalised
arguments (:mod:`tsgb_fx.ops`) as keywords; module parameters become ``get_attr`` nodes that
point at the very same tensors. Everything else stays as traced and keeps plain autograd.

The rule for a node is looked up by the name of the module that calls the op (``"layer4.1.conv2"``)
first, then by its kind (:data:`tsgb_fx.methods.RULE_KINDS`), so name keys override kind keys.
"""

from __future__ import annotations

import difflib
import inspect
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .methods import RULE_KINDS, Rule
from .ops import Attr, OpSite, find_op_sites
from .rules.batchnorm import ratio_batch_norm
from .rules.relevance import relevance_to_signal

_BATCH_NORM_ARGUMENTS = ("running_mean", "running_var", "weight", "bias", "eps")


@dataclass(frozen=True)
class RuleSite:
    """What the rewrite decided for one node: its kind, the rule applied, the module it came from."""

    kind: str
    rule: str
    module: str

    def __repr__(self) -> str:
        where = f" in {self.module!r}" if self.module else ""
        return f"<{self.kind}: {self.rule}{where}>"


# Ops through which a linear op's output can reach the model output and still be "the logits".
_TRANSPARENT_FUNCTIONS = {
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.clone, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid,
    torch.softmax, torch.log_softmax, F.relu, F.dropout, F.softmax, F.log_softmax, F.sigmoid,
}
_TRANSPARENT_METHODS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "permute", "transpose",
    "float", "double", "half", "to", "type_as", "clone", "relu", "sigmoid", "softmax",
    "log_softmax", "add", "sub", "mul", "div",
}
_TRANSPARENT_ATEN = {
    "view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
    "t", "clone", "contiguous", "expand", "alias", "detach", "add", "sub", "mul", "div", "neg",
    "relu", "sigmoid", "dropout", "_to_copy", "to", "softmax", "_softmax", "log_softmax",
    "_log_softmax",
}
_TRANSPARENT_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU, nn.Sigmoid,
    nn.Softmax, nn.LogSoftmax,
)


def _is_transparent(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _TRANSPARENT_MODULES)
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.name.split("::")[-1] in _TRANSPARENT_ATEN
        return node.target in _TRANSPARENT_FUNCTIONS
    return False


def find_classifiers(graph_module: fx.GraphModule, sites: list[OpSite]) -> set[fx.Node]:
    """Linear ops whose output reaches the graph output through shape-only or elementwise ops."""
    linear_nodes = {site.node for site in sites if site.kind == "linear"}
    modules = dict(graph_module.named_modules())
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    frontier = [arg for node in graph_module.graph.nodes if node.op == "output" for arg in node.all_input_nodes]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear_nodes:
            found.add(node)
        elif _is_transparent(node, modules):
            frontier.extend(node.all_input_nodes)
    return found


def _materialise(graph: fx.Graph, value, replaced: Mapping[fx.Node, fx.Node]):
    """A rule argument as a graph value: parameters become get_attr nodes, replaced nodes their rule."""
    if isinstance(value, Attr):
        return graph.get_attr(value.path)
    if isinstance(value, fx.Node):
        return replaced.get(value, value)
    return value


def _check_keys(method: Mapping[str, Rule | None], sites: list[OpSite]) -> None:
    """Every key is a kind or the name of a module that calls a recognised op."""
    modules = sorted({site.module for site in sites if site.module})
    for key in method:
        if key in RULE_KINDS or key in modules:
            continue
        close = difflib.get_close_matches(key, [*RULE_KINDS, *modules], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        inside = [name for name in modules if name.startswith(key + ".")]
        if inside:
            hint = (f"; a name key applies to the module that calls the op itself, e.g. "
                    f"{', '.join(map(repr, inside[:3]))}")
        raise ValueError(
            f"method key {key!r} is neither an op kind {RULE_KINDS} nor the name of a module that "
            f"calls a recognised op (conv, linear, batch norm, avg pooling, rectifier){hint}"
        )


def _check_signature(rule: Rule, site: OpSite, kind: str) -> None:
    """The rule function takes this op's arguments: a rule for one kind cannot replace another."""
    try:
        inspect.signature(rule.function).bind(**site.arguments, **rule.options)
    except TypeError as error:
        where = f" in module {site.module!r}" if site.module else ""
        raise ValueError(
            f"rule {rule.name!r} cannot replace node {site.node.name!r} ({kind}{where}): its function "
            f"does not take that op's arguments {tuple(site.arguments)} plus options {tuple(rule.options)} "
            f"({error}); give that kind or module a rule written for it"
        ) from None
    except ValueError:  # builtins without a signature: trust the user
        pass


def _takes(rule: Rule, parameter: str) -> bool:
    """Whether the rule's function accepts a graph fact by that name (builtins: no)."""
    return _accepts(rule.function, parameter)


def _accepts(function, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _only_user(node: fx.Node, candidates: Mapping[fx.Node, OpSite]) -> OpSite | None:
    """The op among ``candidates`` that is the only user of ``node``, reading it as its input ``x``."""
    users = list(node.users)
    if len(users) == 1 and users[0] in candidates and candidates[users[0]].arguments["x"] is node:
        return candidates[users[0]]
    return None


def _passes_relevance(rule: Rule | None) -> bool:
    """The built-in ratio rule of batch norm, which hands the relevance ``g * y`` on unchanged."""
    return rule is not None and rule.function is ratio_batch_norm and not rule.options


def rewrite(graph_module: fx.GraphModule, method: Mapping[str, Rule | None]) -> dict[str, RuleSite]:
    """Apply ``method`` to ``graph_module`` in place; return node name -> :class:`RuleSite`.

    ``method`` maps op kinds and module names to rules (None: plain gradient); a module-name key
    wins over the node's kind. Raises ValueError for a key that is neither, and for a rule whose
    function does not take the arguments of the op it would replace.

    Graph facts are passed to rule functions that name them as parameters:

    * ``batch_norm``: the op's only user is a batch norm with the built-in ratio rule; it is
      folded into the op, which receives its arguments (TSGB-Conv, :func:`tsgb_fx.rules.conv.tsgb_conv`);
    * ``output_clamp``: a rectifier (ReLU, ReLU6: ``min_val == 0``) with its plain gradient is
      the only user of the rule op (or of its folded batch norm); it is folded into the op, which
      applies it in place and keeps the rectified output (:mod:`tsgb_fx.rules.rectify`);
    * ``input_rectified``: the op's input is such a rectifier's output (folded or not), so it is
      non-negative and gets no signal where it is 0 (TSGB-Conv skips ``|x|`` and ``sign(x)``);
    * ``output_activation="silu"``: a SiLU with its plain gradient is the only user of the rule op
      (or of its folded batch norm) and is folded in, like a rectifier; ``activation_unsigned``:
      that SiLU's only reader is a rule op that takes ``input_sign_upstream``, which is then set
      there: the reader sends its signal without ``sign(x)`` and the folded op applies it
      (:mod:`tsgb_fx.rules.silu`);
    * ``sends_relevance`` and ``output_relevance``: relevance edges (:func:`carry_relevance`).

    None changes a map (the batch norm fold and the relevance edges up to the ratio rule's ``eps``);
    they save passes over activations and memory. The returned RuleSites still list every folded op
    with its rule.
    """
    graph = graph_module.graph
    sites = find_op_sites(graph_module)
    _check_keys(method, sites)
    classifiers = find_classifiers(graph_module, sites)
    chosen: dict[fx.Node, tuple[str, Rule | None]] = {}
    decided: dict[str, RuleSite] = {}
    for site in sites:
        kind = "classifier" if site.node in classifiers else site.kind
        key = site.module if site.module and site.module in method and site.module not in RULE_KINDS else kind
        rule = method.get(key)
        chosen[site.node] = (kind, rule)
        decided[site.node.name] = RuleSite(kind, rule.name if rule else "gradient", site.module)
    plain_rectifiers = {
        site.node: site
        for site in sites
        if site.kind == "relu" and chosen[site.node][1] is None and site.arguments["min_val"] == 0.0
    }
    relevance_passing = {
        site.node: site for site in sites if site.kind == "batchnorm" and _passes_relevance(chosen[site.node][1])
    }
    plain_silus = {site.node: site for site in sites if site.kind == "silu" and chosen[site.node][1] is None}
    sign_takers = {
        site.node: site for site in sites
        if chosen[site.node][1] is not None and _takes(chosen[site.node][1], "input_sign_upstream")
    }
    rectified_outputs = set(plain_rectifiers)
    unsigned_outputs: set[fx.Node] = set()
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        kind, rule = chosen[site.node]
        if rule is None or site.node in replaced:  # plain gradient, or already folded into an op before it
            continue
        _check_signature(rule, site, kind)
        batch_norm = _only_user(site.node, relevance_passing) if _takes(rule, "batch_norm") else None
        chain = [site] if batch_norm is None else [site, batch_norm]
        rectifier = _only_user(chain[-1].node, plain_rectifiers) if _takes(rule, "output_clamp") else None
        if rectifier is not None:
            chain.append(rectifier)
        silu = _only_user(chain[-1].node, plain_silus) if rectifier is None and _takes(rule, "output_activation") else None
        unsigned = silu is not None and _only_user(silu.node, sign_takers) is not None
        if silu is not None:
            chain.append(silu)
        with graph.inserting_before(chain[-1].node):  # every op of the chain has its inputs by then
            arguments = {name: _materialise(graph, value, replaced) for name, value in site.arguments.items()}
            if _takes(rule, "input_rectified"):
                arguments["input_rectified"] = arguments.get("x") in rectified_outputs
            if batch_norm is not None:
                arguments["batch_norm"] = tuple(
                    _materialise(graph, batch_norm.arguments[name], replaced) for name in _BATCH_NORM_ARGUMENTS
                )
            if rectifier is not None:
                arguments["output_clamp"] = (0.0, rectifier.arguments["max_val"])
            if silu is not None:
                arguments["output_activation"], arguments["activation_unsigned"] = "silu", unsigned
            if _takes(rule, "input_sign_upstream") and arguments.get("x") in unsigned_outputs:
                arguments["input_sign_upstream"] = True
            replacement = graph.call_function(rule.function, kwargs={**arguments, **rule.options})
        replacement.meta = dict(site.node.meta)
        for folded in reversed(chain):  # last first: each op's only user is gone before the op itself
            folded.node.replace_all_uses_with(replacement)
            replaced[folded.node] = replacement
            graph.erase_node(folded.node)
        if rectifier is not None:
            rectified_outputs.add(replacement)
        if unsigned:
            unsigned_outputs.add(replacement)
    carry_relevance(graph)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return decided


_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)


def carry_relevance(graph: fx.Graph) -> None:
    """Make the rule ops exchange the relevance ``g * x`` where that saves divisions (in place).

    A ratio-rule op (a reader: its function takes ``sends_relevance``) whose input ``x`` is read
    by such readers only sends the relevance, without dividing by ``x``
    (:mod:`tsgb_fx.rules.relevance`). When ``x`` is a concatenation, the relevance reaches each of
    its inputs. Each node the relevance reaches, directly or through such concatenations, is a
    writer. If its function takes ``output_relevance``, it drops relevance at its zeros itself
    (:func:`_takes_relevance`), and every one of its users sends it relevance, it is told to read
    the relevance as it arrives. Otherwise a :func:`~tsgb_fx.rules.relevance.relevance_to_signal`
    goes in between those users and the writer, and turns the summed relevance into the signal the
    writer expects.
    """
    readers = {  # a dict: graph order, so the rewritten graph is the same on every run
        node: None for node in graph.nodes if node.op == "call_function" and _accepts(node.target, "sends_relevance")
    }
    senders_to: dict[fx.Node, set[fx.Node]] = {}  # writer -> the nodes that send it relevance
    for reader in readers:
        x = reader.kwargs.get("x")
        if not isinstance(x, fx.Node) or not all(user in readers and user.kwargs.get("x") is x for user in x.users):
            continue
        reader.update_kwarg("sends_relevance", True)
        concatenated = x.op == "call_function" and x.target in _CONCATENATIONS
        for writer in (x.args[0] if x.args else x.kwargs["tensors"]) if concatenated else [x]:
            senders_to.setdefault(writer, set()).add(x if concatenated else reader)
    position = {node: index for index, node in enumerate(graph.nodes)}
    for writer, senders in senders_to.items():
        if set(writer.users) == senders and _takes_relevance(writer):
            writer.update_kwarg("output_relevance", True)
            continue
        with graph.inserting_before(min(senders, key=position.get)):  # after every placeholder
            converted = graph.call_function(relevance_to_signal, (writer,))
        converted.meta = dict(writer.meta)
        for sender in senders:
            sender.replace_input_with(writer, converted)


def _takes_relevance(node: fx.Node) -> bool:
    """A rule op that can read the relevance at its output: one that drops by itself whatever
    relevance arrives at an output that is exactly 0 (:mod:`tsgb_fx.rules.relevance`), i.e. no
    activation folded in and, for a grouped convolution summing all channels, a mask of its zeros."""
    if node.op != "call_function" or not _accepts(node.target, "output_relevance"):
        return False
    kwargs = node.kwargs
    folds_activation = kwargs.get("output_clamp") is not None or kwargs.get("output_activation") is not None
    mixes_groups = kwargs.get("groups", 1) != 1 and kwargs.get("conv_groups") == "reference"
    return not folds_activation and (not mixes_groups or kwargs.get("batch_norm") is not None)
