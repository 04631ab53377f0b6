"""Saliency metrics: localisation, faithfulness and the model-randomisation sanity check.

Every metric takes saliency maps as tensors of shape (N, 1, H, W) or (N, H, W) (what
``Explanation.saliency`` holds for one target per image) and works for any method, including
maps that did not come from tsgb-fx (Grad-CAM, Captum, ...).

* :func:`energy_pointing_game` (Wang et al., Score-CAM 2020): the share of the positive saliency
  energy that falls inside the target's box(es).
* :func:`grid_pointing_game`: the same share for the target's cell of a g x g mosaic
  (chance: 1 / g^2 for a map spread evenly).
* :func:`insertion` and :func:`deletion` (Petsiuk et al., RISE 2018): the model's score for the
  target as pixels are inserted into a blurred image, or deleted to a zero baseline, most salient
  first; the area under that curve. Higher insertion AUC and lower deletion AUC are better.
* :func:`model_randomisation` (Adebayo et al., "Sanity checks for saliency maps", 2018): the
  Spearman rank correlation between the map of the trained model and the maps as its layers are
  re-initialised cumulatively from the top down. A method that explains the model should lose
  that correlation quickly; one that stays correlated reflects the image more than the model.

Positive part: the pointing games count ``max(S, 0)``, the evidence *for* the target (TSGB's and
Grad-CAM's display convention). A map without positive saliency scores NaN (undefined), not 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerCorrelation",
    "blur",
    "deletion",
    "energy_pointing_game",
    "grid_cell_boxes",
    "grid_pointing_game",
    "insertion",
    "model_randomisation",
    "spearman",
]


def _maps(saliency: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float64 view of (N, 1, H, W) or (N, H, W) maps."""
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor, got {type(saliency).__name__}")
    if saliency.dim() == 4:
        if saliency.shape[1] != 1:
            raise ValueError(f"saliency must be (N, 1, H, W) or (N, H, W), got shape {tuple(saliency.shape)}")
        saliency = saliency[:, 0]
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be (N, 1, H, W) or (N, H, W), got shape {tuple(saliency.shape)}")
    return saliency.detach().to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Pointing games


def _box_masks(boxes: torch.Tensor, batch: int, height: int, width: int, device) -> torch.Tensor:
    """(N, H, W) union of boxes (x0, y0, x1, y1), pixel coordinates, x1/y1 exclusive."""
    boxes = torch.as_tensor(boxes, device=device)
    if boxes.dim() == 2:
        boxes = boxes.unsqueeze(1)
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch:
        raise ValueError(f"boxes must be (N, 4) or (N, B, 4) with N = {batch}, got shape {tuple(boxes.shape)}")
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)
    x0, y0, x1, y1 = (boxes[..., i].view(batch, -1, 1, 1) for i in range(4))
    inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return inside.any(dim=1)


def energy_pointing_game(saliency: torch.Tensor, boxes) -> torch.Tensor:
    """Share of positive saliency inside the box(es): ``sum_box max(S, 0) / sum max(S, 0)``, shape (N,).

    ``boxes``: (N, 4) or (N, B, 4) as ``(x0, y0, x1, y1)`` in pixels of the map, ``x1``/``y1``
    exclusive; B boxes of one image count as their union (several objects of the target class).
    1.0 when all positive saliency is inside, the box's area share for a uniform map, NaN for a
    map with no positive value.
    """
    maps = _maps(saliency)
    positive = maps.clamp(min=0)
    inside = _box_masks(boxes, *maps.shape, maps.device)
    total = positive.sum(dim=(1, 2))
    share = (positive * inside).sum(dim=(1, 2)) / total
    return torch.where(total > 0, share, torch.full_like(share, math.nan))


def grid_cell_boxes(height: int, width: int, grid: int | tuple[int, int] = 2) -> torch.Tensor:
    """(rows * cols, 4) boxes of a grid's cells, row-major; edges at ``round(i * size / n)``."""
    rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be positive, got {grid!r}")
    ys = [round(i * height / rows) for i in range(rows + 1)]
    xs = [round(j * width / cols) for j in range(cols + 1)]
    return torch.tensor([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(rows) for j in range(cols)])


def grid_pointing_game(saliency: torch.Tensor, cell, grid: int | tuple[int, int] = 2) -> torch.Tensor:
    """Share of positive saliency inside the target's cell of a mosaic, shape (N,).

    ``cell``: the target's cell index, row-major (0 = top left; for 2 x 2: 0 1 / 2 3), an int
    for all maps or one per map. ``grid``: 2 for a 2 x 2 mosaic, 3 for 3 x 3, or (rows, cols).
    All positive saliency in the cell gives 1.0, a uniform map ``1 / cells`` (0.25 for 2 x 2).
    """
    maps = _maps(saliency)
    boxes = grid_cell_boxes(maps.shape[1], maps.shape[2], grid).to(maps.device)
    cells = torch.as_tensor(cell, device=maps.device).long().expand(maps.shape[0])
    if int(cells.min()) < 0 or int(cells.max()) >= len(boxes):
        raise ValueError(f"cell must be in 0..{len(boxes) - 1} for a {grid} grid, got {cells.tolist()}")
    return energy_pointing_game(maps, boxes[cells])


# ---------------------------------------------------------------------------------------------
# Insertion and deletion (RISE)


def gaussian_kernel(size: int = 11, sigma: float = 5.0, dtype=torch.float32) -> torch.Tensor:
    """(size, size) normalised Gaussian, RISE's ``gkern``."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return (kernel / kernel.sum()).to(dtype)


def blur(images: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion start: each channel convolved with a ``size`` x ``size`` Gaussian, zero padding."""
    channels = images.shape[1]
    kernel = gaussian_kernel(size, sigma, images.dtype).to(images.device).expand(channels, 1, size, size)
    return F.conv2d(images, kernel, padding=size // 2, groups=channels)


def _score(model: Callable, images: torch.Tensor, target: int, softmax: bool) -> torch.Tensor:
    logits = model(images)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise TypeError("the model must return logits of shape (N, K)")
    scores = logits.softmax(dim=1) if softmax else logits
    return scores[:, target].to(torch.float64)


def _curve(model, image, saliency_map, target, start, finish, steps, batch_size, softmax) -> torch.Tensor:
    """Scores of ``start`` with the ``k * ceil(HW / steps)`` most salient pixels taken from ``finish``."""
    _, height, width = image.shape
    pixels = height * width
    per_step = math.ceil(pixels / steps)
    order = torch.argsort(saliency_map.reshape(-1), descending=True, stable=True)
    rank = torch.empty(pixels, dtype=torch.long, device=image.device)
    rank[order] = torch.arange(pixels, device=image.device)
    rank = rank.view(1, 1, height, width)
    scores = []
    for first in range(0, steps + 1, batch_size):
        counts = torch.arange(first, min(first + batch_size, steps + 1), device=image.device) * per_step
        taken = (rank < counts.view(-1, 1, 1, 1)).to(image.dtype)  # (B, 1, H, W)
        batch = start * (1 - taken) + finish * taken
        scores.append(_score(model, batch, target, softmax))
    return torch.cat(scores)


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area over x in [0, 1] with equal steps (RISE's ``auc``)."""
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / steps


def _run_curves(model, images, saliency, target, starts, finishes, steps, batch_size, softmax):
    maps = _maps(saliency)
    if images.dim() != 4 or images.shape[0] != maps.shape[0] or images.shape[2:] != maps.shape[1:]:
        raise ValueError(
            f"images (N, C, H, W) and saliency (N, 1, H, W) must agree; got {tuple(images.shape)} and "
            f"{tuple(saliency.shape)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    targets = torch.as_tensor(target).long().expand(images.shape[0]).tolist()
    curves = []
    with torch.no_grad():
        for index, k in enumerate(targets):
            curves.append(_curve(
                model, images[index], maps[index].to(images.device), k, starts[index : index + 1],
                finishes[index : index + 1], steps, batch_size, softmax,
            ))
    curves = torch.stack(curves)
    return _auc(curves), curves


def _substrate(substrate, images: torch.Tensor) -> torch.Tensor:
    if callable(substrate):
        return substrate(images)
    return torch.as_tensor(substrate, dtype=images.dtype, device=images.device).expand_as(images)


def deletion(model: Callable, images: torch.Tensor, saliency: torch.Tensor, target, steps: int = 32,
             batch_size: int = 16, softmax: bool = True, substrate=torch.zeros_like):
    """RISE deletion: (AUC (N,), curves (N, steps + 1)); lower is better.

    The most salient pixels (all channels) are set to ``substrate`` (zero in the model's input
    space by default, as in RISE's code), ``ceil(H * W / steps)`` more at each of ``steps`` steps;
    the curve is the model's softmax probability of ``target`` (its logit with ``softmax=False``)
    after 0, 1, ..., steps steps, and the AUC its trapezoidal area over [0, 1]. Pixels are ranked
    by the signed saliency, ties in raster order. Model calls are batched ``batch_size`` images at
    a time, under ``torch.no_grad()``; ``model`` should be in eval mode.
    """
    images = images.detach()
    return _run_curves(model, images, saliency, target, images, _substrate(substrate, images), steps,
                       batch_size, softmax)


def insertion(model: Callable, images: torch.Tensor, saliency: torch.Tensor, target, steps: int = 32,
              batch_size: int = 16, softmax: bool = True, substrate=blur):
    """RISE insertion: (AUC (N,), curves (N, steps + 1)); higher is better.

    Starts from ``substrate`` (by default :func:`blur`: RISE's 11 x 11 Gaussian, sigma 5) and puts
    back the original pixels, most salient first; otherwise as :func:`deletion`.
    """
    images = images.detach()
    return _run_curves(model, images, saliency, target, _substrate(substrate, images), images, steps,
                       batch_size, softmax)


# ---------------------------------------------------------------------------------------------
# Model-randomisation sanity check


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis, ties given their average rank (as scipy.stats.rankdata)."""
    flat = values.reshape(-1, values.shape[-1])
    ranks = torch.empty_like(flat, dtype=torch.float64)
    for row, v in enumerate(flat):
        ordered, order = torch.sort(v, stable=True)
        _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0)
        average = (ends - counts + ends - 1).to(torch.float64) / 2
        ranks[row, order] = average[inverse]
    return ranks.view(values.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps, shape (N,); NaN where a map is constant."""
    a = a.detach().reshape(a.shape[0], -1).to(torch.float64).cpu()
    b = b.detach().reshape(b.shape[0], -1).to(torch.float64).cpu()
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


class LayerCorrelation(NamedTuple):
    """One step of :func:`model_randomisation`: the layers randomised so far end with ``layer``."""

    layer: str
    spearman: torch.Tensor  # (N,)


def _top_down_layers(model: nn.Module) -> list[str]:
    """Modules that own parameters directly, last registered first (roughly output to input)."""
    names = [name for name, module in model.named_modules() if name and any(True for _ in module.parameters(recurse=False))]
    return names[::-1]


def _reinitialise(module: nn.Module) -> None:
    """Re-initialise every parameter under ``module`` in place, as at construction where possible."""
    for sub in module.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.affine:
                with torch.no_grad():  # reset gives weight 1, bias 0: randomise as Adebayo et al. do
                    sub.weight.uniform_(0.5, 1.5)
                    sub.bias.normal_(0, 0.1)
        else:
            with torch.no_grad():
                for parameter in sub.parameters(recurse=False):
                    parameter.normal_(0, 0.02)


def model_randomisation(
    model: nn.Module,
    explain: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    target,
    layers: Sequence[str | Sequence[str]] | None = None,
    absolute: bool = False,
    seed: int = 0,
    in_place: bool = False,
) -> list[LayerCorrelation]:
    """Cascading model randomisation (Adebayo et al. 2018): one Spearman correlation per layer.

    ``explain(m)`` is called once, on a deep copy ``m`` of ``model``, and returns ``f(images,
    target) -> saliency`` (N, 1, H, W). The layers are then re-initialised in place in ``m`` one
    after the other, cumulatively, in the order given (top down: the output layer first), and
    after each step the new map is compared with the trained model's map. So ``f`` must read the
    model's parameters when called (tsgb-fx explainers share them; hook-based methods such as
    Grad-CAM run the model itself). ``model`` itself is never changed. With ``in_place=True`` no
    copy is made: ``model`` is randomised itself and its parameters and buffers are written back
    when the check ends (also on error), so an explainer built on ``model`` once can be reused
    across checks (``explain`` may then return it without rebuilding).

    ``layers``: module names, or groups of names randomised as one step (e.g. ``["classifier",
    ["conv_head", "bn2"], "blocks.6", ...]``); by default every module that owns parameters,
    last registered first. Re-initialisation uses each module's ``reset_parameters`` (batch-norm
    scales and shifts are drawn at random, running statistics reset), under a fixed ``seed``
    that leaves the global random state alone. ``absolute``: compare ``|S|`` instead of ``S``.

    Returns ``[LayerCorrelation(layer, spearman (N,)), ...]`` in the order of ``layers``, where
    ``layer`` names the last group randomised (groups joined with "+").
    """
    copied = model if in_place else copy.deepcopy(model).eval()
    modules = dict(copied.named_modules())
    steps = _top_down_layers(copied) if layers is None else list(layers)
    groups = [[step] if isinstance(step, str) else list(step) for step in steps]
    unknown = [name for group in groups for name in group if name not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} are not modules of the model (see model.named_modules())")
    saved = {name: tensor.clone() for name, tensor in copied.state_dict().items()} if in_place else None
    try:
        function = explain(copied)

        def saliency_map():
            result = function(images, target)
            result = result.abs() if absolute else result
            return _maps(result)

        reference = saliency_map()
        results = []
        cuda = [p.device.index or 0 for p in copied.parameters() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for group in groups:
                for name in group:
                    _reinitialise(modules[name])
                results.append(LayerCorrelation("+".join(group), spearman(reference, saliency_map())))
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, tensor in copied.state_dict().items():
                    tensor.copy_(saved[name])
    return results

