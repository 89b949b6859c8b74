"""Class colours: the palette a model's maps are drawn with (COG colour table, QGIS style,
STAC classification, quicklooks).

An artifact carries one colour per class. By default it is taken from the class name
(CORINE Land Cover's legend colours for the classes that have a counterpart there), else
from a qualitative palette by position; a user overrides it at training time
(``train --class-colors FILE.json``, ``{"class name": "#rrggbb"}``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from msmtu_batch.runtime.errors import MsmtuError

# CORINE Land Cover legend colours for the class names of the simulator and of the
# Andalusia-MSMTU levels (matched as words in the class name, first match wins).
_NAMED = (
    ("urban", "#e6004d"), ("artificial", "#e6004d"), ("impervious", "#e6004d"),
    ("irrigated", "#ffff00"), ("cereal", "#ffffa8"), ("crop", "#ffffa8"), ("olive", "#e6a600"),
    ("agricultural", "#ffe64d"), ("dehesa", "#f2cca6"), ("evergreen", "#4dff00"), ("forest", "#80ff00"),
    ("shrub", "#a6f200"), ("grass", "#ccf24d"), ("open_natural", "#a6e64d"), ("bare", "#cccccc"),
    ("soil", "#cccccc"), ("rock", "#e6e6e6"), ("water", "#00ccf2"), ("wetland", "#a6a6ff"),
)
# matplotlib's tab20, for classes no name matches
_FALLBACK = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
             "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
             "#dbdb8d", "#9edae5")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


def default_class_colors(classes: Sequence[str]) -> tuple[str, ...]:
    """One ``#rrggbb`` colour per class (see the module docstring)."""
    colors = []
    for index, name in enumerate(classes):
        words = name.lower()
        colors.append(next((color for key, color in _NAMED if key in words), _FALLBACK[index % len(_FALLBACK)]))
    return tuple(colors)


def class_colors(classes: Sequence[str], overrides: Mapping[str, str] | None = None,
                 source: str = "class colours") -> tuple[str, ...]:
    """The default palette with ``overrides`` (class name -> ``#rrggbb``) applied; refuse
    unknown classes and malformed colours, naming them."""
    overrides = dict(overrides or {})
    if unknown := sorted(set(overrides) - set(classes)):
        raise MsmtuError(f"{source}: unknown class(es) {', '.join(unknown)} (classes: {', '.join(classes)})")
    if bad := sorted(f"{k}: {v!r}" for k, v in overrides.items() if not (isinstance(v, str) and _HEX.fullmatch(v))):
        raise MsmtuError(f"{source}: colours must be '#rrggbb', found {', '.join(bad)}")
    return tuple(overrides.get(name, default).lower()
                 for name, default in zip(classes, default_class_colors(classes)))


def read_class_colors(path: str | Path, classes: Sequence[str]) -> tuple[str, ...]:
    """A user's palette file (JSON object: class name -> ``#rrggbb``) applied to ``classes``."""
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MsmtuError(f"{path}: not a readable JSON palette ({type(exc).__name__}: {exc})") from None
    if not isinstance(overrides, dict):
        raise MsmtuError(f"{path}: expected a JSON object of class name -> '#rrggbb'")
    return class_colors(classes, overrides, str(path))


def rgb(color: str) -> tuple[int, int, int]:
    """``#rrggbb`` -> (r, g, b) integers 0-255."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
