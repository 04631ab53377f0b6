"""tsgb_export: deploy a tsgb-fx explainer as one ONNX graph and run it without PyTorch.

Two halves with different dependencies:

* :func:`to_onnx` (``pip install 'tsgb-fx[export]'``, needs torch, onnx, onnxscript): writes the
  explainer's explicit graph (forward plus TSGB backward as ordinary ops, see
  :mod:`tsgb_fx.explicit`) as an ``.onnx`` file with inputs ``image`` [N,C,H,W] and ``target``
  [N] (-1 = top-1) and outputs ``logits`` [N,K] and ``saliency`` [N,1,H,W].
* :class:`~tsgb_export.runtime.OnnxExplainer` (numpy + onnxruntime, or onnxruntime-gpu): runs
  such a file. Importing it never imports torch.

Both names are resolved lazily, so ``import tsgb_export.runtime`` on a server pulls in neither
torch nor onnx.

>>> from tsgb_export import to_onnx
>>> to_onnx(tsgb_fx.explainer(model), "resnet18_tsgb.onnx", torch.randn(1, 3, 224, 224))
>>> from tsgb_export.runtime import OnnxExplainer
>>> r = OnnxExplainer("resnet18_tsgb.onnx")(images)        # numpy float32 (N, 3, 224, 224)
>>> r.saliency.shape, r.target                              # (N, 1, 224, 224), top-1 classes
"""

from __future__ import annotations

__all__ = ["OnnxExplainer", "OnnxExplanation", "to_onnx"]


def __getattr__(name: str):
    if name == "to_onnx":
        from .convert import to_onnx

        return to_onnx
    if name in ("OnnxExplainer", "OnnxExplanation"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'tsgb_export' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
