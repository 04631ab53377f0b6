"""Run an exported explainer with ONNX Runtime: numpy in, numpy out, no PyTorch.

This module imports numpy and onnxruntime only (``pip install 'tsgb-fx[export]'`` on a CPU
machine, ``'tsgb-fx[gpu]'`` on a CUDA server: onnxruntime-gpu replaces the CPU wheel, the two
must not be installed together).

>>> from tsgb_export.runtime import OnnxExplainer
>>> e = OnnxExplainer("resnet18_tsgb.onnx")           # CUDA if onnxruntime-gpu offers it
>>> r = e(images)                                     # float32 (N, C, H, W), normalised
>>> r.logits, r.saliency, r.target                    # (N, K), (N, 1, H, W), (N,)
>>> r = e(images, target=[285, 281])                  # given classes; -1 = top-1
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class OnnxExplanation:
    """The result of one call: ``logits`` (N, K), ``saliency`` (N, 1, H, W), ``target`` (N,) int64.

    ``target`` holds the explained class of every image (top-1 where -1 was asked for).
    """

    logits: np.ndarray
    saliency: np.ndarray
    target: np.ndarray


class OnnxExplainer:
    """An ONNX Runtime session for a file written by :func:`tsgb_export.to_onnx`.

    ``providers``: onnxruntime execution providers in order of preference; by default
    ``CUDAExecutionProvider`` when this onnxruntime offers it, then the CPU.
    ``session_options``: an ``onnxruntime.SessionOptions`` (default: warnings off).

    Attributes: ``input_shape`` (C, H, W), ``num_classes``, ``batch_size`` (None if dynamic),
    ``providers`` (those the session runs on), ``metadata`` (the file's ``metadata_props``,
    ``tsgb.`` prefix dropped and JSON values decoded: method, options, times_input, version,
    input_shape, num_classes, mean/std where recorded), ``mean`` and ``std`` (per-channel normalisation the
    model expects, None where the file does not say; the caller applies it), ``class_names``
    (where ``tsgb export`` recorded them, else None).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence | None = None,
                 session_options: ort.SessionOptions | None = None):
        if providers is None:
            available = ort.get_available_providers()
            providers = [name for name in PREFERRED_PROVIDERS if name in available]
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3
        self.session = ort.InferenceSession(os.fspath(path), sess_options=session_options, providers=list(providers))
        inputs = {value.name: value for value in self.session.get_inputs()}
        outputs = {value.name: value for value in self.session.get_outputs()}
        if set(inputs) != {"image", "target"} or not {"logits", "saliency"} <= set(outputs):
            raise ValueError(
                f"{os.fspath(path)!r} is not a tsgb-fx explainer graph: inputs {sorted(inputs)}, "
                f"outputs {sorted(outputs)} (expected image, target -> logits, saliency)"
            )
        image, logits = inputs["image"], outputs["logits"]
        self.input_shape = tuple(image.shape[1:])
        batch = image.shape[0]
        self.batch_size = batch if isinstance(batch, int) else None
        self.num_classes = logits.shape[1] if isinstance(logits.shape[1], int) else None
        self._dtype = _NUMPY_TYPES.get(image.type, np.float32)
        self.providers = tuple(self.session.get_providers())
        self.metadata = {
            key.removeprefix("tsgb."): _decode(value)
            for key, value in self.session.get_modelmeta().custom_metadata_map.items()
        }
        preprocessing = self.metadata.get("preprocessing")
        preprocessing = preprocessing if isinstance(preprocessing, dict) else {}
        self.mean = self.metadata.get("mean", preprocessing.get("mean"))
        self.std = self.metadata.get("std", preprocessing.get("std"))
        self.class_names = self.metadata.get("class_names")

    def __repr__(self) -> str:
        return (
            f"OnnxExplainer(method={self.metadata.get('method')!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, providers={list(self.providers)})"
        )

    def __call__(self, image, target=None) -> OnnxExplanation:
        """Explain ``image`` (N, C, H, W): each image's top-1 class, or ``target`` (an int or N ints, -1 = top-1)."""
        image = self._check_image(image)
        target = self._check_target(target, image.shape[0])
        logits, saliency = self.session.run(["logits", "saliency"], {"image": image, "target": target})
        explained = np.where(target < 0, logits.argmax(axis=1), target).astype(np.int64)
        return OnnxExplanation(logits, saliency, explained)

    # -- checks -----------------------------------------------------------------------------

    def _check_image(self, image) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            if not hasattr(image, "__array__"):
                raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
            image = np.asarray(image)
        expected = f"(N, {', '.join(map(str, self.input_shape))})"
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(
                f"image must be a float array (scaled and normalised as in training), got dtype {image.dtype}"
            )
        if image.ndim != 1 + len(self.input_shape):
            raise ValueError(f"image must have shape {expected}, got {image.shape}")
        if image.shape[0] == 0:
            raise ValueError("image must hold at least one image (N >= 1)")
        if any(isinstance(want, int) and got != want for got, want in zip(image.shape[1:], self.input_shape)):
            raise ValueError(f"image must have shape {expected}, got {image.shape}")
        if self.batch_size is not None and image.shape[0] != self.batch_size:
            raise ValueError(f"this file was exported for batch size {self.batch_size}, got {image.shape[0]} images")
        image = np.ascontiguousarray(image, dtype=self._dtype)
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        return image

    def _check_target(self, target, batch: int) -> np.ndarray:
        if target is None:
            return np.full(batch, -1, dtype=np.int64)
        if isinstance(target, (bool, np.bool_)):
            raise TypeError("target must be an integer class index, got a boolean")
        array = np.asarray(target)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"target must hold integer class indices, got dtype {array.dtype}")
        if array.ndim == 0:
            array = np.full(batch, int(array), dtype=np.int64)
        if array.ndim != 1 or array.shape[0] != batch:
            raise ValueError(f"target must be an int or have shape ({batch},) (one class per image), got shape {array.shape}")
        array = array.astype(np.int64)
        if self.num_classes is not None and ((array < -1) | (array >= self.num_classes)).any():
            bad = array[(array < -1) | (array >= self.num_classes)][0]
            raise ValueError(
                f"target {bad} is out of range: the model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1}, or -1 for the top-1 class)"
            )
        return array


_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


def _decode(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
