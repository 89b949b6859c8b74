"""The class hierarchy of a two-level model: each fine class's parent at the coarser level.

A two-level model's head gives the fine level's abundances (level 2); the coarse level's
(level 1) are their sums over each parent's children, so the two maps agree by construction.
The hierarchy comes from a JSON file mapping each fine class to its parent (``train
--hierarchy``), or from the training data: the reference store's ``hierarchy`` attribute or an
MSMTU folder's ``labels/hierarchy.json`` (both written by ``simulate``); the artifact keeps it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from msmtu_batch.runtime.errors import MsmtuError

HIERARCHY_FILE = "hierarchy.json"  # in an MSMTU folder's labels/
HIERARCHY_ATTRIBUTE = "hierarchy"  # of a reference store's root group


class HierarchyError(MsmtuError, ValueError):
    """A class hierarchy that does not fit the model's classes; the message names the source."""


@dataclass(frozen=True)
class ClassHierarchy:
    level: str  # the coarse level's name, e.g. level1
    classes: tuple[str, ...]  # the coarse classes, in the order of their first child
    parents: tuple[str, ...]  # per fine class (the model's class order), its coarse class

    def matrix(self) -> np.ndarray:
        """(fine, coarse) 0/1 float32: coarse abundance = fine abundance @ matrix."""
        return np.array([[parent == coarse for coarse in self.classes] for parent in self.parents], np.float32)

    def coarse(self, abundance: np.ndarray) -> np.ndarray:
        """The coarse level's abundances (n, K1) from the fine level's (n, K2); NaN stays NaN."""
        return abundance @ self.matrix()

    def to_dict(self) -> dict:
        return {"level": self.level, "classes": list(self.classes), "parents": list(self.parents)}

    @classmethod
    def of_mapping(cls, mapping: object, fine_classes: Sequence[str], fine_level: str, source: str
                   ) -> ClassHierarchy:
        """Validate ``mapping`` (fine class -> parent) against the model's classes."""
        if not isinstance(mapping, Mapping) or not mapping or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in mapping.items()):
            raise HierarchyError(f"{source}: expected a JSON object mapping each {fine_level} class to its parent "
                                 f"class, e.g. {{\"{fine_classes[0] if fine_classes else 'urban'}\": \"artificial\"}}")
        if missing := [c for c in fine_classes if c not in mapping]:
            raise HierarchyError(f"{source}: no parent class for {', '.join(missing)} (classes of the training data "
                                 f"at {fine_level})")
        if unknown := [c for c in mapping if c not in fine_classes]:
            raise HierarchyError(f"{source}: names class(es) {', '.join(unknown)} that the training data at "
                                 f"{fine_level} does not have")
        parents = tuple(mapping[c].strip() for c in fine_classes)
        classes = tuple(dict.fromkeys(parents))
        if len(classes) < 2:
            raise HierarchyError(f"{source}: every class has the parent {classes[0]}: a level of one class says "
                                 "nothing")
        return cls(coarse_level(fine_level), classes, parents)


def coarse_level(fine_level: str) -> str:
    """level2 -> level1; a level not named levelN has the level ``<name>_parent`` above it."""
    number = re.fullmatch(r"level(\d+)", fine_level)
    return f"level{int(number.group(1)) - 1}" if number and int(number.group(1)) > 1 else f"{fine_level}_parent"


def read_hierarchy_file(path: str | Path, fine_classes: Sequence[str], fine_level: str) -> ClassHierarchy:
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError:
        raise HierarchyError(f"{path}: class hierarchy file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HierarchyError(f"{path}: not JSON ({exc})") from None
    return ClassHierarchy.of_mapping(mapping, fine_classes, fine_level, str(path))


def hierarchy_in_training_data(msmtu: Path | None, reference: Path | None, fine_classes: Sequence[str],
                               fine_level: str) -> ClassHierarchy:
    """The hierarchy the training data carries (see the module docstring), or one line saying
    where it was looked for."""
    if msmtu is not None:
        path = Path(msmtu) / "labels" / HIERARCHY_FILE
        if path.is_file():
            return read_hierarchy_file(path, fine_classes, fine_level)
        where = str(path)
    else:
        where = f"{reference} (attribute '{HIERARCHY_ATTRIBUTE}')"
        if reference is not None:
            text = zarr.open_group(str(reference), mode="r").attrs.get(HIERARCHY_ATTRIBUTE)
            if text is not None:
                try:
                    mapping = json.loads(text) if isinstance(text, str) else text
                except json.JSONDecodeError as exc:
                    raise HierarchyError(f"{where}: not JSON ({exc})") from None
                return ClassHierarchy.of_mapping(mapping, fine_classes, fine_level, where)
    raise HierarchyError(f"no class hierarchy in the training data (looked for {where}); pass --hierarchy FILE")


def hierarchy_from_metadata(meta: object, fine_classes: Sequence[str], source: str) -> ClassHierarchy:
    """The hierarchy an artifact records, checked as when it was written."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("parents"), list) or \
            len(meta["parents"]) != len(fine_classes) or not isinstance(meta.get("level"), str):
        raise HierarchyError(f"{source}: hierarchy must give a level and one parent per class "
                             f"({len(fine_classes)}), found {meta!r}")
    hierarchy = ClassHierarchy.of_mapping(dict(zip(fine_classes, meta["parents"])), fine_classes, "the model",
                                          source)
    if list(hierarchy.classes) != meta.get("classes"):
        raise HierarchyError(f"{source}: hierarchy classes {meta.get('classes')!r} are not the parents in order "
                             f"{list(hierarchy.classes)!r}")
    return ClassHierarchy(meta["level"], hierarchy.classes, hierarchy.parents)
