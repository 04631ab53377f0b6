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
