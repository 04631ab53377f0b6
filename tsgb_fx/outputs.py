"""Pick the logits out of a model that returns more (a tuple, dict or named tuple with auxiliaries).

The explainer needs one tensor of logits. :func:`select_output` applies the user's ``output=``
selector to the traced graph's output *at build time*: the graph then returns only the logits,
the auxiliary heads become dead code and are removed, and the classifier search, the explicit
graph and the ONNX export all see a single-output model. A model that returns a structure
without a selector is refused here, with the keys or length to choose from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.utils._pytree as pytree
from torch import fx

from .errors import TraceError

OutputSelector = int | str | Callable | None


def _output_structure(graph: fx.Graph, output_node: fx.Node):
    """The traced output as a structure of nodes (tuple, dict, named tuple) or a single node."""
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.out_spec is not None:
        return pytree.tree_unflatten(list(output_node.args[0]), codegen.pytree_info.out_spec)
    value = output_node.args[0]
    target = getattr(value, "target", None)
    if isinstance(value, fx.Node) and isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
        return target(*value.args, **value.kwargs)  # a named tuple built in forward
    return value


def _describe(structure) -> str:
    if isinstance(structure, Mapping):
        return f"a dict with keys {list(structure)}: pass output='<key>'"
    if hasattr(structure, "_fields"):
        return f"a {type(structure).__name__} with fields {list(structure._fields)}: pass output='<field>'"
    return f"a {type(structure).__name__} of length {len(structure)}: pass output=<index>"


def select_output(graph_module: fx.GraphModule, output: OutputSelector) -> None:
    """Make ``graph_module`` return only the logits chosen by ``output`` (index, key or callable)."""
    graph = graph_module.graph
    output_node = next(node for node in graph.nodes if node.op == "output")
    structure = _output_structure(graph, output_node)
    if output is None:
        if isinstance(structure, fx.Node):
            return
        raise TraceError(f"the model returns {_describe(structure)} (or a callable) selecting the logits")
    try:
        if callable(output):
            selected = output(structure)
        elif isinstance(output, str) and hasattr(structure, "_fields"):
            selected = getattr(structure, output)
        else:
            selected = structure[output]
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        raise ValueError(f"output={output!r} does not select from the model's output: {error!r}") from None
    if not isinstance(selected, fx.Node):
        raise ValueError(f"output={output!r} must select one tensor of logits, got {type(selected).__name__}")
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.out_spec is not None:
        # torch.export's module returns tree_unflatten(flat outputs, out_spec): one leaf now
        leaf = pytree.tree_structure(0)
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=leaf)
        graph_module._out_spec = leaf
        output_node.args = ((selected,),)
    else:
        output_node.args = (selected,)
    graph.eliminate_dead_code()
    graph_module.recompile()
