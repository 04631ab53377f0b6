"""``compile=True``: explanations from ``torch.compile`` of the explicit graph.

An eager explain call runs the rule backwards as separate kernels, each a pass over a full
activation tensor (TSGB-Conv's channel sums, the ratio rule's division, the broadcasts). The
explicit graph (:mod:`tsgb_fx.explicit`) holds forward and rule backward as one graph of plain
ops, which Inductor fuses into a few kernels per layer: on ResNet-50 this brings an explanation
close to the cost of a forward pass (benchmarks/README.md).

The price is a one-off compile on the first call for each input signature (channels, spatial
size, dtype, device): about a minute for ResNet-50 on a CPU. On CUDA and in float64 a second
batch size compiles once more, with a dynamic batch from then on (``torch.compile``'s automatic
dynamic shapes); a frozen graph (below) holds one batch size, so there each batch size
compiles once.

On CUDA the graph is compiled with ``mode="reduce-overhead"``: its kernels are replayed as one
CUDA graph. An explanation is hundreds of small kernels, and at batch sizes up to 8 launching
them one by one costs more than running them (ResNet-50 at batch 8, on an H200 in an earlier run:
4.9 ms compiled plainly, 2.6 ms as a CUDA graph, against a 3.4-3.6 ms eager forward; in the H200
run of benchmarks/README.md: 3.4 ms as a CUDA graph against a 4.9 ms eager forward). A replay
writes into the same output buffers every time, so each call's outputs are cloned before they
are returned. Each distinct batch size records a CUDA graph of its own on its first call.

On a CPU, in float32, the graph is compiled with Inductor's ``freezing``: the weights become
constants of the compiled code, so Inductor folds what depends on weights alone (the batch norms
that follow convolutions, into their weights) and packs each convolution's weights once into
the layout its kernel reads, instead of on every call. Side by side in one process, ResNet-50's
compiled explanation at batch 1 went from 124 to 96 ms with it (its eager forward: 122 ms), VGG16's
from 402 to 331 ms; ``make bench-compile`` puts compile=True at 0.7-1.1x the forward on all five
benchmark models (benchmarks/README.md).
Freezing fixes the batch size: it writes the traced graph's symbolic batch into the module as a
constant (torch 2.14), and a recompile of that module for another batch size then fails inside
Dynamo. So a frozen graph is compiled with ``dynamic=False``, one per batch size.
Freezing also costs memory: each frozen graph holds its own copy of the weights, packed for its
kernels, and the compiler's state and generated code stay in the process. After compiling one
batch size, ResNet-50's process held 0.3 GiB more than before, VGG16's 1.2 GiB (528 MiB of
weights, mostly its fully connected layers); every further batch size adds its own copy (ResNet-50
0.2 GiB, VGG16 1.1 GiB; ``make bench-compile``, memory table), and a UserWarning says so when it
happens. An explanation's own peak is lower than eager's.

Graphs are traced from the explainer's current weights. Unfrozen (CUDA, float64), tensors
updated in place (an optimiser step, ``load_state_dict``) are seen, as the graph's buffers alias
them. A frozen graph holds its own (packed) copies. So each call first compares every weight's
storage, and where frozen its version counter, with those the graph was compiled from (0.2 ms
for DenseNet-121's 727 tensors), and compiles afresh after a change, from the new values.
Moving or converting the explainer (``.to``, ``.double()``) drops the graphs, so the next call
traces afresh.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch


class CompiledGraphs:
    """One compiled explicit graph per input signature, built on first use and then reused."""

    def __init__(self):
        self._graphs: dict[tuple, tuple[object, WeightState]] = {}
        self._lock = threading.Lock()

    def __call__(self, explainer, image: torch.Tensor, target: torch.Tensor):
        """``(logits, attribution)`` for ``image`` (N, C, *S) and ``target`` (N,), ``< 0`` for top-1."""
        frozen = freezes(image)
        graph = self._graph(explainer, image, frozen)
        cuda_graph = replays_cuda_graphs(image.device)
        # Dynamo reads the freezing flag as it traces, inside a call (the first, and a recompile
        # for a new batch size), not in torch.compile: there, options={"freezing": True} goes unseen.
        # The flag is global: code compiled by another thread during this call is frozen too.
        freezing = torch._inductor.config.patch(freezing=True) if frozen else contextlib.nullcontext()
        with torch.inference_mode(), freezing:
            if cuda_graph:
                torch.compiler.cudagraph_mark_step_begin()  # a new call: earlier outputs may be reused
            logits, _saliency, attribution = graph(image, target)
            if cuda_graph:  # the next replay overwrites these buffers
                logits, attribution = logits.clone(), attribution.clone()
        return logits, attribution

    def _graph(self, explainer, image: torch.Tensor, frozen: bool):
        from .explicit import explicit_module

        key = (tuple(image.shape if frozen else image.shape[1:]), image.dtype, image.device)
        with self._lock:
            graph, weights = self._graphs.get(key, (None, None))
            if graph is None or weights.changed():
                if graph is None and frozen:
                    self._warn_of_another_batch_size(key)
                module = explicit_module(explainer, image, with_attribution=True)
                mode = "reduce-overhead" if replays_cuda_graphs(image.device) else None
                # frozen: the weights are read once, at the graph's first call; else aliased
                graph = torch.compile(module, mode=mode, dynamic=False if frozen else None)
                self._graphs[key] = (graph, WeightState(explainer, frozen=frozen))
            return graph

    def _warn_of_another_batch_size(self, key: tuple) -> None:
        """A frozen graph for a new batch size of an input already compiled for: say what it costs."""
        shape, dtype, device = key
        compiled = sorted(other[0][0] for other in self._graphs
                          if other[1:] == (dtype, device) and other[0][1:] == shape[1:] and other[0] != shape)
        if compiled:
            warnings.warn(
                f"compile=True: compiling for batch size {shape[0]} as well (already compiled for "
                f"{', '.join(map(str, compiled))}). On a CPU each batch size is a frozen graph of its own: "
                f"minutes to compile, and it holds its own packed copy of the weights (1.1 GiB for VGG16). "
                f"Explaining in batches of one size avoids both (`tsgb explain --compile` pads its last batch).",
                stacklevel=2,
            )

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)


def replays_cuda_graphs(device: torch.device) -> bool:
    """Whether graphs for ``device`` are compiled as CUDA graphs (``mode="reduce-overhead"``)."""
    return device.type == "cuda"


def freezes(image: torch.Tensor) -> bool:
    """Whether the graph for ``image`` is compiled with its weights frozen in: float32 on a CPU.

    Not on CUDA, where the gain is in the CUDA graph; not in float64, whose weights Inductor's
    oneDNN packing refuses (``itensor_view_from_dense expects float/bfloat16/half``).
    """
    return image.device.type == "cpu" and image.dtype == torch.float32


class WeightState:
    """Where every parameter and buffer of a module lives, and for ``frozen`` graphs its version.

    ``.data = ...`` (also ``model.to(...)`` on the model the explainer shares tensors with) gives
    a tensor new storage, which no compiled graph sees: it aliased, or copied, the old one. An
    in-place update (``optimizer.step``, ``load_state_dict``, ``mul_``) bumps the version counter,
    which matters only to a frozen graph, as an aliasing one reads the new values anyway. The
    tensors are kept by reference, so each check reads them as they are now.
    """

    def __init__(self, module: torch.nn.Module, frozen: bool):
        self._tensors = [*module.parameters(), *module.buffers()]
        self._frozen = frozen
        self._state = self._read()

    def _read(self) -> list:
        if self._frozen:
            return [(t.data_ptr(), t._version) for t in self._tensors]
        return [t.data_ptr() for t in self._tensors]

    def changed(self) -> bool:
        return self._read() != self._state
