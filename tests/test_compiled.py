"""compile=True: the compiled explicit graph gives the reference TSGB's maps, and is reused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tsgb_fx
from tsgb_fx.compiled import WeightState

from .helpers import randomise_batch_norm, relative_error
from .reference_tsgb import reference_saliency, swap_in_reference_rules


def _small_cnn() -> nn.Module:
    """Conv-BN-ReLU, a strided conv, a fixed-window average pool and a linear classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )
    return randomise_batch_norm(model).double().eval()


def test_compiled_explainer_matches_the_reference_and_is_reused():
    model = _small_cnn()
    reference = swap_in_reference_rules(model, "7")
    e = tsgb_fx.explainer(model, compile=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    top1 = e(x)
    assert torch.equal(top1.target, model(x).argmax(1))
    assert relative_error(top1.saliency, reference_saliency(reference, x, top1.target)) < 1e-9
    torch.testing.assert_close(top1.logits, model(x).detach())

    # one image, two targets: repeated to a batch of 2, so the same compiled graph serves it
    several = e(x[:1], target=torch.tensor([[1, 3]]))
    assert several.saliency.shape == (1, 2, 16, 16) and several.attribution.shape == (1, 2, 3, 16, 16)
    for column, target in enumerate((1, 3)):
        expected = reference_saliency(reference, x[:1], torch.tensor([target]))
        assert relative_error(several.saliency[:, column : column + 1], expected) < 1e-9
    assert len(e.compiled_graphs) == 1

    with pytest.raises(ValueError, match="target 5 is out of range"):
        e(x, target=5)
    e.float()  # the graphs captured float64 tensors: converting drops them
    assert len(e.compiled_graphs) == 0


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_compiled_graphs_follow_weight_updates_and_leave_the_model_alone(dtype, tolerance):
    """float32 on a CPU: the weights are frozen into the compiled code, so an in-place update (a
    new version) or new storage (``.data =``) must make the next call compile afresh. float64:
    the graph aliases the weights, and must still notice new storage. Against a float64 reference."""
    model = _small_cnn().to(dtype)
    untouched = {name: t.clone() for name, t in model.state_dict().items()}
    e = tsgb_fx.explainer(model, compile=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    e(x.to(dtype), target=target)
    for name, t in model.state_dict().items():  # freezing read the weights and changed none
        assert torch.equal(t, untouched[name]), name

    def check():
        reference = swap_in_reference_rules(copy.deepcopy(model).double(), "7")
        result = e(x.to(dtype), target=target)
        assert relative_error(result.saliency.double(), reference_saliency(reference, x, target)) < tolerance
        torch.testing.assert_close(result.logits, model(x.to(dtype)).detach())

    with torch.no_grad():
        model[0].weight.mul_(-0.5)  # a convolution whose batch norm a frozen graph folds into it
        model[1].running_var.add_(1.0)
    check()
    model[7].weight.data = torch.randn_like(model[7].weight)  # the classifier: new storage
    check()
    # another batch size: compiled again, from the current weights; a frozen graph (float32 on a
    # CPU) is one more graph with its own weights, which the user is told; a dynamic one is not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e(x[:1].to(dtype), target=target[:1])
    told = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    if dtype == torch.float32:
        assert len(told) == 1 and "batch size 1 as well (already compiled for 2)" in told[0]
    else:
        assert told == []
    with torch.no_grad():
        model[3].bias.add_(0.25)
    check()


def test_float32_graphs_on_a_cpu_hold_their_weights_as_constants():
    """Freezing is in effect (torch.compile's options={"freezing": True} is silently ignored):
    the compiled graph itself, called without the explainer's weight check, keeps the old values."""
    model = _small_cnn().float()
    e = tsgb_fx.explainer(model, compile=True)
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 3])
    before = e(x, target=target).logits
    ((graph, _weights),) = e.compiled_graphs._graphs.values()
    with torch.no_grad():
        model[7].bias.add_(1.0)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        stale_logits = graph(x, target)[0]
    torch.testing.assert_close(stale_logits, before)
    torch.testing.assert_close(e(x, target=target).logits, before + 1.0)


def test_weight_state_sees_new_storage_always_and_new_versions_where_frozen():
    """What makes a graph recompile: a frozen one copied the values, an aliasing one (CUDA) reads
    the same storage and so sees in-place updates, but not a tensor moved to new storage."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    aliasing, frozen = WeightState(model, frozen=False), WeightState(model, frozen=True)
    assert not aliasing.changed() and not frozen.changed()
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
    assert frozen.changed() and not aliasing.changed()
    model[0].weight.data = model[0].weight.data.clone()
    assert aliasing.changed()


def test_compile_flag_is_checked():
    with pytest.raises(TypeError, match="compile must be True or False"):
        tsgb_fx.explainer(_small_cnn(), compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_eager_maps_and_keep_earlier_results():
    """On CUDA the graph is replayed as a CUDA graph into the same buffers: a result must not
    change when the next call runs."""
    model = _small_cnn().cuda()  # float64: no TF32 convolutions, so the two paths agree to rounding
    eager = tsgb_fx.explainer(model)
    compiled = tsgb_fx.explainer(model, compile=True)
    first_image, second_image = torch.randn(2, 2, 3, 16, 16, dtype=torch.float64, device="cuda")

    first = compiled(first_image, target=1)
    first_saliency = first.saliency.clone()
    second = compiled(second_image, target=3)
    assert torch.equal(first.saliency, first_saliency)
    for result, image, target in ((first, first_image, 1), (second, second_image, 3)):
        expected = eager(image, target=target)
        assert relative_error(result.saliency, expected.saliency) < 1e-9
        torch.testing.assert_close(result.logits, expected.logits)
