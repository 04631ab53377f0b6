"""Small shared test utilities."""

from __future__ import annotations

import torch
from torch import nn


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every batch norm, so none is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||."""
    return float((actual - expected).norm() / expected.norm())


def map_error(actual, expected) -> float:
    """Largest per-image ``max |actual - expected| / max |expected|``, in float64.

    The measure for round trips (issue 7): a map's scale is arbitrary (it follows the logit and
    the image), so each image's worst pixel error is divided by that image's largest map value;
    the worst image counts. Stricter than the relative L2 error of :func:`relative_error`, which
    lets a few bad pixels hide in the norm of a large map. Takes tensors or numpy arrays.
    """
    actual = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    errors = (actual - expected).abs().flatten(1).amax(dim=1)
    scales = expected.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((errors / scales).max())
