"""The output products: their schema (names, dtypes, fill values, CF attributes) and the one
function that computes a block of them from a block of an input cube.

``run`` (the distributed, resumable pipeline) and ``unmix`` (lazy xarray, for notebooks)
both go through :func:`prepare_block` and :func:`estimate_block`, and both describe their
output with :func:`output_template`, so the two can never disagree.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import dask.array
import numpy as np
import pandas as pd
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from msmtu_batch.inputs.cube import (
    ANCILLARY_NAMES,
    BAND_COMMON_NAMES,
    BAND_NAMES,
    CLASS_DIM,
    REFLECTANCE_FILL,
    REFLECTANCE_SCALE,
    check_ancillary_finite,
    cube_sensor,
    grid_transform,
    open_input_cube,
    validate_input_cube,
)
from msmtu_batch.inputs.units import apply_conversions
from msmtu_batch.model.artifact import ModelArtifact, artifact_hash, load_artifact
from msmtu_batch.model.hierarchy import ClassHierarchy
from msmtu_batch.model.inference import predict, require_cpu_kernels
from msmtu_batch.model.kernels import prepare_chunk
from msmtu_batch.model.palette import default_class_colors
from msmtu_batch.model.preprocess import ModelInputs
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.provenance import __version__

FLAG_ESTIMATED, FLAG_TOO_FEW_OBSERVATIONS, FLAG_UNLIKE_TRAINING = 0, 1, 2
DOMINANT_FILL = 255  # dominant_class is a byte raster: classes 0..254, 255 = no estimate
OUTPUT_FILLS: dict[str, int | float] = {"dominant_class": DOMINANT_FILL, "imputed_reflectance": REFLECTANCE_FILL}


def output_fills(ds: xr.Dataset) -> dict[str, int | float]:
    """The integer products' fill values (:data:`OUTPUT_FILLS`, a two-level model's
    ``dominant_class_<level>`` too); floats are NaN."""
    return {name: OUTPUT_FILLS["dominant_class" if name.startswith("dominant_class") else name]
            for name in ds.data_vars if name in OUTPUT_FILLS or name.startswith("dominant_class")}


def coarse_level_names(hierarchy: ClassHierarchy) -> tuple[str, str, str]:
    """A two-level model's coarse level in an output: its class dimension, abundance and
    dominant-class variables (``lulc_class_level1``, ``abundance_level1``, ``dominant_class_level1``)."""
    return f"{CLASS_DIM}_{hierarchy.level}", f"abundance_{hierarchy.level}", f"dominant_class_{hierarchy.level}"
REFERENCES = ("Rodriguez-Ortega, Khaldi, Alcaraz-Segura, Tabik (2024): Bidirectional recurrent imputation and "
              "abundance estimation of LULC classes with MODIS multispectral time series and geo-topographic and "
              "climatic data. IEEE JSTARS 17. Training data: Andalusia-MSMTU, https://zenodo.org/records/7752348")
# libraries whose versions make a result what it is, recorded in its attributes and run records
DEPENDENCIES = ("numpy", "torch", "numba", "dask", "distributed", "dask-jobqueue", "xarray", "zarr", "rioxarray",
                "rasterio", "rio-cogeo", "pyhdf", "pydantic")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk: int = Field(256, ge=8, description="spatial chunk side (pixels)")
    min_months: int = Field(3, ge=1, le=12, description="fewer observed months -> NaN and a flag")
    batch_size: int = Field(8192, ge=1, description="pixels per model batch")
    imputed: bool = Field(False, description="also write imputed_reflectance(time, band, y, x)")
    # The input-distribution guard: a chunk whose mean standardised value of a band (or of an
    # ancillary variable) lies further than this many training standard deviations from the
    # training mean is unlike the training data. Measured on simulated regions: chunk means
    # of real data stay within 3.4 (bands) and 4.4 (ancillary, mountain chunks) at 8 x 8 pixels
    # and within 1.6 at 128; red and NIR swapped give at least 4.3 in every chunk; wrong units
    # give 9 and more. Ancillary fields are smooth and a chunk may be a whole massif: looser.
    max_band_shift: float = Field(4.0, gt=0, description="limit on a band's chunk-mean shift (training std)")
    max_ancillary_shift: float = Field(6.0, gt=0, description="limit on an ancillary chunk-mean shift")
    out_of_distribution: Literal["stop", "flag"] = Field(
        "stop", description="past a limit: stop naming the chunk, or flag its pixels (quality_flag 2)")
    zarr_format: Literal[2, 3] = Field(
        3, description="Zarr format of the output: 3, or 2 for zarr-python 2 and GDAL before 3.8")
    # the model's error head costs 7-12 % of the model's own time on an AVX2-only CPU (benchmarks/NOTES.md,
    # 2026-12-03, evening; 15-22 % before its trees were evaluated by bit vectors)
    expected_error: bool = Field(True, description="write expected_error(y, x) where the model has an error head")
    # Reduced precision changes the map a little (benchmarks/NOTES.md: the precision table of
    # `bench`); bf16 keeps it and is faster on CPUs with bf16 instructions, but fp32 stays the
    # default: the same bytes whatever kind of CPU a chunk lands on
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the model's matrix products: fp32; bf16 (the CPU engine's bf16 GEMMs, autocast on "
                            "a GPU); fp16 (autocast)")


# --- schema ----------------------------------------------------------------------------------

def time_coverage(times: Sequence) -> dict[str, str]:
    """ACDD time coverage of a year of monthly steps: first day of the first month to the last
    day of the last."""
    months = pd.DatetimeIndex(times)
    end = months[-1] + pd.offsets.MonthEnd(0)
    return {"time_coverage_start": months[0].strftime("%Y-%m-%d"), "time_coverage_end": end.strftime("%Y-%m-%d")}


def creation_time() -> str:
    """Now, in UTC, or ``SOURCE_DATE_EPOCH`` when set (the reproducible-builds convention: two
    runs of the same inputs then give byte-identical stores, metadata included)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def software_versions() -> dict[str, str]:
    """msmtu-batch, Python, GDAL and the libraries a result depends on."""
    import rasterio

    versions = {"msmtu-batch": __version__, "python": sys.version.split()[0], "gdal": rasterio.__gdal_version__}
    for name in DEPENDENCIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance_attrs(*, model_hash: str, model: str, input_store: str, input_content: str | None,
                     command: str) -> dict[str, str]:
    """Global attributes saying what made an output: the model and input (by content), the
    software and its dependencies, when, and the command (CF ``history``)."""
    created = creation_time()
    attrs = {"date_created": created, "history": f"{created} {command}", "software_version": __version__,
             "software_versions": ", ".join(f"{k} {v}" for k, v in software_versions().items()),
             "model": model, "model_hash": model_hash, "input_store": input_store}
    if input_content:
        attrs["input_content"] = input_content
    return attrs


def output_template(grid: xr.Dataset, artifact: ModelArtifact, config: RunConfig,
                    chunks: Mapping[str, int | tuple[int, ...]] | None = None) -> xr.Dataset:
    """The output products on ``grid`` (an input cube: its y, x, CRS and months), as lazy arrays
    of their fill values in their stored dtypes, with their CF attributes; ``chunks`` (y and x)
    default to ``config.chunk``. Fill values are in :func:`output_fills` (NaN for floats). A
    two-level model's coarse level adds its abundance and dominant class (:func:`coarse_level_names`)."""
    height, width, k = grid.sizes["y"], grid.sizes["x"], len(artifact.classes)
    levels = artifact.hierarchy
    coarse_dim, coarse_abundance, coarse_dominant = coarse_level_names(levels) if levels else (None, None, None)
    if k > DOMINANT_FILL:
        raise MsmtuError(f"the model has {k} classes; dominant_class holds at most {DOMINANT_FILL}")
    chunks = dict(chunks or {"y": config.chunk, "x": config.chunk})

    def filled(dims: tuple[str, ...], dtype, fill) -> tuple:
        sizes = {"y": height, "x": width, CLASS_DIM: k, "time": grid.sizes.get("time"), "band": len(BAND_NAMES),
                 coarse_dim: len(levels.classes) if levels else None}
        # dask's own constant array: nothing of the region's size is ever allocated (chunking a
        # broadcast NumPy view copied it whole: 870 MiB at 4096 x 4096, benchmarks/NOTES.md)
        return dims, dask.array.full(tuple(sizes[d] for d in dims), fill, dtype=dtype,
                                     chunks=tuple(chunks.get(d, -1) for d in dims))

    classes = xr.Variable(CLASS_DIM, np.array(artifact.classes, dtype=object),
                          {"standard_name": "area_type", "long_name": f"LULC class ({artifact.level})"})
    out = xr.Dataset(coords={"y": grid["y"], "x": grid["x"], CLASS_DIM: classes})
    out["abundance"] = filled((CLASS_DIM, "y", "x"), np.float32, np.nan)
    out["abundance"].attrs.update(
        standard_name="area_fraction", long_name=f"{artifact.level} LULC abundance", units="1",
        valid_range=[0.0, 1.0], comment="fraction of each class in the pixel; sums to 1 where quality_flag is 0")
    out["dominant_class"] = filled(("y", "x"), np.uint8, DOMINANT_FILL)
    out["dominant_class"].attrs.update(
        long_name="class of largest abundance", flag_values=list(range(k)), flag_meanings=" ".join(artifact.classes),
        flag_colors=" ".join(artifact.class_colors), comment=f"{DOMINANT_FILL}: no estimate (see quality_flag)")
    if levels is not None:
        out = out.assign_coords({coarse_dim: xr.Variable(coarse_dim, np.array(levels.classes, dtype=object), {
            "standard_name": "area_type", "long_name": f"LULC class ({levels.level})"})})
        out[coarse_abundance] = filled((coarse_dim, "y", "x"), np.float32, np.nan)
        out[coarse_abundance].attrs.update(
            standard_name="area_fraction", long_name=f"{levels.level} LULC abundance", units="1",
            valid_range=[0.0, 1.0],
            comment=f"sum of the {artifact.level} abundances of each class's children ("
                    + "; ".join(f"{c}: {', '.join(f for f, p in zip(artifact.classes, levels.parents) if p == c)}"
                                for c in levels.classes) + ")")
        out[coarse_dominant] = filled(("y", "x"), np.uint8, DOMINANT_FILL)
        out[coarse_dominant].attrs.update(
            long_name=f"{levels.level} class of largest abundance", flag_values=list(range(len(levels.classes))),
            flag_meanings=" ".join(levels.classes), flag_colors=" ".join(default_class_colors(levels.classes)),
            comment=f"{DOMINANT_FILL}: no estimate (see quality_flag)")
    out["uncertainty"] = filled(("y", "x"), np.float32, np.nan)
    out["uncertainty"].attrs.update(long_name="disagreement of the forward and backward passes", units="1",
                                    comment="total-variation distance between their abundance vectors")
    if artifact.error_head is not None and config.expected_error:
        out["expected_error"] = filled(("y", "x"), np.float32, np.nan)
        out["expected_error"].attrs.update(
            long_name="expected abundance error of the pixel", units="1",
            comment="the root mean square, over the classes, of the difference between the pixel's abundances and "
                    "the truth to expect here: learnt from the model's errors on its training and validation pixels "
                    "(from the uncertainty, the abundances, their entropy, the valid fraction and the ancillary "
                    "values), calibrated on the validation pixels")
    out["valid_fraction"] = filled(("y", "x"), np.float32, np.nan)
    out["valid_fraction"].attrs.update(long_name="share of observed values (12 months x 7 bands)", units="1")
    out["quality_flag"] = filled(("y", "x"), np.uint8, FLAG_TOO_FEW_OBSERVATIONS)
    out["quality_flag"].attrs.update(
        standard_name="status_flag", long_name="estimation flag",
        flag_values=[FLAG_ESTIMATED, FLAG_TOO_FEW_OBSERVATIONS, FLAG_UNLIKE_TRAINING],
        flag_meanings="estimated too_few_observations input_unlike_training_data",
        comment=f"1: fewer than {config.min_months} observed months, abundances are NaN; 2: estimated from a chunk "
                "whose inputs are unlike the model's training data (run with --out-of-distribution flag)")
    if config.imputed:
        out = out.assign_coords(time=grid["time"], band=xr.Variable(
            "band", np.array(BAND_NAMES, dtype=object), {"long_name": ", ".join(BAND_COMMON_NAMES)}))
        out["imputed_reflectance"] = filled(("time", "band", "y", "x"), np.int16, REFLECTANCE_FILL)
        out["imputed_reflectance"].attrs.update(
            standard_name="surface_bidirectional_reflectance", long_name="gap-filled surface reflectance (BRITS)",
            units="1", scale_factor=REFLECTANCE_SCALE)
    if grid.rio.crs is not None:
        out = out.rio.write_crs(grid.rio.crs).rio.write_transform(grid_transform(grid))
    out.attrs.update(Conventions="CF-1.8, ACDD-1.3", title=f"LULC abundances, {artifact.level} (msmtu-batch)",
                     source=f"msmtu-batch {__version__}: BRITS on {cube_sensor(grid).name} monthly reflectance",
                     references=REFERENCES, level=artifact.level,
                     model_ancillary=", ".join(artifact.ancillary_names) or "none",
                     min_observed_months=config.min_months, **time_coverage(grid["time"].values))
    return out


# --- the per-block computation -----------------------------------------------------------------

def input_shifts(inputs: ModelInputs, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean standardised value of each band over a chunk's observed values, and of each
    ancillary variable over its pixels with an observation: 0 for data like the training data."""
    n, steps, features = inputs.values.shape
    ones = np.ones(n, np.float32)  # column sums as one BLAS product each: 20x faster than .sum here
    counts = (ones @ inputs.masks.reshape(n, -1)).reshape(steps, features).sum(axis=0)
    bands = (ones @ inputs.values.reshape(n, -1)).reshape(steps, features).sum(axis=0) / np.maximum(counts, 1)
    has_observation = observed > 0
    ancillary = (inputs.ancillary[has_observation].mean(axis=0, dtype=np.float64) if has_observation.any()
                 else np.zeros(inputs.ancillary.shape[1]))
    return bands, ancillary


def unlike_training(config: RunConfig, artifact: ModelArtifact, inputs: ModelInputs, observed: np.ndarray,
                    source: str, label: str) -> bool:
    """The input-distribution guard (limits in :class:`RunConfig`): stop with the block
    (``label``), the variable and both statistics named, or (``out_of_distribution: flag``)
    say to flag it."""
    band_shift, ancillary_shift = input_shifts(inputs, observed)
    rows = [(f"band {name} ({common})", z, config.max_band_shift, mean, std, "")
            for name, common, z, mean, std in zip(BAND_NAMES, BAND_COMMON_NAMES, band_shift,
                                                  artifact.band_stats.mean, artifact.band_stats.std)]
    if artifact.ancillary_stats is not None:
        rows += [(f"ancillary '{name}'", z, config.max_ancillary_shift, mean, std, f" {unit}")
                 for name, unit, z, mean, std in zip(artifact.ancillary_names, artifact.ancillary_units,
                                                     ancillary_shift, artifact.ancillary_stats.mean,
                                                     artifact.ancillary_stats.std)]
    what, z, limit, mean, std, unit = max(rows, key=lambda row: abs(row[1]) / row[2])
    if abs(z) <= limit:
        return False
    if config.out_of_distribution == "flag":
        return True
    raise MsmtuError(
        f"{source}: chunk {label}: {what} has mean {z * std + mean:.4g}{unit} where the model's training "
        f"data has {mean:.4g} +/- {std:.4g}{unit} ({z:+.1f} standard deviations, limit {limit:g}); check its "
        "units and band order, or pass --out-of-distribution flag to map it with quality_flag 2")


def prepare_block(reflectance: np.ndarray, state_qa: np.ndarray | None, ancillary: Sequence[np.ndarray],
                  artifact: ModelArtifact, config: RunConfig, *, source: str, label: str, y0: int = 0, x0: int = 0,
                  conversions: tuple[tuple[float, float], ...] = ()) -> tuple[ModelInputs, np.ndarray, bool]:
    """Check and prepare a block of an input cube (``reflectance`` (T, B, y, x) int16 as stored,
    ``state_qa`` (T, y, x) or None, ``ancillary`` one (y, x) array per variable in the cube's
    units and the model's variable order); return the model inputs, each pixel's count of
    usable values and whether the block is unlike the training data. ``source``, ``label`` and
    ``y0``/``x0`` name the block in messages."""
    height, width = reflectance.shape[2:]
    stacked = np.stack(ancillary) if len(ancillary) else np.zeros((0, height, width), np.float32)
    ancillary = apply_conversions(stacked, conversions)
    check_ancillary_finite(source, artifact.ancillary_names, ancillary,
                           (reflectance != REFLECTANCE_FILL).any(axis=(0, 1)), y0, x0, f" in chunk {label}")
    inputs, observed = prepare_chunk(reflectance, state_qa, ancillary, artifact.band_stats, artifact.ancillary_stats)
    return inputs, observed, unlike_training(config, artifact, inputs, observed, source, label)


def estimate_block(inputs: ModelInputs, observed: np.ndarray, artifact: ModelArtifact, config: RunConfig,
                   shape: tuple[int, int], unlike: bool = False) -> dict[str, np.ndarray]:
    """The products of a prepared block of ``shape`` (height, width), in their stored dtypes
    and fill values (the single place where output values are computed)."""
    height, width = shape
    # months with an observed band: the masks (0 or 1) summed over the bands by a product, 0.06
    # us a pixel against 0.45 for a maximum along the 7 bands (NumPy reduces a short axis slowly)
    months = np.count_nonzero(inputs.masks @ np.ones(inputs.masks.shape[2], np.float32) > 0, axis=1)
    valid = (months >= config.min_months) & np.isfinite(inputs.ancillary).all(axis=1)
    device = next(artifact.model.parameters()).device
    if device.type == "cpu":
        require_cpu_kernels(config.precision)
    # every pixel goes through the model (each is independent) and the invalid ones (about
    # 1 %) are blanked afterwards: cheaper than copying the valid ones out
    prediction = predict(artifact.model, inputs, config.batch_size, device=device, imputed=config.imputed,
                         precision=config.precision)
    k = len(artifact.classes)
    abundance = np.where(valid[:, None], prediction["abundance"], np.float32(np.nan))
    uncertainty = np.where(valid, prediction["uncertainty"], np.float32(np.nan))
    dominant = np.where(valid, prediction["abundance"].argmax(axis=1), DOMINANT_FILL).astype(np.uint8)
    steps, bands = inputs.masks.shape[1:]
    valid_fraction = (observed / (steps * bands)).astype(np.float32)
    products = {
        "abundance": abundance.T.reshape(k, height, width),
        "dominant_class": dominant.reshape(height, width),
        "uncertainty": uncertainty.reshape(height, width),
        "valid_fraction": valid_fraction.reshape(height, width),
        "quality_flag": np.where(valid, FLAG_UNLIKE_TRAINING if unlike else FLAG_ESTIMATED,
                                 FLAG_TOO_FEW_OBSERVATIONS).astype(np.uint8).reshape(height, width)}
    if artifact.error_head is not None and config.expected_error:
        expected = artifact.error_head.expected_error(prediction["abundance"], prediction["uncertainty"],
                                                      valid_fraction, inputs.ancillary)
        products["expected_error"] = np.where(valid, expected, np.float32(np.nan)).reshape(height, width)
    if (levels := artifact.hierarchy) is not None:  # the coarse level: sums of the fine level's abundances
        _, coarse_abundance, coarse_dominant = coarse_level_names(levels)
        coarse = levels.coarse(prediction["abundance"])
        products[coarse_abundance] = np.where(valid[:, None], coarse, np.float32(np.nan)).T.reshape(
            len(levels.classes), height, width)
        products[coarse_dominant] = np.where(valid, coarse.argmax(axis=1), DOMINANT_FILL).astype(np.uint8).reshape(
            height, width)
    if config.imputed:
        reflectance_units = artifact.band_stats.invert(prediction["imputed"]) / REFLECTANCE_SCALE
        imputed = np.where(valid[:, None, None], np.clip(np.rint(np.nan_to_num(reflectance_units)), -32767, 32767),
                           REFLECTANCE_FILL).astype(np.int16)
        products["imputed_reflectance"] = imputed.transpose(1, 2, 0).reshape(steps, bands, height, width)
    return products


# --- unmix: the products as a lazy xarray Dataset ------------------------------------------------

def _raw_input(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with reflectance as stored (int16, 1e-4 scale, fill -28672), also when the user
    opened it decoded (plain ``xr.open_zarr``: float reflectance, NaN at gaps)."""
    refl = ds["reflectance"]
    if refl.dtype.kind != "f":
        return ds
    scale = float(refl.encoding.get("scale_factor", REFLECTANCE_SCALE))
    raw = xr.where(refl.notnull(), np.rint(refl / scale), REFLECTANCE_FILL).astype(np.int16)
    raw.attrs = {**{k: v for k, v in refl.attrs.items() if k != "units"}, "_FillValue": REFLECTANCE_FILL,
                 "scale_factor": scale}
    return ds.assign(reflectance=raw)


def unmix(ds: xr.Dataset, model: ModelArtifact | str | os.PathLike, config: RunConfig | None = None, *,
          allow_other_sensor: bool = False) -> xr.Dataset:
    """The output products of ``ds`` (an input cube: opened with :func:`open_cube`, a plain
    ``xr.open_zarr``, a subset such as ``ds.isel(y=[10], x=[20])`` for one pixel, or built in
    memory), lazily: one dask task per (y, x) chunk of ``ds``, computed by the same per-block
    function as ``run``. Returns the same variables and attributes as ``open_output`` on
    ``run``'s store (decoded: NaN where no estimate). A cube of a sensor other than the model's
    training data is refused unless ``allow_other_sensor``."""
    config = config or RunConfig()
    artifact = model if isinstance(model, ModelArtifact) else load_artifact(model)
    model_hash = "unknown (an in-memory model)" if isinstance(model, ModelArtifact) else artifact_hash(model)
    source = str(ds.encoding.get("source", "the dataset"))
    ds = _raw_input(ds)
    artifact.check_sensor(cube_sensor(ds, source).name, source, allow_other_sensor)  # before its bands or variables
    validate_input_cube(ds, store=source, ancillary=artifact.ancillary_names, read_values=False)
    artifact.check_matches([str(b) for b in ds["band"].values], list(ds.data_vars), source)
    conversions = artifact.unit_conversions({n: ds[n].attrs.get("units") for n in artifact.ancillary_names}, source)
    has_qa = "state_qa" in ds.data_vars
    variables = ["reflectance", *(["state_qa"] if has_qa else []), *artifact.ancillary_names]
    inputs = ds[variables]
    inputs = inputs.chunk({"time": -1, "band": -1} if inputs.chunks else
                          {"time": -1, "band": -1, "y": config.chunk, "x": config.chunk})
    template = output_template(ds, artifact, config, {"y": inputs.chunks["y"], "x": inputs.chunks["x"]})
    template.attrs.update(provenance_attrs(model_hash=model_hash, model=str(model), input_store=source,
                                           input_content=None, command="msmtu_batch.unmix"))
    y_index = pd.Index(ds["y"].values)
    x_index = pd.Index(ds["x"].values)

    def block(part: xr.Dataset) -> xr.Dataset:
        y0, x0 = y_index.get_loc(part["y"].values[0]), x_index.get_loc(part["x"].values[0])
        height, width = part.sizes["y"], part.sizes["x"]
        label = f"y {y0}:{y0 + height}, x {x0}:{x0 + width}"
        prepared, observed, unlike = prepare_block(
            part["reflectance"].values, part["state_qa"].values if has_qa else None,
            [part[n].values for n in artifact.ancillary_names], artifact, config,
            source=source, label=label, y0=y0, x0=x0, conversions=conversions)
        products = estimate_block(prepared, observed, artifact, config, (height, width), unlike)
        result = template.isel(y=slice(y0, y0 + height), x=slice(x0, x0 + width))
        for name, values in products.items():
            result[name] = result[name].copy(data=values)
        return result

    raw = xr.map_blocks(block, inputs, template=template)
    for name, fill in output_fills(raw).items():
        raw[name].attrs["_FillValue"] = fill
    return xr.decode_cf(raw, decode_coords="all")


def open_cube(path: str | os.PathLike) -> xr.Dataset:
    """An input cube, lazily, its contract checked from the metadata (values are checked chunk
    by chunk when used); reflectance as stored (int16, ``scale_factor`` 1e-4)."""
    ds = open_input_cube(path, validate=False)
    validate_input_cube(ds, store=path, ancillary=[n for n in ANCILLARY_NAMES if n in ds.data_vars],
                        read_values=False)
    return ds
