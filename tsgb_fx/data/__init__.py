"""Sample photos bundled with tsgb-fx (CC0, from scikit-image; see README.md here).

>>> from tsgb_fx.data import sample_path
>>> sample_path("chelsea")     # the cat photo of `make demo`
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = ("chelsea", "coffee")


def sample_path(name: str = "chelsea") -> Path:
    """The path of a bundled photo: ``"chelsea"`` (a cat) or ``"coffee"`` (a coffee cup)."""
    if name not in SAMPLES:
        raise ValueError(f"no sample photo {name!r}; the samples are {SAMPLES}")
    return Path(__file__).with_name(f"{name}.png")
