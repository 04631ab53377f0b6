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

Graphs are traced from the explainer's current weights: tensors updated in place (an optimiser
step, ``load_state_dict``) are seen, as the graph's buffers alias them; moving or converting
the explainer (``.to``, ``.double()``) drops the graphs so the next call traces afresh.
"""

from __future__ import annotations

import threading

import torch


class CompiledGraphs:
    """One compiled explicit graph per input signature, built on first use and then reused."""

    def __init__(self):
        self._graphs: dict[tuple, object] = {}
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
            if key not in self._graphs:
                module = explicit_module(explainer, image, with_attribution=True)
                mode = "reduce-overhead" if replays_cuda_graphs(image.device) else None
                self._graphs[key] = torch.compile(module, mode=mode)
            return self._graphs[key]

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)


def replays_cuda_graphs(device: torch.device) -> bool:
    """Whether graphs for ``device`` are compiled as CUDA graphs (``mode="reduce-overhead"``)."""
    return device.type == "cuda"
