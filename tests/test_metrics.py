"""Saliency metrics on synthetic cases whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tsgb_fx
from tsgb_fx import metrics


# --------------------------------------------------------------------------- pointing games


def test_grid_pointing_game_known_answers():
    maps = torch.zeros(4, 1, 6, 6)
    maps[0, 0, :3, 3:] = 2.0                 # all saliency in cell 1 (top right)
    maps[1] = 1.0                            # uniform
    maps[2, 0, :3, :3] = 1.0                 # half in cell 0, half in cell 3
    maps[2, 0, 3:, 3:] = 1.0
    maps[2, 0, 3:, :3] = -5.0                # negative evidence does not count
    maps[3, 0, 1, 1] = 0.0                   # nothing positive: undefined
    scores = metrics.grid_pointing_game(maps, torch.tensor([1, 2, 0, 0]))
    assert scores[:3].tolist() == [1.0, 0.25, 0.5]
    assert math.isnan(scores[3])
    assert metrics.grid_pointing_game(maps[:1, 0], 0).tolist() == [0.0]  # (N, H, W) maps too


def test_grid_pointing_game_3x3_and_uneven_sizes():
    maps = torch.ones(2, 1, 10, 11)
    assert torch.allclose(metrics.grid_pointing_game(maps, 4, grid=3), torch.full((2,), 12 / 110, dtype=torch.float64))
    one_cell = torch.zeros(1, 1, 9, 9)
    one_cell[0, 0, 6:, 3:6] = 1.0            # cell 7 of 3 x 3
    assert metrics.grid_pointing_game(one_cell, 7, grid=3).tolist() == [1.0]
    assert metrics.grid_pointing_game(one_cell, 8, grid=3).tolist() == [0.0]
    assert metrics.grid_cell_boxes(10, 11, 3).tolist() == [
        [0, 0, 4, 3], [4, 0, 7, 3], [7, 0, 11, 3], [0, 3, 4, 7], [4, 3, 7, 7],
        [7, 3, 11, 7], [0, 7, 4, 10], [4, 7, 7, 10], [7, 7, 11, 10],
    ]
    with pytest.raises(ValueError, match="cell"):
        metrics.grid_pointing_game(maps, 9, grid=3)


def test_energy_pointing_game_boxes_and_unions():
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 2:4, 2:6] = 1.0               # 8 pixels
    maps[0, 0, 6, 6] = 8.0                   # as much energy again, outside the box
    maps[1] = torch.arange(64.0).view(8, 8)
    boxes = torch.tensor([[2, 2, 6, 4], [0, 0, 8, 4]])  # x0, y0, x1, y1 (exclusive)
    scores = metrics.energy_pointing_game(maps, boxes)
    assert scores[0] == 0.5
    assert scores[1] == pytest.approx(sum(range(32)) / sum(range(64)))
    two_boxes = torch.tensor([[[2, 2, 6, 4], [6, 6, 7, 7]], [[0, 0, 8, 4], [0, 0, 8, 4]]])  # unions
    assert metrics.energy_pointing_game(maps, two_boxes).tolist() == [1.0, scores[1].item()]


# --------------------------------------------------------------------------- insertion / deletion


class RegionMean(nn.Module):
    """One-logit toy model whose output is the mean of the first channel over a region."""

    def __init__(self, rows=slice(0, 2), cols=slice(0, 2)):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        return x[:, 0, self.rows, self.cols].mean((1, 2))[:, None]


def _region_case():
    image = torch.ones(1, 2, 4, 4)
    saliency = torch.zeros(1, 1, 4, 4)
    saliency[0, 0, :2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # the region first, then ties
    return image, saliency


def test_deletion_curve_of_a_region_mean_model():
    image, saliency = _region_case()
    auc, curve = metrics.deletion(RegionMean(), image, saliency, 0, steps=16, softmax=False)
    expected = [1.0, 0.75, 0.5, 0.25] + [0.0] * 13
    assert curve[0].tolist() == expected
    assert auc.item() == pytest.approx(2.0 / 16)  # (sum - (first + last) / 2) / steps


def test_insertion_curve_from_a_zero_start_and_coarse_steps():
    image, saliency = _region_case()
    auc, curve = metrics.insertion(RegionMean(), image, saliency, 0, steps=16, softmax=False, substrate=0.0)
    assert curve[0].tolist() == [0.0, 0.25, 0.5, 0.75] + [1.0] * 13
    assert auc.item() == pytest.approx(14.0 / 16)
    auc, curve = metrics.insertion(RegionMean(), image, saliency, 0, steps=8, softmax=False, substrate=0.0)
    assert curve[0].tolist() == [0.0, 0.5] + [1.0] * 7  # two pixels per step
    # the worst order: the region last
    auc, curve = metrics.deletion(RegionMean(), image, -saliency, 0, steps=4, softmax=False)
    assert curve[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_insertion_starts_from_rise_blur():
    from scipy.ndimage import convolve

    torch.manual_seed(0)
    image = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    saliency = torch.rand(1, 1, 12, 12)
    auc, curve = metrics.insertion(RegionMean(slice(0, 12), slice(0, 12)), image, saliency, 0, steps=3, softmax=False)
    offsets = np.arange(11) - 5.0
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 25.0))
    blurred = convolve(image[0, 0].numpy(), kernel / kernel.sum(), mode="constant", cval=0.0)
    assert curve[0, 0].item() == pytest.approx(blurred.mean(), rel=1e-12)
    assert curve[0, -1].item() == pytest.approx(image[0, 0].mean().item(), rel=1e-12)


def test_curves_use_softmax_by_default_and_do_not_depend_on_batching():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    images = torch.randn(2, 3, 9, 9)
    model(images)
    saliency = torch.randn(2, 1, 9, 9)
    auc_1, curve_1 = metrics.deletion(model, images, saliency, torch.tensor([1, 3]), steps=10, batch_size=3)
    auc_2, curve_2 = metrics.deletion(model, images, saliency, torch.tensor([1, 3]), steps=10, batch_size=64)
    torch.testing.assert_close(curve_1, curve_2)
    with torch.no_grad():
        first = model(images).softmax(1)[[0, 1], [1, 3]].double()
    torch.testing.assert_close(curve_1[:, 0], first)
    assert curve_1.shape == (2, 11) and ((curve_1 >= 0) & (curve_1 <= 1)).all()


# --------------------------------------------------------------------------- sanity check


def test_spearman_against_scipy_with_ties():
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    a = torch.randint(0, 5, (3, 1, 6, 6)).double()
    b = a + torch.randint(0, 3, a.shape).double()
    ours = metrics.spearman(a, b)
    for index in range(3):
        assert ours[index].item() == pytest.approx(spearmanr(a[index].flatten(), b[index].flatten())[0], rel=1e-12)
    assert torch.allclose(metrics.spearman(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(metrics.spearman(a, -a), -torch.ones(3, dtype=torch.float64))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_model_randomisation_known_cases():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    images = torch.randn(2, 3, 8, 8)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    # a map that ignores the model: correlation 1 at every step
    image_only = metrics.model_randomisation(model, lambda m: lambda x, t: x.sum(1, keepdim=True), images, 0)
    assert [step.layer for step in image_only] == ["fc", "conv"]
    assert all(torch.allclose(step.spearman, torch.ones(2, dtype=torch.float64)) for step in image_only)

    # a real explainer: changes once a layer it depends on is randomised
    def gradient(m):
        e = tsgb_fx.explainer(m, method="gradient")
        return lambda x, t: e(x, t).saliency

    steps = metrics.model_randomisation(model, gradient, images, torch.tensor([0, 2]), layers=["fc", ["conv"]], seed=1)
    assert [step.layer for step in steps] == ["fc", "conv"]
    assert all(step.spearman.shape == (2,) and (step.spearman < 0.9).all() for step in steps)
    again = metrics.model_randomisation(model, gradient, images, torch.tensor([0, 2]), layers=["fc", ["conv"]], seed=1)
    assert all(torch.equal(a.spearman, b.spearman) for a, b in zip(steps, again))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # untouched
    with pytest.raises(ValueError, match="fc2"):
        metrics.model_randomisation(model, gradient, images, 0, layers=["fc2"])


def test_model_randomisation_in_place_restores_the_model_and_reuses_one_explainer():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    images = torch.randn(2, 3, 8, 8)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    e = tsgb_fx.explainer(model, method="gradient")
    builds = []

    def reuse(m):
        builds.append(m)
        return lambda x, t: e(x, t).saliency

    def fresh(m):  # a new explainer on the copy the default mode makes
        explainer = tsgb_fx.explainer(m, method="gradient")
        return lambda x, t: explainer(x, t).saliency

    expected = metrics.model_randomisation(model, fresh, images, 1, seed=2)
    steps = metrics.model_randomisation(model, reuse, images, 1, seed=2, in_place=True)
    assert builds[-1] is model
    assert all(torch.equal(a.spearman, b.spearman) for a, b in zip(steps, expected))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
