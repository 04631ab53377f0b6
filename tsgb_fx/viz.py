"""Saliency overlays as PNG files (matplotlib, Agg; no window, no pyplot state).

:func:`overlay` blends one map over a photo; :func:`save_panels` writes the photo next to one
overlay per explained class, each titled with the class name and its probability.

Display: the map is clamped at 0 (the positive part, evidence for the class) and scaled to
[0, 1]. The reference divides by the maximum; pixel-level maps have a few very bright pixels
(stride-2 convolutions leave a grid), so here the scale is the 99.5th percentile of the
positive values, clipped at 1 (``percentile=100`` gives the reference's max). The map, computed
at the model's input size, is resized back to the photo's own size, so the picture keeps the
photo's aspect ratio, and blended over a grey, slightly darkened copy of the photo so that the
colormap's colours read as the map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def positive_normalised(saliency, percentile: float = 99.5) -> np.ndarray:
    """``min(max(S, 0) / scale, 1)``, scale the ``percentile`` of the positive values (zeros if none)."""
    array = saliency.detach().cpu().double().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency, dtype=float)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"a saliency map to display must be 2-D (H, W), got shape {array.shape}")
    positive = np.clip(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    if not (positive > 0).any():
        return positive
    scale = np.percentile(positive[positive > 0], percentile)
    return np.clip(positive / scale, 0.0, 1.0) if scale > 0 else positive


def _resize(map2d: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(map2d, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0, 1).numpy()


def _as_rgb(photo) -> np.ndarray:
    array = np.asarray(photo)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"photo must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array.astype(float), 0, 1) * 255 if array.max() <= 1.0 else np.clip(array, 0, 255)
    return array.astype(np.float32) / 255.0


def overlay(photo, saliency, cmap: str = "jet", strength: float = 0.8, percentile: float = 99.5) -> np.ndarray:
    """The photo with the positive, normalised map blended over it: (H, W, 3) floats in [0, 1].

    Each pixel mixes a grey, 0.8-dimmed copy of the photo and the colormap with weight
    ``strength * sqrt(s)``: where the map is 0 the photo shows, weak evidence tints, the
    strongest is mostly colour.
    """
    from matplotlib import colormaps

    rgb = _as_rgb(photo)
    height, width = rgb.shape[:2]
    s = _resize(positive_normalised(saliency, percentile), height, width)
    heat = colormaps[cmap](s)[..., :3].astype(np.float32)
    grey = 0.8 * rgb.mean(axis=-1, keepdims=True)
    weight = (strength * np.sqrt(s))[..., None]
    return np.clip((1 - weight) * grey + weight * heat, 0.0, 1.0)


def save_panels(
    path,
    photo,
    saliency: Sequence,
    titles: Sequence[str],
    photo_title: str = "",
    cmap: str = "jet",
    dpi: int = 100,
) -> Path:
    """Write ``[photo | overlay_1 | ... | overlay_T]`` side by side to the PNG ``path``.

    ``saliency``: T maps (each (H, W) or (1, H, W); tensor or array), ``titles``: T strings
    (e.g. "285 Egyptian cat  p=0.79"). The panel height is about 3 inches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(saliency) != len(titles):
        raise ValueError(f"{len(saliency)} maps but {len(titles)} titles")
    rgb = _as_rgb(photo)
    height, width = rgb.shape[:2]
    panels = 1 + len(saliency)
    panel_height = 3.0
    panel_width = panel_height * width / height
    figure = Figure(figsize=(panel_width * panels, panel_height + 0.45), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_title(photo_title, fontsize=9)
    for ax, map2d, title in zip(axes[1:], saliency, titles):
        ax.imshow(overlay(rgb, map2d, cmap=cmap))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    figure.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.9, wspace=0.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
