"""Write an explainer as one ONNX graph: forward plus rule backward, standard operators only.

The path is ``explainer -> explicit fx graph (tsgb_fx.explicit) -> torch.export (dynamic batch)
-> torch.onnx (dynamo exporter, onnxscript's torchlib) -> inline every local function -> check``.
The explicit graph has no autograd and no backward kernels left, so the exporter only sees
ordinary ops (Conv, ConvTranspose, MatMul, MaxPool, ScatterElements, ArgMax, ...); before export,
:mod:`tsgb_export.lowering` respells the broadcasts, masks and channel sums that onnxruntime
runs slowly, :mod:`tsgb_export.maxpool` translates max pooling with indices and
:mod:`tsgb_export.threshold` thresholds at zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx.inliner
import onnxscript.optimizer
import torch

import tsgb_fx
from tsgb_fx.explicit import explicit_module, export_program

from .lowering import lower_for_onnx
from .maxpool import MAX_POOL_TRANSLATIONS
from .threshold import THRESHOLD_TRANSLATIONS

INPUT_NAMES = ("image", "target")
OUTPUT_NAMES = ("logits", "saliency")
BATCH_DIM = "N"
METADATA_PREFIX = "tsgb."  # metadata_props keys: tsgb.method, tsgb.options, tsgb.version, ...
STANDARD_DOMAINS = ("", "ai.onnx")
_PROTOBUF_LIMIT = 2**31 - 1


def to_onnx(
    explainer,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Export ``explainer`` (a :class:`tsgb_fx.Explainer`) to an ONNX file at ``path``.

    The file has inputs ``image`` (float32 [N, C, H, W], N dynamic unless ``dynamic_batch`` is
    False) and ``target`` (int64 [N]; -1 explains each image's top-1 class), and outputs
    ``logits`` [N, K] and ``saliency`` [N, 1, H, W]. C, H and W are ``example_input``'s (only
    its shape and dtype are used). Every node is of the standard ONNX domain, no local functions
    are left, and the model passes ``onnx.checker.check_model(..., full_check=True)``.

    Every method exports (``tsgb``, ``gradient``, ``grad_x_input``, ``guided_backprop``,
    ``deconvnet``, custom rule maps): the saliency is the explainer's, the channel sum of signal
    x image or, for methods whose attribution is the signal itself, of the signal.

    ``metadata_props`` (keys ``tsgb.*``) record the method, its rule options, whether the
    attribution is signal x image (``tsgb.times_input``, JSON bool: a custom method's name does
    not say), the tsgb-fx version, the input shape, the number of classes and, when given, the
    normalisation ``mean``/``std`` the model expects (one value per channel), so a server can
    prepare images without the training code.

    ``opset``: the ONNX opset to target (default: the exporter's). Returns the written path.
    """
    if not isinstance(explainer, tsgb_fx.Explainer):
        raise TypeError(f"explainer must be a tsgb_fx.Explainer, got {type(explainer).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 3 or example_input.shape[0] == 0:
        raise ValueError(f"example_input must be a batch (N, C, H, W), got shape {tuple(example_input.shape)}")
    channels = example_input.shape[1]
    normalisation = {
        name: _per_channel(name, values, channels) for name, values in (("mean", mean), ("std", std))
        if values is not None
    }
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool)):
        raise TypeError(f"opset must be an int, got {opset!r}")

    example = example_input.detach()
    explicit = lower_for_onnx(explicit_module(explainer, example))
    program = export_program(explicit, example, dynamic_batch=dynamic_batch)
    with torch.inference_mode(False):
        onnx_program = torch.onnx.export(
            program,
            program.example_inputs[0],
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            # torch's max-pool indices without a second pool; threshold as ThresholdedRelu, not Where
            custom_translation_table={**MAX_POOL_TRANSLATIONS, **THRESHOLD_TRANSLATIONS},
            # onnxscript's optimiser folds `x + 1e-10` into `x`, removing every stabiliser that
            # keeps the rules finite (0 / 0 = NaN on all-zero windows); ORT optimises at load.
            optimize=False,
            verbose=False,
        )
    model = _standard_only(onnx_program.model_proto)
    # torchlib casts each Python scalar to its tensor's type with CastLike, which onnxruntime
    # cannot constant-fold (it has no CPU kernel for it): everything computed from the weights
    # alone (TSGB-FC's W+ = max(W, 0) and W- = W - W+) would then run on every call. Folding
    # constants, and nothing else of the optimiser above, resolves them and keeps the stabilisers.
    onnxscript.optimizer.fold_constants(model)
    if dynamic_batch:
        _name_batch_dim(model)
    info = explicit.meta["tsgb_fx"]
    formed = "TSGB signal at the image * image" if info["method"] == "tsgb" else (
        "signal at the image * image" if info["times_input"] else "signal at the image"
    )
    classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    metadata = {
        f"{METADATA_PREFIX}version": tsgb_fx.__version__,
        f"{METADATA_PREFIX}method": info["method"],
        f"{METADATA_PREFIX}options": json.dumps(info["options"], sort_keys=True),
        f"{METADATA_PREFIX}times_input": json.dumps(info["times_input"]),
        f"{METADATA_PREFIX}input_shape": json.dumps(list(info["input_shape"])),
        f"{METADATA_PREFIX}num_classes": str(classes),
        f"{METADATA_PREFIX}target": "int64 [N]: the class to explain per image, -1 = the image's top-1 class",
        f"{METADATA_PREFIX}saliency": f"channel sum of ({formed}), float [N, 1, H, W]",
        **{f"{METADATA_PREFIX}{name}": json.dumps(values) for name, values in normalisation.items()},
    }
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"tsgb-fx {tsgb_fx.__version__}: {info['method']} saliency, forward and backward in one graph"

    path = Path(path)
    large = model.ByteSize() > _PROTOBUF_LIMIT
    if large:  # protobuf cannot hold it in one file: weights go next to it
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, path)
    return path


def _per_channel(name: str, values, channels: int) -> list[float]:
    try:
        floats = [float(v) for v in values]
    except TypeError as error:
        raise TypeError(f"{name} must be a sequence of floats, one per channel, got {values!r}") from error
    if len(floats) != channels:
        raise ValueError(f"{name} has {len(floats)} values but the image has {channels} channels")
    return floats


def _standard_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every local function and check that only standard-domain ops remain."""
    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    foreign = sorted({f"{node.domain}::{node.op_type}" for node in _all_nodes(model.graph) if node.domain not in STANDARD_DOMAINS})
    if foreign:
        raise RuntimeError(f"the exported graph holds non-standard ops: {', '.join(foreign)}")
    used = {node.domain for node in _all_nodes(model.graph)}
    keep = [entry for entry in model.opset_import if entry.domain in STANDARD_DOMAINS or entry.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def _name_batch_dim(model: onnx.ModelProto) -> None:
    """Call the exporter's batch symbol (``s40`` or so) ``N`` wherever shapes mention it."""
    image = model.graph.input[0].type.tensor_type.shape.dim[0]
    symbol = image.dim_param
    if not symbol:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM
