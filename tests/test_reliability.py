"""Reliability: threads, memory layouts, and the caller's tensors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision

import tsgb_fx

from .helpers import randomise_batch_norm


def _explainer():
    torch.manual_seed(0)
    return tsgb_fx.explainer(randomise_batch_norm(torchvision.models.resnet18(num_classes=10)).eval())


def test_concurrent_calls_match_sequential_calls():
    explainer = _explainer()
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(8)]
    targets = [torch.randint(0, 10, (2,)) for _ in range(8)]
    sequential = [explainer(x, target=t).saliency for x, t in zip(batches, targets)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda args: explainer(*args).saliency, zip(batches, targets)))
    for a, b in zip(sequential, concurrent):
        torch.testing.assert_close(a, b)


def test_channels_last_and_non_contiguous_inputs_give_the_same_map():
    explainer = _explainer()
    x = torch.randn(2, 3, 32, 32)
    expected = explainer(x, target=3).saliency
    channels_last = x.to(memory_format=torch.channels_last)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    assert not transposed.is_contiguous()
    for layout in (channels_last, transposed, x[:, :, :, :]):
        before = layout.clone()
        torch.testing.assert_close(explainer(layout, target=3).saliency, expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(layout, before)


def test_calls_under_inference_mode_and_no_grad_still_explain():
    explainer = _explainer()
    x = torch.randn(1, 3, 32, 32)
    expected = explainer(x, target=2).saliency
    with torch.inference_mode():
        inside_inference = explainer(x, target=2).saliency
        inference_tensor = x.clone()  # an inference tensor, which autograd cannot record
        from_inference_tensor = explainer(inference_tensor, target=2).saliency
    torch.testing.assert_close(from_inference_tensor, expected)
    with torch.no_grad():
        inside_no_grad = explainer(x, target=2).saliency
    torch.testing.assert_close(inside_inference, expected)
    torch.testing.assert_close(inside_no_grad, expected)
