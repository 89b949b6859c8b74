"""Training data: the Andalusia-MSMTU file layout and the spatial block split.

Layout (docs/design.md section 4), as published on Zenodo (record 7752348)::

    ts_files/{square_id:07d}.json       ts_data.forward|backward.values|masks, 12 x 7
    labels/<level>/partitions/{train,validation,test}.csv
                                        square_id, one column per class, Class_max
    ancillary/topo_climatic.csv         square_id + ancillary variables

``values`` are surface reflectance multiplied by 1e4, as published (the research code
standardises them with band means of about 1,500-2,900), with 0 where ``masks`` is 0;
``backward`` is ``forward`` reversed in time. In memory (:class:`PixelSet`) reflectance is
always in physical units (0-1), as in the input cube once its scale factor is applied.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from msmtu_batch.inputs.cube import (
    ANCILLARY_NAMES,
    ANCILLARY_UNITS,
    CLASS_DIM,
    LEGACY_CLASS_DIM,
    N_MONTHS,
    cube_sensor,
    observed_mask,
    open_input_cube,
    rioxarray_quietly,
)
from msmtu_batch.inputs.sensors import DEFAULT_SENSOR
from msmtu_batch.inputs.units import MSMTU_TABLE_UNITS, check_known_unit
from msmtu_batch.runtime.errors import TrainingDataError
from msmtu_batch.runtime.outputs import durable_file

PARTITIONS: tuple[str, ...] = ("train", "validation", "test")
N_BANDS = 7
CACHE_FORMAT = 3  # 3: the sensor recorded; 2: values in physical reflectance units, read from the x1e4 layout;
UNITS_FILE = "units.json"  # ancillary/units.json: {variable: CF units}; absent in the published layout
MSMTU_VALUE_UNITS = "reflectance x 1e4"
MSMTU_VALUE_SCALE = 1e4  # JSON value = reflectance x 1e4
# The published files' observed values are hundreds to thousands; a median below this means
# the folder holds reflectance already scaled to 0-1 (an older msmtu-batch wrote that).
_SCALED_MEDIAN_LIMIT = 5.0


@dataclass(frozen=True)
class PixelSet:
    """Labelled pixels in memory: what training and evaluation consume.

    ``values``/``masks`` are (n, 12, 7) reflectance (scale applied, 0 at gaps) and 0/1
    masks; ``ancillary`` (n, A) follows ``ancillary_names``; ``abundance`` (n, K) follows
    ``classes``; ``ids`` are square_ids (flat pixel indices ``row * width + col`` for a
    cube, whose ``grid_shape`` is then set); ``partition`` indexes :data:`PARTITIONS`.
    """

    values: np.ndarray
    masks: np.ndarray
    ancillary: np.ndarray
    abundance: np.ndarray
    ids: np.ndarray
    partition: np.ndarray
    ancillary_names: tuple[str, ...]
    classes: tuple[str, ...]
    grid_shape: tuple[int, int] | None = None
    ancillary_units: tuple[str, ...] = ()  # per ancillary variable; default: the cube contract's units
    sensor: str = DEFAULT_SENSOR.name  # the sensor spec the reflectance came from (inputs/sensors.py)

    def __post_init__(self) -> None:
        if not self.ancillary_units:
            object.__setattr__(self, "ancillary_units", tuple(ANCILLARY_UNITS.get(n, "") for n in self.ancillary_names))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> PixelSet:
        return replace(self, **{f: getattr(self, f)[index] for f in _ARRAY_FIELDS})

    def split(self, name: str) -> PixelSet:
        return self.subset(self.partition == PARTITIONS.index(name))

    def with_ancillary(self, names: Sequence[str]) -> PixelSet:
        """Keep only the ancillary variables ``names`` (in that order)."""
        missing = [n for n in names if n not in self.ancillary_names]
        if missing:
            raise TrainingDataError(f"ancillary variable(s) {', '.join(missing)} not in the "
                                    f"training data (have: {', '.join(self.ancillary_names)})")
        columns = [self.ancillary_names.index(n) for n in names]
        return replace(self, ancillary=self.ancillary[:, columns], ancillary_names=tuple(names),
                       ancillary_units=tuple(self.ancillary_units[c] for c in columns))

    def save(self, path: Path, fingerprint: str = "") -> None:
        """Write atomically and durably: readers never see half a file."""
        with durable_file(path, suffix=".npz") as partial:  # np.savez adds .npz to a name without it
            np.savez(partial, **{f: getattr(self, f) for f in _ARRAY_FIELDS},
                     ancillary_names=np.array(self.ancillary_names, dtype=str),
                     ancillary_units=np.array(self.ancillary_units, dtype=str),
                     classes=np.array(self.classes, dtype=str),
                     grid_shape=np.array(self.grid_shape or (0, 0)),
                     sensor=np.array(self.sensor), fingerprint=np.array(fingerprint), format=np.array(CACHE_FORMAT))

    @classmethod
    def load(cls, path: Path, fingerprint: str | None = None) -> PixelSet | None:
        """Load a saved set (never unpickles); ``None`` if it is stale or unreadable."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != CACHE_FORMAT or (
                        fingerprint is not None and str(data["fingerprint"]) != fingerprint):
                    return None
                grid = tuple(int(v) for v in data["grid_shape"])
                return cls(**{f: data[f] for f in _ARRAY_FIELDS},
                           ancillary_names=tuple(str(v) for v in data["ancillary_names"]),
                           ancillary_units=tuple(str(v) for v in data["ancillary_units"]),
                           classes=tuple(str(v) for v in data["classes"]),
                           grid_shape=grid if grid != (0, 0) else None, sensor=str(data["sensor"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None


_ARRAY_FIELDS = tuple(f.name for f in fields(PixelSet) if f.type == "np.ndarray")


def spatial_block_split(height: int, width: int, block: int,
                        fractions: Sequence[float] = (0.7, 0.15, 0.15),
                        seed: int = 0) -> np.ndarray:
    """(height, width) int8 map of partition indices into :data:`PARTITIONS`.

    The grid is cut into ``block`` x ``block`` squares and whole squares are assigned to
    partitions, so neighbouring (spatially autocorrelated) pixels never straddle train
    and test. Each partition gets at least one block when there are enough blocks.
    """
    rows, cols = -(-height // block), -(-width // block)
    n_blocks = rows * cols
    counts = np.floor(np.asarray(fractions, dtype=np.float64) * n_blocks).astype(int)
    if n_blocks >= len(PARTITIONS):
        counts = np.maximum(counts, [1 if f > 0 else 0 for f in fractions])
    counts[0] = n_blocks - counts[1:].sum()  # the remainder goes to training
    rng = np.random.default_rng([seed, 0x5B1])
    assignment = np.repeat(np.arange(len(PARTITIONS), dtype=np.int8), counts)[rng.permutation(n_blocks)]
    block_map = assignment.reshape(rows, cols)
    return np.repeat(np.repeat(block_map, block, axis=0), block, axis=1)[:height, :width]


def write_msmtu_layout(root: Path, *, square_ids: np.ndarray, values: np.ndarray,
                       masks: np.ndarray, ancillary: pd.DataFrame,
                       labels: Mapping[str, pd.DataFrame], partition: np.ndarray,
                       metadata: Sequence[Mapping] | None = None, ancillary_units: Mapping[str, str] | None = None,
                       hierarchy: Mapping[str, str] | None = None) -> None:
    """Write pixels in the Andalusia-MSMTU layout under ``root``.

    ``values`` (reflectance, 0-1) and ``masks`` are (n, 12, 7); the files hold the values
    as published, reflectance x 1e4 as integers; ``ancillary`` and each ``labels[level]`` have
    one row per pixel in ``square_ids`` order (labels: one abundance column per class);
    ``partition`` holds indices into :data:`PARTITIONS`. ``ancillary_units`` (variable -> CF
    units) go to ``ancillary/units.json``, an addition of ours: the published table has none;
    so does ``hierarchy`` (each finest-level class -> its parent) to ``labels/hierarchy.json``.
    """
    ts_dir = root / "ts_files"
    ts_dir.mkdir(parents=True, exist_ok=True)
    values = np.where(masks, np.rint(np.asarray(values, np.float64) * MSMTU_VALUE_SCALE), 0).astype(np.int64)
    for i, square_id in enumerate(square_ids):
        forward = {"values": values[i].tolist(), "masks": masks[i].astype(int).tolist()}
        backward = {"values": values[i][::-1].tolist(), "masks": masks[i][::-1].astype(int).tolist()}
        record = {"square_id": int(square_id), "ts_data": {"forward": forward, "backward": backward}}
        if metadata is not None:
            record["metadata"] = dict(metadata[i])
        (ts_dir / f"{int(square_id):07d}.json").write_text(json.dumps(record))

    (root / "ancillary").mkdir(parents=True, exist_ok=True)
    ancillary.insert(0, "square_id", square_ids)
    ancillary.to_csv(root / "ancillary" / "topo_climatic.csv", index=False)
    if ancillary_units is not None:
        (root / "ancillary" / UNITS_FILE).write_text(json.dumps(dict(ancillary_units), indent=1))

    for level, table in labels.items():
        part_dir = root / "labels" / level / "partitions"
        part_dir.mkdir(parents=True, exist_ok=True)
        table = table.copy()
        table["Class_max"] = table.columns[np.argmax(table.to_numpy(), axis=1)] if len(table) \
            else pd.Series(dtype=object)
        table.insert(0, "square_id", square_ids)
        for index, name in enumerate(PARTITIONS):
            table[partition == index].to_csv(part_dir / f"{name}.csv", index=False)
    if hierarchy is not None:
        (root / "labels" / "hierarchy.json").write_text(json.dumps(dict(hierarchy), indent=1))


# --- Readers -------------------------------------------------------------------------------

def _partition_files(root: Path, level: str) -> dict[str, Path]:
    folder = root / "labels" / level / "partitions"
    if not folder.is_dir():
        levels = sorted(p.name for p in (root / "labels").glob("*") if p.is_dir())
        raise TrainingDataError(f"{folder}: no such label level folder (levels found: "
                                f"{', '.join(levels) or 'none'})")
    files = {name: folder / f"{name}.csv" for name in PARTITIONS}
    for path in files.values():
        if not path.is_file():
            raise TrainingDataError(f"{path}: missing partition file")
    return files


def _fingerprint(root: Path, files: Sequence[Path]) -> str:
    """Changes whenever a label, ancillary or time-series file changes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    for entry in sorted((root / "ts_files").iterdir()):
        stat = entry.stat()
        digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def read_msmtu(root: str | Path, level: str, *, cache: bool = True,
               ancillary_units: Mapping[str, str] | None = None) -> PixelSet:
    """Read an Andalusia-MSMTU folder for one label level.

    The one-JSON-per-pixel layout is converted once into a compact ``.npz`` under
    ``root/.msmtu_cache/`` (rebuilt when any input file changes) so training reads arrays
    from memory, not thousands of files per epoch. ``ancillary_units`` (variable -> CF units)
    declares the units of the ancillary table's columns; they win over ``ancillary/units.json``
    and over the published table's default (:data:`MSMTU_TABLE_UNITS`).
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"{root}: Andalusia-MSMTU folder not found")
    pixels = _read_msmtu(root, level, cache)
    return _with_declared_units(pixels, ancillary_units or {}, root / "ancillary" / "topo_climatic.csv")


def _with_declared_units(pixels: PixelSet, declared: Mapping[str, str], table: Path) -> PixelSet:
    """``pixels`` with the units the user declared for the table's columns (checked by name and unit)."""
    if not declared:
        return pixels
    unknown = [name for name in declared if name not in pixels.ancillary_names]
    if unknown:
        raise TrainingDataError(f"{table}: no column {', '.join(map(repr, unknown))} to declare units for "
                                f"(columns: {', '.join(pixels.ancillary_names)})")
    for name, unit in declared.items():
        check_known_unit(unit, f"--ancillary-units {name}")
    units = tuple(declared.get(name, unit) for name, unit in zip(pixels.ancillary_names, pixels.ancillary_units))
    return replace(pixels, ancillary_units=units)


def _read_msmtu(root: Path, level: str, cache: bool) -> PixelSet:
    files = _partition_files(root, level)
    ancillary_csv = root / "ancillary" / "topo_climatic.csv"
    if not ancillary_csv.is_file():
        raise TrainingDataError(f"{ancillary_csv}: missing ancillary table")
    if not (root / "ts_files").is_dir():
        raise TrainingDataError(f"{root / 'ts_files'}: missing time-series folder")
    units_json = root / "ancillary" / UNITS_FILE
    fingerprint = _fingerprint(root, [*files.values(), ancillary_csv, *([units_json] if units_json.is_file() else [])])
    cache_path = root / ".msmtu_cache" / f"{level}.npz"
    if cache and (cached := PixelSet.load(cache_path, fingerprint)) is not None:
        return cached

    tables, classes = [], None
    for index, path in enumerate(files.values()):
        table = pd.read_csv(path)
        if "square_id" not in table.columns:
            raise TrainingDataError(f"{path}: no 'square_id' column")
        these = tuple(c for c in table.columns if c not in ("square_id", "Class_max"))
        if classes is None:
            classes, first = these, path
        elif these != classes:
            raise TrainingDataError(f"{path}: class columns {', '.join(these)} differ from "
                                    f"{first.name}'s {', '.join(classes)}")
        tables.append(table.assign(_partition=index, _file=str(path)))
    labels = pd.concat(tables, ignore_index=True)
    duplicated = labels["square_id"][labels["square_id"].duplicated()]
    if len(duplicated):
        raise TrainingDataError(f"{files['train'].parent}: square_id {int(duplicated.iloc[0])} "
                                "appears in more than one partition row")
    abundance = labels[list(classes)].to_numpy(np.float32)
    if not np.isfinite(abundance).all():
        row = int(np.nonzero(~np.isfinite(abundance).all(axis=1))[0][0])
        raise TrainingDataError(f"{labels['_file'][row]}: non-finite abundance for square_id "
                                f"{int(labels['square_id'][row])}")

    ancillary = pd.read_csv(ancillary_csv)
    names = tuple(c for c in ancillary.columns if c != "square_id")
    ancillary = ancillary.set_index("square_id")
    missing_ids = labels["square_id"][~labels["square_id"].isin(ancillary.index)]
    if len(missing_ids):
        raise TrainingDataError(f"{ancillary_csv}: no row for square_id {int(missing_ids.iloc[0])}")
    ancillary = ancillary.loc[labels["square_id"]]
    bad = ancillary.isna()
    if bad.to_numpy().any():
        square_id = int(ancillary.index[bad.any(axis=1).to_numpy()][0])
        column = bad.columns[bad.loc[square_id].to_numpy().ravel()][0]
        raise TrainingDataError(f"{ancillary_csv}: NaN in '{column}' for square_id {square_id}")

    values = np.zeros((len(labels), N_MONTHS, N_BANDS), np.float32)
    masks = np.zeros_like(values)
    for i, (square_id, source) in enumerate(zip(labels["square_id"], labels["_file"])):
        values[i], masks[i] = _read_series(root, int(square_id), source)
    _check_published_units(root, values, masks)
    # the cube's own conversion (int16 x float32 1e-4), so both give the same bytes
    values *= np.float32(1 / MSMTU_VALUE_SCALE)
    pixels = PixelSet(values=values, masks=masks, ancillary=ancillary.to_numpy(np.float32),
                      abundance=abundance, ids=labels["square_id"].to_numpy(np.int64),
                      partition=labels["_partition"].to_numpy(np.int8),
                      ancillary_names=names, classes=classes, ancillary_units=_msmtu_units(root, names))
    if cache:
        try:
            cache_path.parent.mkdir(exist_ok=True)
            pixels.save(cache_path, fingerprint)
        except OSError:
            pass  # a read-only dataset is still readable, only slower next time
    return pixels


def _msmtu_units(root: Path, names: Sequence[str]) -> tuple[str, ...]:
    """Units of the ancillary table: ``ancillary/units.json`` where present (msmtu-batch writes
    it), else those of the published table, whose precipitation and evapotranspiration are in a
    unit of their own."""
    path = root / "ancillary" / UNITS_FILE
    try:
        declared = json.loads(path.read_text()) if path.is_file() else MSMTU_TABLE_UNITS
    except ValueError as exc:
        raise TrainingDataError(f"{path}: not a JSON mapping of variable to units ({exc})") from None
    return tuple(str(declared.get(name, "")) for name in names)


def _check_published_units(root: Path, values: np.ndarray, masks: np.ndarray) -> None:
    """Refuse time series that are not reflectance x 1e4 (the layout's published unit)."""
    observed = np.abs(values[masks > 0])
    if observed.size and (median := float(np.median(observed))) < _SCALED_MEDIAN_LIMIT:
        raise TrainingDataError(
            f"{root / 'ts_files'}: observed values have median {median:.4g}, expected reflectance x 1e4 as "
            "published (hundreds to thousands); multiply 0-1 reflectance by 10000")


def _read_series(root: Path, square_id: int, listed_in: str) -> tuple[np.ndarray, np.ndarray]:
    path = root / "ts_files" / f"{square_id:07d}.json"
    if not path.is_file():
        raise TrainingDataError(f"{path}: missing time series for square_id {square_id} listed in "
                                f"{listed_in}")
    try:
        forward = json.loads(path.read_text())["ts_data"]["forward"]
        values = np.asarray(forward["values"], dtype=np.float32)
        masks = np.asarray(forward["masks"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingDataError(f"{path}: expected ts_data.forward.values and .masks "
                                f"({type(exc).__name__}: {exc})") from None
    for name, array in (("values", values), ("masks", masks)):
        if array.shape != (N_MONTHS, N_BANDS):
            raise TrainingDataError(f"{path}: ts_data.forward.{name} is "
                                    f"{' x '.join(map(str, array.shape))}, expected {N_MONTHS} x {N_BANDS}")
    masks = (masks > 0) & np.isfinite(values)
    return np.where(masks, values, 0.0), masks.astype(np.float32)


def check_same_grid(cube: xr.Dataset, reference: xr.DataArray, cube_name: str, reference_name: str) -> None:
    """The reference lies on the cube's grid: the same CRS (where it records one) and the same
    pixel centres, to a hundredth of a pixel (a relative tolerance let a grid 40 m off pass)."""
    with rioxarray_quietly():
        cube_crs, reference_crs = cube.rio.crs, reference.rio.crs
    if reference_crs is not None and cube_crs is not None and reference_crs != cube_crs:
        raise TrainingDataError(f"{reference_name}: CRS {reference_crs.to_string()} differs from the cube's "
                                f"{cube_crs.to_string()} ({cube_name}); reproject the reference onto the cube's grid")
    for dim in ("y", "x"):
        if cube.sizes[dim] != reference.sizes.get(dim):
            raise TrainingDataError(f"{reference_name}: {reference.sizes.get(dim, 0)} pixels along {dim}, the cube "
                                    f"{cube_name} has {cube.sizes[dim]} (reference and cube must share one grid)")
        centres, theirs = cube[dim].values.astype(np.float64), reference[dim].values.astype(np.float64)
        pixel = abs(centres[1] - centres[0]) if len(centres) > 1 else 1.0
        offset = float(np.max(np.abs(centres - theirs))) if len(centres) else 0.0
        if not offset <= pixel / 100:
            raise TrainingDataError(f"{reference_name}: grid differs from {cube_name} along {dim} by up to {offset:g} "
                                    f"(pixel size {pixel:g}; reference and cube must share one grid)")


def read_cube_reference(cube: str | Path, reference: str | Path, level: str, *,
                        ancillary: Sequence[str] = ANCILLARY_NAMES, split_block: int = 16,
                        fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> PixelSet:
    """Every pixel of an input cube with its reference abundances on the same grid.

    The reference is a Zarr store with ``abundance(lulc_class, y, x)`` (``class``, as older
    stores name the dimension, is read too), either at its root or in a group named after the
    level (as ``simulate`` writes). The split is the store's ``partition(y, x)`` when it has
    one, else a spatial block split of ``split_block``.
    Pixels whose reference is not finite are left out.
    """
    ds = open_input_cube(cube, ancillary=ancillary)
    ref_path = Path(reference)
    if not ref_path.exists():
        raise TrainingDataError(f"{ref_path}: reference abundance cube not found")
    root = xr.open_zarr(ref_path, consolidated=False, decode_coords="all")
    group = level if (ref_path / level).is_dir() else None
    ref = xr.open_zarr(ref_path, group=group, consolidated=False, decode_coords="all") if group else root
    if "abundance" not in ref:
        raise TrainingDataError(f"{ref_path}: no 'abundance(lulc_class, y, x)' variable for level "
                                f"'{level}' (looked in group '{group or '/'}')")
    abundance = ref["abundance"]
    if LEGACY_CLASS_DIM in abundance.dims:
        abundance = abundance.rename({LEGACY_CLASS_DIM: CLASS_DIM})
    check_same_grid(ds, abundance, str(cube), str(ref_path))
    height, width = ds.sizes["y"], ds.sizes["x"]
    partition = (root["partition"].values.astype(np.int8) if "partition" in root
                 else spatial_block_split(height, width, split_block, fractions, seed))

    refl = ds["reflectance"].values
    qa = ds["state_qa"].values if "state_qa" in ds else None
    masks = observed_mask(refl, qa)  # (T, B, y, x)
    sensor = cube_sensor(ds, cube)  # its bands and scale
    values = np.where(masks, refl * np.float32(sensor.scale), 0.0).astype(np.float32)
    to_pixels = lambda a: a.reshape(N_MONTHS, len(sensor.bands), -1).transpose(2, 0, 1)  # noqa: E731
    truth = abundance.transpose(CLASS_DIM, "y", "x").values.reshape(abundance.sizes[CLASS_DIM], -1).T
    keep = np.isfinite(truth).all(axis=1)
    ids = np.nonzero(keep)[0].astype(np.int64)
    return PixelSet(
        values=to_pixels(values)[keep], masks=to_pixels(masks.astype(np.float32))[keep],
        ancillary=np.stack([ds[n].values.ravel() for n in ancillary], axis=1)[keep].astype(np.float32)
        if ancillary else np.zeros((len(ids), 0), np.float32),
        abundance=truth[keep].astype(np.float32), ids=ids, partition=partition.ravel()[keep],
        ancillary_names=tuple(ancillary), classes=tuple(str(c) for c in abundance[CLASS_DIM].values),
        ancillary_units=tuple(str(ds[n].attrs.get("units", "")) for n in ancillary),
        grid_shape=(height, width), sensor=sensor.name)
