"""Peers: Captum, Zennit and pytorch-grad-cam against tsgb-fx, on the same baseline forward, one run.

Per model and batch size, round-robin (see benchmarks/common.py), median of ``--repeats`` rounds
(more for quick rows with ``--min-seconds``):

* ``forward``: ``model(x)`` under ``torch.inference_mode()``, the baseline of every ratio
* ``tsgb_eager``: ``tsgb_fx.explainer(model)(x, target=...)``
* ``captum_gbp``: ``captum.attr.GuidedBackprop(model).attribute(x, target=...)``
* ``zennit_epf``: ``zennit.attribution.Gradient`` with the ``EpsilonPlusFlat`` composite (no
  canonizer), hooks registered once outside the timed calls
* ``gradcam``: ``pytorch_grad_cam.GradCAM`` on the last conv block (``layer4[-1]`` for ResNets,
  ``features[-1]`` for VGG, DenseNet, MobileNet, EfficientNet, else the last ``Conv2d``),
  including its upsampling of the map to the image size (the library's own output). In
  Grad-CAM's copy the target block's output is made to require grad, so its backward runs from
  the logits to that block only (the cheapest setting for Grad-CAM: with trainable parameters it
  would compute weight gradients, with an input requiring grad it would backprop to the image)

Every method explains the same class for every image. Peers that hook modules get their own copy
of the model, so their hooks never run inside another case. All parameters are frozen
(``requires_grad=False``): no method computes weight gradients.
"""

from __future__ import annotations

import copy
import sys
import warnings

from . import common
from .common import TARGET_CLASS, format_ms, format_ratio, markdown_table, ratio, ratio_cell

PEERS = ("captum_gbp", "zennit_epf", "gradcam", "gradcam_trainable")
LABELS = {
    "forward": "forward (inference_mode)",
    "tsgb_eager": "tsgb-fx eager",
    "tsgb_compiled": "tsgb-fx compile=True",
    "captum_gbp": "Captum GuidedBackprop",
    "zennit_epf": "Zennit EpsilonPlusFlat",
    "gradcam": "pytorch-grad-cam GradCAM",
    "gradcam_trainable": "GradCAM, trainable parameters",
}
PACKAGES = ["torch", "torchvision", "captum", "zennit", "grad-cam"]


def last_conv_block(model):
    """The module Grad-CAM is usually pointed at: the last convolutional block."""
    from torch import nn

    if hasattr(model, "layer4"):
        return model.layer4[-1]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return features[-1]
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("no Conv2d in the model: Grad-CAM needs a convolutional layer")
    return convs[-1]


class Peers:
    """The peers' callables for one model, each on its own copy of the model."""

    def __init__(self, model, classes: int, gradcam_trainable: bool = False):
        self.model, self.classes = model, classes
        self._closers = []
        self.available = {}
        self.errors = {}
        builders = [("captum_gbp", self._captum), ("zennit_epf", self._zennit), ("gradcam", self._gradcam)]
        if gradcam_trainable:
            builders.append(("gradcam_trainable", self._gradcam_trainable))
        for name, build in builders:
            try:
                self.available[name] = build()
            except Exception as error:  # noqa: BLE001 - a missing peer must not stop the others
                self.errors[name] = f"{type(error).__name__}: {error}"[:300]
                print(f"  {name}: unavailable ({self.errors[name]})", file=sys.stderr)

    def _captum(self):
        from captum.attr import GuidedBackprop

        method = GuidedBackprop(copy.deepcopy(self.model))
        return lambda x: method.attribute(x, target=TARGET_CLASS)

    def _zennit(self):
        import torch
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat

        attributor = Gradient(model=copy.deepcopy(self.model), composite=EpsilonPlusFlat())
        attributor.__enter__()  # registers the rule hooks once, as `with Gradient(...) as a:` does
        self._closers.append(lambda: attributor.__exit__(None, None, None))
        one_hots = {}

        def explain(x):
            if x.shape[0] not in one_hots:
                one_hot = torch.zeros(x.shape[0], self.classes, device=x.device)
                one_hot[:, TARGET_CLASS] = 1.0
                one_hots[x.shape[0]] = one_hot
            return attributor(x, one_hots[x.shape[0]])[1]

        return explain

    def _gradcam(self):
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        model = copy.deepcopy(self.model)
        layer = last_conv_block(model)
        # The least backward Grad-CAM needs: from the logits down to this block's output. The
        # block's output becomes a fresh tensor that requires grad (a clone, so that in-place
        # ops after it, e.g. DenseNet's relu_, stay legal); this hook runs before Grad-CAM's.
        layer.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True).clone())
        cam = GradCAM(model=model, target_layers=[layer])
        self._closers.append(cam.activations_and_grads.release)
        return lambda x: cam(input_tensor=x, targets=[ClassifierOutputTarget(TARGET_CLASS)] * x.shape[0])

    def _gradcam_trainable(self):
        """Grad-CAM as its README shows it: a model whose parameters require grad, so that
        ``loss.backward()`` also computes every weight gradient on the way."""
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        model = copy.deepcopy(self.model).requires_grad_(True)
        cam = GradCAM(model=model, target_layers=[last_conv_block(model)])
        self._closers.append(cam.activations_and_grads.release)
        return lambda x: cam(input_tensor=x, targets=[ClassifierOutputTarget(TARGET_CLASS)] * x.shape[0])

    def cases(self, x) -> dict:
        return {name: (lambda fn=fn: fn(x)) for name, fn in self.available.items()}

    def close(self):
        for close in self._closers:
            close()


def run(args) -> dict:
    import torch

    import tsgb_fx

    common.check_device(args.device)
    threads = common.set_threads(args.threads)
    machine = common.machine_info(threads, args.device)
    sync = common.synchronizer(args.device)
    warnings.filterwarnings("ignore", module=r"captum\..*")  # "setting backward hooks on ReLU" per call
    rows = []
    for name in args.models:
        print(f"{name}: building", file=sys.stderr, flush=True)
        model = common.build_model(name, args.device)
        explainer = tsgb_fx.explainer(model)
        with torch.inference_mode():
            classes = model(common.make_input(1, args.size, args.device)).shape[1]
        peers = Peers(model, classes, args.gradcam_trainable)
        for batch in args.batch_sizes:
            print(f"{name} batch {batch}: timing", file=sys.stderr, flush=True)
            x = common.make_input(batch, args.size, args.device)

            def forward():
                with torch.inference_mode():
                    return model(x)

            cases = {"forward": forward, "tsgb_eager": lambda: explainer(x, target=TARGET_CLASS).saliency}
            cases.update(peers.cases(x))
            times = common.time_cases(cases, repeats=args.repeats, warmup=args.warmup, sync=sync,
                                      min_seconds=args.min_seconds)
            rows.append({"model": name, "batch": batch, "size": args.size, "times": times,
                         "medians": common.medians(times), "errors": dict(peers.errors), "load": common.load_now()})
        peers.close()
        del model, explainer, peers
    return {
        "kind": "peers",
        "machine": machine,
        "settings": common.settings(args),
        "versions": common.package_versions(PACKAGES),
        "rows": rows,
    }


def add_peer_options(p) -> None:
    p.add_argument("--gradcam-trainable", action="store_true",
                   help="also time Grad-CAM with trainable parameters (its documented usage: all weight gradients)")


def fastest_peer(medians: dict) -> tuple[str | None, float | None]:
    """The peer with the smallest median time among those measured."""
    measured = [(medians[p], p) for p in PEERS if medians.get(p) is not None]
    if not measured:
        return None, None
    seconds, name = min(measured)
    return name, seconds


def render(payload: dict) -> str:
    """The peers table; with a ``tsgb_compiled`` column (a ``speed --compile --peers`` run), it and
    its own ratio to the fastest peer are shown too."""
    rows = payload["rows"]
    shown = [p for p in PEERS if p != "gradcam_trainable" or any(p in row["medians"] for row in rows)]
    mine = ["tsgb_eager", *(["tsgb_compiled"] if any(row["medians"].get("tsgb_compiled") for row in rows) else [])]
    varied = common.rounds_varied(rows)
    columns = ["model", "batch", *(["rounds"] if varied else []), LABELS["forward"], *(LABELS[c] for c in mine),
               *(LABELS[p] for p in shown), *(f"{LABELS[c].removeprefix('tsgb-fx ')} / fastest peer" for c in mine)]
    body = []
    for row in rows:
        m = row["medians"]
        _, best = fastest_peer(m)
        cells = [row["model"], row["batch"], *([common.rounds_of(row["times"])] if varied else []),
                 format_ms(m.get("forward"))]
        cells += [ratio_cell(m.get(c), m.get("forward")) for c in (*mine, *shown)]
        cells += [format_ratio(ratio(m.get(c), best)) for c in mine]
        body.append(cells)
    size = payload["settings"]["size"]
    title = (f"Time per explanation, ratio to the plain forward in `torch.inference_mode`; {size}x{size}, "
             f"{common.median_label(rows, payload['settings']['repeats'])}; "
             f"last column{'s' if len(mine) > 1 else ''} below 1.00x = tsgb-fx is faster")
    return f"{title}\n\n{markdown_table(columns, body)}"


def main(argv=None) -> dict:
    p = common.parser("tsgb-fx against Captum, Zennit and pytorch-grad-cam, side by side in one run")
    add_peer_options(p)
    args = p.parse_args(argv)
    payload = run(args)
    common.emit(args, payload, render(payload))
    return payload


if __name__ == "__main__":
    main()
