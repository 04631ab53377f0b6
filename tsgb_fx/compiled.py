"""``compile=True``: explanations from ``torch.compile`` of the explicit graph.

An eager explain call runs the rule backwards as separate kernels, each a pass over a full
activation tensor (TSGB-Conv's channel sums, the ratio rule's division, the broadcasts). The
explicit graph (:mod:`tsgb_fx.explicit`) holds forward and rule backward as one graph of plain
ops, which Inductor fuses into a few kernels per layer: on ResNet-50 this brings an explanation
close to the cost of a forward pass (benchmarks/README.md).

The price is a one-off compile on the first call for each input signature (channels, spatial
size, dtype, device): about a minute for ResNet-50 on a CPU. A second batch size compiles once
more, with a dynamic batch from then on (``torch.compile``'s automatic dynamic shapes).

On CUDA the graph is compiled with ``mode="reduce-overhead"``: its kernels are replayed as one
CUDA graph. An explanation is hundreds of small kernels, and at batch sizes up to 8 launching
them one by one costs more than running them (ResNet-50 at batch 8 on an H200: 4.9 ms compiled
plainly, 2.6 ms as a CUDA graph, against a 3.4-3.6 ms eager forward; on an H100, 3.5 ms as a CUDA
graph against a 7.3 ms eager forward and a 24 ms eager explanation, benchmarks/README.md). A replay
writes into the same output buffers every time, so each call's outputs are cloned before they
are returned. Each distinct batch size records a CUDA graph of its own on its first call.

Elsewhere (a CPU) the graph is compiled with Inductor's ``freezing``: the weights become
constants of the compiled code, so Inductor folds what depends on weights alone (the batch norms
that follow convolutions, into their weights) and packs each convolution's weights once into
the layout its kernel reads, instead of on every call. That is most of a forward's time at batch
1 on a CPU: ResNet-50's compiled explanation went from 124 to 96 ms (its eager forward: 122 ms).

Graphs are traced from the explainer's current weights. Unfrozen (CUDA), tensors updated in
place (an optimiser step, ``load_state_dict``) are seen, as the graph's buffers alias them. A
frozen graph holds its own (packed) copies, so each call first compares every weight's storage
and version counter with those it was compiled from (0.2 ms for DenseNet-121's 727 tensors) and
compiles afresh after a change, from the new values. Moving or converting the explainer (``.to``, ``.double()``) drops
the graphs, so the next call traces afresh.
"""

from __future__ import annotations

import threading

import torch


class CompiledGraphs:
    """One compiled explicit graph per input signature, built on first use and then reused."""

    def __init__(self):
        self._graphs: dict[tuple, tuple[object, WeightState | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, explainer, image: torch.Tensor, target: torch.Tensor):
        """``(logits, attribution)`` for ``image`` (N, C, *S) and ``target`` (N,), ``< 0`` for top-1."""
        graph = self._graph(explainer, image)
        cuda_graph = replays_cuda_graphs(image.device)
        with torch.inference_mode():
            if cuda_graph:
                torch.compiler.cudagraph_mark_step_begin()  # a new call: earlier outputs may be reused
            logits, _saliency, attribution = graph(image, target)
            if cuda_graph:  # the next replay overwrites these buffers
                logits, attribution = logits.clone(), attribution.clone()
        return logits, attribution

    def _graph(self, explainer, image: torch.Tensor):
        from .explicit import explicit_module

        key = (tuple(image.shape[1:]), image.dtype, image.device)
        with self._lock:
            graph, weights = self._graphs.get(key, (None, None))
            if graph is None or (weights is not None and weights.changed()):
                module = explicit_module(explainer, image, with_attribution=True)
                if replays_cuda_graphs(image.device):
                    graph, weights = torch.compile(module, mode="reduce-overhead"), None
                else:  # frozen: the weights are read once, at the graph's first call
                    graph, weights = torch.compile(module, options={"freezing": True}), WeightState(explainer)
                self._graphs[key] = (graph, weights)
            return graph

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)


def replays_cuda_graphs(device: torch.device) -> bool:
    """Whether graphs for ``device`` are compiled as CUDA graphs (``mode="reduce-overhead"``)."""
    return device.type == "cuda"


class WeightState:
    """The storage and version counter of every parameter and buffer of a module, as they were.

    An in-place update bumps a tensor's version counter (``optimizer.step``, ``load_state_dict``,
    ``mul_``), and ``.data = ...`` gives it new storage: either means values a frozen graph
    may not hold. The tensors are kept by reference, so each check reads them as they are now.
    """

    def __init__(self, module: torch.nn.Module):
        self._tensors = [*module.parameters(), *module.buffers()]
        self._state = self._read()

    def _read(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t._version) for t in self._tensors]

    def changed(self) -> bool:
        return self._read() != self._state
