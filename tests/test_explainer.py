"""The explainer's contract: untouched model, targets, reuse, errors, finiteness, dtypes, devices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tsgb_fx

from .helpers import map_error, randomise_batch_norm


class SmallNet(nn.Module):
    """Conv/BN/in-place ReLU/dropout/avg-pool/linear: every rule kind and every mode-dependent layer."""

    def __init__(self, channels=3, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        x = self.features(x)
        return self.head(F.adaptive_avg_pool2d(x, 2))


def small_net(seed=0):
    torch.manual_seed(seed)
    model = SmallNet()
    model(torch.randn(1, 3, 16, 16))  # materialise the lazy layer
    return randomise_batch_norm(model, seed)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomise_batch_norm(torchvision.models.resnet18(num_classes=20)).eval()


@pytest.fixture(scope="module")
def resnet_explainer(resnet):
    return tsgb_fx.explainer(resnet)


def _snapshot(model: nn.Module):
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "objects": {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "inplace": {name: m.inplace for name, m in model.named_modules() if hasattr(m, "inplace")},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        },
        "patched": [name for name, m in model.named_modules() if "forward" in m.__dict__],
    }


# --------------------------------------------------------------------------- model untouched


@pytest.mark.parametrize("train_mode", [True, False])
def test_model_is_never_modified(train_mode):
    model = small_net()
    model.features[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    model.train(train_mode)
    before = _snapshot(model)
    e = tsgb_fx.explainer(model)
    for _ in range(2):
        e(torch.randn(2, 3, 16, 16), target=3)
    after = _snapshot(model)
    for key in ("requires_grad", "training", "inplace", "hooks", "patched"):
        assert after[key] == before[key], key
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name  # running stats not updated either
        assert after["objects"][name] is before["objects"][name], name
    assert all(p.grad is None for p in model.parameters())


def test_explains_with_eval_semantics_whatever_the_mode():
    model = small_net().train()
    x = torch.randn(4, 3, 16, 16)
    e = tsgb_fx.explainer(model)
    first, second = e(x), e(x)
    expected = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(first.logits, expected)
    torch.testing.assert_close(first.saliency, second.saliency)  # dropout off: deterministic


def test_parameters_are_shared_not_copied():
    model = small_net().eval()
    e = tsgb_fx.explainer(model)
    explainer_tensors = {id(t) for t in e.state_dict(keep_vars=True).values()}
    assert all(id(p) in explainer_tensors for p in model.parameters())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # a weight update is seen by the explainer
    torch.testing.assert_close(e(x).logits, model(x))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_input_tensor_is_not_written(requires_grad):
    model = small_net().eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=requires_grad)
    original = x.detach().clone()
    tsgb_fx.explainer(model)(x)
    assert torch.equal(x.detach(), original)
    assert x.grad is None and x.requires_grad == requires_grad


def test_no_retracing_on_call(resnet_explainer, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(torch.fx.Tracer, "trace", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)
    resnet_explainer(torch.randn(1, 3, 32, 32))
    resnet_explainer(torch.randn(3, 3, 48, 40), target=1)


def test_rebuilt_from_a_saved_state_dict_gives_the_same_maps(tmp_path, resnet, resnet_explainer):
    x = torch.randn(2, 3, 32, 32)
    torch.save(resnet_explainer.state_dict(), tmp_path / "explainer.pt")
    fresh = tsgb_fx.explainer(torchvision.models.resnet18(num_classes=20))
    fresh.load_state_dict(torch.load(tmp_path / "explainer.pt", weights_only=True))
    torch.testing.assert_close(fresh(x).saliency, resnet_explainer(x).saliency)


# --------------------------------------------------------------------------- targets


def test_default_target_is_top1(resnet, resnet_explainer):
    x = torch.randn(3, 3, 32, 32)
    result = resnet_explainer(x)
    assert torch.equal(result.target, resnet(x).argmax(1))
    assert result.saliency.shape == (3, 1, 32, 32) and result.attribution.shape == (3, 3, 32, 32)
    torch.testing.assert_close(result.saliency, result.attribution.sum(1, keepdim=True))
    assert not result.saliency.requires_grad


@pytest.mark.parametrize("spelling", ["int", "list", "tensor", "0-d"])
def test_target_spellings_agree(resnet_explainer, spelling):
    x = torch.randn(2, 3, 32, 32)
    target = {"int": 7, "list": [7, 7], "tensor": torch.tensor([7, 7]), "0-d": torch.tensor(7)}[spelling]
    result = resnet_explainer(x, target=target)
    assert result.target.tolist() == [7, 7]
    torch.testing.assert_close(result.saliency, resnet_explainer(x, target=[7, 7]).saliency)


def test_nested_list_targets_equal_a_tensor(resnet_explainer):
    x = torch.randn(2, 3, 32, 32)
    nested = resnet_explainer(x, target=[[1, 5], (0, 19)])
    single = resnet_explainer(x, target=torch.tensor([5, 19]))
    assert nested.target.tolist() == [[1, 5], [0, 19]]
    torch.testing.assert_close(nested.saliency[:, 1:2], single.saliency)


def test_multi_target_batch_equals_single_target_runs(resnet_explainer):
    x = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([[1, 5, 9], [0, 0, 19]])
    batched = resnet_explainer(x, target=targets)
    assert batched.saliency.shape == (2, 3, 32, 32) and batched.attribution.shape == (2, 3, 3, 32, 32)
    assert torch.equal(batched.target, targets)
    for t in range(3):
        single = resnet_explainer(x, target=targets[:, t])
        torch.testing.assert_close(batched.saliency[:, t : t + 1], single.saliency)
        torch.testing.assert_close(batched.logits, single.logits)


def test_maps_differ_between_targets(resnet_explainer):
    x = torch.randn(1, 3, 32, 32)
    a, b = resnet_explainer(x, target=1).saliency, resnet_explainer(x, target=2).saliency
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "target, error, words",
    [
        (20, ValueError, "out of range"),
        (-1, ValueError, "out of range"),
        ([1, 2, 3], ValueError, "batch size"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer"),
        (1.5, TypeError, "target"),
        (True, TypeError, "boolean"),
        ("cat", TypeError, "target"),
        (torch.zeros(2, 1, 1, dtype=torch.long), ValueError, "shape"),
        ([[1, 2], [3]], ValueError, "same number"),
        ([[1, 2.5], [3, 4]], TypeError, "integer"),
    ],
)
def test_bad_target_is_refused_by_name(resnet_explainer, target, error, words):
    with pytest.raises(error, match="target") as info:
        resnet_explainer(torch.randn(2, 3, 32, 32), target=target)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.randn(3, 32, 32), ValueError, "4-D"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.tensor(float("inf")).expand(1, 3, 32, 32), ValueError, "infinite"),
        (torch.randn(1, 3, 32, 32).index_fill_(3, torch.tensor([7]), float("nan")), ValueError, "NaN"),
        (torch.tensor([float("inf"), -float("inf")]).repeat(1536).view(1, 3, 32, 32), ValueError, "infinite"),
        (torch.randn(1, 4, 32, 32), ValueError, "channels"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(1, 3, 32, 32).numpy(), TypeError, "torch.Tensor"),
        (torch.randn(0, 3, 32, 32), ValueError, "non-empty"),
    ],
)
def test_bad_input_is_refused_by_name(resnet_explainer, x, error, words):
    with pytest.raises(error, match="x") as info:
        resnet_explainer(x)
    assert words in str(info.value)


def test_finite_input_whose_sum_overflows_is_accepted(resnet_explainer):
    """The finiteness check may not mistake an overflowing sum of finite values for bad input."""
    x = torch.full((1, 3, 32, 32), 3e38)
    assert not torch.isfinite(x.sum()) and torch.isfinite(x).all()
    assert resnet_explainer(x).saliency.shape == (1, 1, 32, 32)


def test_bad_options_are_refused_by_name():
    model = small_net()
    for kwargs, name in [
        (dict(method="lrp"), "method"), (dict(conv_groups="depthwise"), "conv_groups"),
        (dict(classifier="first"), "classifier"), (dict(tracer="jit"), "tracer"),
        (dict(leaf_modules=[3]), "leaf_modules"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            tsgb_fx.explainer(model, **kwargs)
    with pytest.raises(TypeError, match="model"):
        tsgb_fx.explainer(lambda x: x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module_and_what_to_try():
    with pytest.raises(tsgb_fx.TraceError) as info:
        tsgb_fx.explainer(DataDependent(), tracer="fx")
    message = str(info.value)
    assert "'gate'" in message and "leaf_modules" in message and "tracer='export'" in message


def test_untraceable_module_works_as_a_leaf():
    model = DataDependent().eval()
    e = tsgb_fx.explainer(model, leaf_modules=[Gate])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(e(x).logits, model(x))
    assert e.tracer == "fx"


def test_auto_tracer_reports_both_failures():
    with pytest.raises(tsgb_fx.TraceError, match="fallback"):
        tsgb_fx.explainer(DataDependent(), example_input=torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.efficientnet_b0, torchvision.models.densenet121])
@pytest.mark.parametrize("scale", [0.0, 1e4, 1e-6])
def test_every_finite_input_gives_a_finite_map(factory, scale):
    torch.manual_seed(0)
    model = randomise_batch_norm(factory(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32) * scale
    result = tsgb_fx.explainer(model)(x)
    assert torch.isfinite(result.saliency).all() and torch.isfinite(result.attribution).all()


def test_dead_relu_windows_and_vanishing_negative_evidence_stay_finite():
    model = small_net().eval()
    with torch.no_grad():
        model.features[0].bias.fill_(-100.0)  # every first-layer ReLU is dead
        model.head[-1].weight.abs_()  # no negative classifier weight: z- = 0
    result = tsgb_fx.explainer(model)(torch.rand(2, 3, 16, 16))
    assert torch.isfinite(result.saliency).all()


# --------------------------------------------------------------------------- dtypes and devices


def test_float64_explainer():
    model = small_net().double().eval()
    result = tsgb_fx.explainer(model)(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert result.saliency.dtype == torch.float64 and torch.isfinite(result.saliency).all()


def test_to_converts_the_explainer():
    model = small_net().eval()
    e = tsgb_fx.explainer(model).to(torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(e(x).logits, model.double()(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = small_net().eval()
    x = torch.randn(2, 3, 16, 16)
    cpu = tsgb_fx.explainer(model)(x)
    gpu = tsgb_fx.explainer(copy.deepcopy(model)).to("cuda")(x.cuda())
    torch.testing.assert_close(gpu.saliency.cpu(), cpu.saliency, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_cuda_matches_cpu_on_full_size_models(name):
    """The paths that differ by device (batch-chunked channel sums on the CPU only; folded batch
    norms, ReLU6 and SiLU folds, depthwise masks on both) give the same maps: float64, so no TF32
    and only the summation order differs, at 224x224, where the CPU chunks its channel sums."""
    torch.manual_seed(0)
    model = randomise_batch_norm(torchvision.models.get_model(name, num_classes=10)).eval().double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    cpu = tsgb_fx.explainer(model)(x, target=[1, 7])
    gpu = tsgb_fx.explainer(copy.deepcopy(model).cuda())(x.cuda(), target=[1, 7])
    assert map_error(gpu.saliency, cpu.saliency) < 1e-8
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits)
