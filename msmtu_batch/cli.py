"""Command line: ``msmtu-batch simulate | validate | demo | train | evaluate | ablation | ingest | run |
workflow | cluster-script | bench``
(docs/design.md section 4b)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, track

from msmtu_batch.inputs.cube import ANCILLARY_NAMES, ANCILLARY_SETS, open_input_cube
from msmtu_batch.inputs.training_data import PARTITIONS, PixelSet
from msmtu_batch.runtime.errors import MsmtuError, MsmtuWarning
from msmtu_batch.runtime.provenance import __version__
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate

app = typer.Typer(help="LULC abundance mapping from MODIS monthly time series with BRITS.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


class AncillaryChoice(StrEnum):
    none = "none"
    geotopo = "geotopo"
    all = "all"

    @property
    def names(self) -> tuple[str, ...]:
        return ANCILLARY_SETS[self.value]


class OutOfDistribution(StrEnum):
    stop = "stop"
    flag = "flag"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input ends the command with one line on stderr and exit status 2."""
    try:
        yield
    except MsmtuError as exc:
        console.print(f"[red]msmtu-batch: error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                             for e in exc.errors())
        console.print(f"[red]msmtu-batch: error:[/red] invalid configuration: {problems}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # the disk or the file system said no: full, read-only, permissions
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(f"[red]msmtu-batch: error:[/red] {where}{exc.strerror or exc}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a scheduler's cancel: see run())
        console.print("msmtu-batch: interrupted; rerun the same command to resume", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(128 + getattr(exc, "signal", signal.SIGINT)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception in the main thread: the `finally` blocks and context managers
    that remove temporary files and release locks run, as after Ctrl-C."""

    signal = signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


_show_python_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line each, without Python's source location."""
    if issubclass(category, MsmtuWarning):
        console.print(f"msmtu-batch: warning: {message}", highlight=False, soft_wrap=True)
    else:
        _show_python_warning(message, category, filename, lineno, file, line)


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """msmtu-batch command line."""


def _config_section(config: Path | None, section: str) -> dict:
    """The ``section`` mapping of a YAML settings file (or its top level if it has none)."""
    if config is None:
        return {}
    if not config.is_file():
        raise MsmtuError(f"{config}: configuration file not found")
    loaded = yaml.safe_load(config.read_text()) or {}
    values = loaded.get(section, loaded) if isinstance(loaded, dict) else None
    if not isinstance(values, dict):
        raise MsmtuError(f"{config}: expected a mapping of {section} settings")
    return dict(values)


def _with_overrides(values: dict, overrides: dict) -> dict:
    return values | {k: v for k, v in overrides.items() if v is not None}


def _run_simulation(cfg: SimulationConfig, out: Path, overwrite: bool) -> float:
    blocks = -(-cfg.height // cfg.chunk)
    start = time.perf_counter()
    simulate(cfg, out, overwrite=overwrite,
             progress=lambda it: track(it, description=f"simulating {cfg.height} x {cfg.width}",
                                       total=blocks, console=console, transient=True))
    return time.perf_counter() - start


@app.command("simulate")
def simulate_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    height: Annotated[int | None, typer.Option(help="Rows (default 200).")] = None,
    width: Annotated[int | None, typer.Option(help="Columns (default 300).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    year: Annotated[int | None, typer.Option(help="Year of the monthly time axis (default 2013).")] = None,
    msmtu_pixels: Annotated[int | None, typer.Option(
        help="Pixels written in the Andalusia-MSMTU layout (default 2000).")] = None,
    chunk: Annotated[int | None, typer.Option(help="Spatial chunk of the stores (default 128).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML file of simulation settings (a 'simulate' section or top-level keys); "
             "flags override it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs in --out.")] = False,
) -> None:
    """Simulate a synthetic Andalusia-like region.

    Writes OUT/cube.zarr (input cube), OUT/reference.zarr (true abundances per level, groups
    level1 and level2, plus the spatial split) and OUT/msmtu/ (Andalusia-MSMTU layout).
    """
    with _user_errors():
        cfg = SimulationConfig(**_with_overrides(_config_section(config, "simulate"), dict(
            height=height, width=width, seed=seed, year=year, msmtu_pixels=msmtu_pixels, chunk=chunk)))
        seconds = _run_simulation(cfg, out, overwrite)
        print(f"wrote {out / 'cube.zarr'}, {out / 'reference.zarr'}, {out / 'msmtu'} "
              f"({cfg.height} x {cfg.width} pixels, seed {cfg.seed}) in {seconds:.1f} s")


@app.command("validate")
def validate_command(
    cube: Annotated[Path, typer.Argument(help="Input cube (Zarr).")],
    ancillary: Annotated[AncillaryChoice, typer.Option(
        help="Ancillary variables required: none, geotopo (lon, lat, altitude, slope) or all.")]
        = AncillaryChoice.all,
) -> None:
    """Check an input cube against the data contract (docs/design.md section 4)."""
    with _user_errors():
        ds = open_input_cube(cube, ancillary=ancillary.names)
        print(f"{cube}: valid input cube ({ds.sizes['y']} x {ds.sizes['x']} pixels, "
              f"{ds.sizes['time']} months, CRS {ds.rio.crs.to_string()})")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Output folder (replaced).")] = Path("demo-output"),
    height: Annotated[int, typer.Option(help="Rows.")] = 200,
    width: Annotated[int, typer.Option(help="Columns.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(help="Maximum training epochs.")] = 10,
) -> None:
    """End-to-end demo: simulate a region, train a model, unmix it on this machine (Zarr + COG),
    print the accuracy against the simulated truth and save a PNG map."""
    from msmtu_batch.demo import run_demo

    with _user_errors(), _epoch_progress(epochs) as on_epoch:
        run_demo(out, height, width, seed, epochs, say=print, on_epoch=on_epoch)


# --- training and evaluation ------------------------------------------------------------------

MsmtuOption = Annotated[Path | None, typer.Option("--msmtu", help="Andalusia-MSMTU folder.")]
CubeOption = Annotated[Path | None, typer.Option("--cube", help="Input cube (Zarr), with --reference.")]
ReferenceOption = Annotated[Path | None, typer.Option(
    "--reference", help="Reference abundance cube (Zarr) on the cube's grid.")]
LevelOption = Annotated[str, typer.Option("--level", help="Label level, e.g. level1 or level2.")]
ZarrFormatOption = Annotated[int | None, typer.Option(
    "--zarr-format", help="Zarr format of the store written: 3 (default) or 2 (for zarr-python 2 and GDAL before "
                          "3.8).")]


AncillaryUnitsOption = Annotated[list[str] | None, typer.Option(
    "--ancillary-units", help="NAME=UNITS (repeatable): the units of an Andalusia-MSMTU folder's ancillary column, "
                              "a CF/udunits string such as 'mm year-1' or 'degC'. The published table declares "
                              "none for precipitation and evapotranspiration (docs/training-data.md).")]


def _ancillary_units(values: list[str] | None, configured: dict[str, str] | None = None) -> dict[str, str]:
    """The declared units of the MSMTU table's columns: the config's, overridden by the flags."""
    return dict(configured or {}) | _pairs_option(values, "--ancillary-units", "NAME=UNITS, e.g. "
                                                                              "precipitation='mm year-1'")


def _read_pixels(msmtu: Path | None, cube: Path | None, reference: Path | None, level: str,
                 ancillary: tuple[str, ...], units: dict[str, str] | None = None) -> tuple[PixelSet, str]:
    from msmtu_batch.inputs.training_data import read_cube_reference, read_msmtu

    if msmtu is not None and cube is None and reference is None:
        return read_msmtu(msmtu, level, ancillary_units=units), str(msmtu)
    if units:
        raise MsmtuError("--ancillary-units declares the units of an Andalusia-MSMTU table (--msmtu); a cube's "
                         "variables carry their own units attribute")
    if msmtu is None and cube is not None and reference is not None:
        return read_cube_reference(cube, reference, level, ancillary=ancillary), f"{cube} + {reference}"
    raise MsmtuError("give either --msmtu DIR or --cube CUBE with --reference REF")


def _train_config(config: Path | None, **overrides: object):
    from msmtu_batch.model.train import TrainConfig

    return TrainConfig(**_with_overrides(_config_section(config, "train"), overrides))


@contextmanager
def _epoch_progress(epochs: int, label: str = "training") -> Iterator:
    """Progress over epochs with the losses; yields the per-epoch callback.

    On a terminal, a live bar; otherwise (batch jobs, CI logs) one plain line per epoch.
    """
    def status(record: dict) -> str:
        return (f"loss {record['loss']:.4f}  val RMSE {record['validation_rmse']:.4f} "
                f"(best {record['best_validation_rmse']:.4f})")

    if not console.is_terminal:
        yield lambda record, name=label: console.print(
            f"{name} epoch {record['epoch']}/{epochs}: {status(record)}", highlight=False)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, int] = {}

        def on_epoch(record: dict, name: str = label) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=epochs, status="")
            bar.update(tasks[name], completed=record["epoch"], status=status(record))
        yield on_epoch


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Model artifact to write (.safetensors).")],
    level: LevelOption,
    msmtu: MsmtuOption = None,
    cube: CubeOption = None,
    reference: ReferenceOption = None,
    ancillary: Annotated[AncillaryChoice | None, typer.Option(
        help="Ancillary data: none, geotopo (lon, lat, altitude, slope) or all (+ climate); default all, or "
             "the --init-from model's.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default 60).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pixels per batch (default 512).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Adam learning rate (default 6e-3).")] = None,
    hidden: Annotated[int | None, typer.Option(help="LSTM hidden size (default 100).")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (default 8).")]
        = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with a 'train' section; flags override it.")]
        = None,
    class_colors: Annotated[Path | None, typer.Option(
        help="JSON object class name -> '#rrggbb': the colours of the model's maps (COG colour table, QGIS "
             "style, STAC); classes not named keep the default palette.")] = None,
    device: Annotated[str, typer.Option(
        help="Where to train: auto (the first CUDA GPU when torch sees one, else the CPU), cpu or cuda[:N].")]
        = "auto",
    init_from: Annotated[Path | None, typer.Option(
        help="Start from this model artifact's weights (fine-tuning): its architecture and ancillary data; a new "
             "last head layer if the classes differ; its normalisation statistics unless --refit-statistics.")]
        = None,
    refit_statistics: Annotated[bool, typer.Option(
        help="With --init-from: fit the normalisation statistics to the new training data.")] = False,
    checkpoint_every: Annotated[int, typer.Option(
        min=1, help="Write a checkpoint (.OUT.checkpoint) every this many epochs; a rerun of the same command "
                    "resumes from it.")] = 1,
    checkpoint_minutes: Annotated[float | None, typer.Option(
        min=0, help="Also write one at the end of an epoch once this many minutes have passed.")] = None,
    two_level: Annotated[bool, typer.Option(
        help="One model for two levels: the --level classes, and their parents' abundances as their sums; the "
             "loss on both. The hierarchy from --hierarchy, else the training data's (the reference store's "
             "'hierarchy' attribute, an MSMTU folder's labels/hierarchy.json).")] = False,
    hierarchy: Annotated[Path | None, typer.Option(
        help="JSON object mapping each --level class to its parent class (implies --two-level).")] = None,
    ancillary_units: AncillaryUnitsOption = None,
) -> None:
    """Train BRITS and write the model artifact plus OUT's .metrics.json (history, throughput).
    Checkpoints at .OUT.checkpoint let a rerun of the same command (same settings and data)
    resume where a killed training stopped; it is deleted once the artifact is written."""
    from msmtu_batch.model.artifact import artifact_hash, load_artifact, save_artifact
    from msmtu_batch.model.checkpoint import checkpoint_path
    from msmtu_batch.model.hierarchy import hierarchy_in_training_data, read_hierarchy_file
    from msmtu_batch.model.palette import read_class_colors
    from msmtu_batch.model.train import Checkpointing, FineTuning, inherit_architecture, train, training_device
    from msmtu_batch.runtime.outputs import remove_temporaries_of, write_text_durably

    with _user_errors():
        cfg = _train_config(config, ancillary=ancillary.value if ancillary else None, epochs=epochs,
                            batch_size=batch_size, learning_rate=learning_rate, hidden=hidden, patience=patience,
                            seed=seed)
        cfg = cfg.model_copy(update={"ancillary_units": _ancillary_units(ancillary_units, cfg.ancillary_units)})
        on = training_device(device)
        tuning = None
        if init_from is not None:
            tuning = FineTuning(load_artifact(init_from), str(init_from), artifact_hash(init_from), refit_statistics)
            cfg = inherit_architecture(cfg, tuning)
        elif refit_statistics:
            raise MsmtuError("--refit-statistics applies to --init-from only")
        pixels, source = _read_pixels(msmtu, cube, reference, level, ANCILLARY_SETS[cfg.ancillary],
                                      cfg.ancillary_units)
        colors = read_class_colors(class_colors, pixels.classes) if class_colors else None  # before the epochs
        levels = None
        if hierarchy is not None:
            levels = read_hierarchy_file(hierarchy, pixels.classes, level)
        elif two_level:
            levels = hierarchy_in_training_data(msmtu, reference, pixels.classes, level)
        checkpoint = checkpoint_path(out)
        with _epoch_progress(cfg.epochs) as on_epoch:
            result = train(pixels, level, cfg, on_epoch=on_epoch, source=source, device=on, init_from=tuning,
                           checkpointing=Checkpointing(checkpoint, checkpoint_every, checkpoint_minutes),
                           hierarchy=levels)
        if colors:
            result.artifact.class_colors = colors
        save_artifact(result.artifact, out)
        checkpoint.unlink(missing_ok=True)  # the artifact holds the result now
        metrics = out.with_suffix(".metrics.json")
        write_text_durably(metrics, json.dumps({
            "level": level, "source": source, "config": cfg.model_dump(), "best_epoch": result.best_epoch,
            "validation_rmse": result.validation_rmse, "seconds": result.seconds,
            "train_pixels_per_second": result.train_pixels_per_second, "history": result.history}, indent=2))
        for written in (checkpoint, out, metrics):  # what earlier attempts, killed while saving, left
            remove_temporaries_of(written)
        resumed = f" (resumed after epoch {result.resumed_after})" if result.resumed_after else ""
        print(f"wrote {out} and {metrics}: best validation RMSE {result.validation_rmse:.4f} at epoch "
              f"{result.best_epoch} of {len(result.history)}{resumed}, {result.train_pixels_per_second:,.0f} "
              f"training pixels/s, {result.seconds:.0f} s")


@app.command("import-checkpoint")
def import_checkpoint_command(
    checkpoint: Annotated[Path, typer.Argument(help="Research-code Lightning checkpoint (LitBRITS, .ckpt).")],
    out: Annotated[Path, typer.Option("--out", help="Model artifact to write (.safetensors).")],
    level: LevelOption,
    classes: Annotated[str | None, typer.Option(
        help="Class names in the output layer's order, comma-separated; default: the checkpoint's "
             "hyper_parameters idx_to_class.")] = None,
    ancillary: Annotated[str | None, typer.Option(
        help="The model's ancillary variables in its input order, comma-separated; default: the research "
             "default longitude,latitude,altitude,slope,evapotranspiration.")] = None,
    research_backward_deltas: Annotated[bool, typer.Option(
        help="Feed the backward pass the forward-order deltas, as the research loaders did when the model "
             "learnt (--no-research-backward-deltas: each direction its own).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Turn a research-code checkpoint into a model artifact (read without unpickling code)."""
    from msmtu_batch.model.artifact import save_artifact
    from msmtu_batch.model.research_checkpoint import import_checkpoint

    with _user_errors():
        if out.exists() and not overwrite:
            raise MsmtuError(f"{out} exists; pass --overwrite to replace it")
        split = lambda text: [n.strip() for n in text.split(",") if n.strip()] if text is not None else None  # noqa: E731
        artifact = import_checkpoint(checkpoint, level=level, classes=split(classes), ancillary=split(ancillary),
                                     research_backward_deltas=research_backward_deltas)
        save_artifact(artifact, out)
        print(f"wrote {out}: {artifact.config.n_classes} classes ({', '.join(artifact.classes)}), ancillary "
              f"{', '.join(artifact.ancillary_names) or 'none'}, the research normalisation constants")


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option("--model", help="Model artifact (.safetensors).")],
    level: LevelOption,
    out: Annotated[Path, typer.Option("--out", help="Report folder (metrics.json, report.md, plots).")],
    msmtu: MsmtuOption = None,
    cube: CubeOption = None,
    reference: ReferenceOption = None,
    split: Annotated[str, typer.Option(help="Partition to score: " + ", ".join(PARTITIONS) + ".")] = "test",
    baselines: Annotated[bool, typer.Option(help="Also score the train-mean, FCLS and random-forest "
                                                 "baselines.")] = True,
    trees: Annotated[int, typer.Option(help="Trees of the random-forest baselines.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the baselines and hidden values.")] = 0,
    ancillary_units: AncillaryUnitsOption = None,
) -> None:
    """Score a model on a partition against classical baselines; write a Markdown report."""
    from msmtu_batch.evaluation.evaluate import comparison_table, evaluate
    from msmtu_batch.model.artifact import load_artifact

    with _user_errors():
        if split not in PARTITIONS:
            raise MsmtuError(f"--split {split}: expected one of {', '.join(PARTITIONS)}")
        artifact = load_artifact(model)
        if artifact.level != level:
            raise MsmtuError(f"{model}: model was trained for level '{artifact.level}', --level is '{level}'")
        pixels, source = _read_pixels(msmtu, cube, reference, level, artifact.ancillary_names,
                                      _ancillary_units(ancillary_units))
        report = evaluate(artifact, pixels, out, split=split, model_path=model, baselines=baselines,
                          trees=trees, seed=seed, source=source)
        print(comparison_table(report["methods"]))
        imp = report["imputation"]
        print(f"imputation MAE on {imp['hidden_values']} hidden values: BRITS {imp['brits_mae']:.5f}, "
              f"linear interpolation {imp['linear_interpolation_mae']:.5f}")
        print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


@app.command("ablation")
def ablation_command(
    level: LevelOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for models, reports and ablation.md.")],
    msmtu: MsmtuOption = None,
    cube: CubeOption = None,
    reference: ReferenceOption = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs per variant (default 60).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    trees: Annotated[int, typer.Option(help="Trees of the random-forest baselines.")] = 100,
    config: Annotated[Path | None, typer.Option(help="YAML file with a 'train' section.")] = None,
    ancillary_units: AncillaryUnitsOption = None,
) -> None:
    """Train and evaluate BRITS with no, geo-topographic, and all ancillary data, plus baselines."""
    from msmtu_batch.evaluation.evaluate import comparison_table, run_ablation

    with _user_errors():
        cfg = _train_config(config, epochs=epochs, seed=seed)
        cfg = cfg.model_copy(update={"ancillary_units": _ancillary_units(ancillary_units, cfg.ancillary_units)})
        pixels, source = _read_pixels(msmtu, cube, reference, level, ANCILLARY_NAMES, cfg.ancillary_units)
        with _epoch_progress(cfg.epochs) as on_epoch:
            summary = run_ablation(pixels, level, cfg, out, trees=trees, source=source,
                                   on_epoch=lambda variant, r: on_epoch(r, f"brits_{variant}"))
        print(comparison_table(summary["methods"]))
        print(f"wrote {out / 'ablation.md'}")


def _chunk_progress(description: str):
    """A progress bar over finished chunks on a terminal; progress lines in batch logs."""
    from msmtu_batch.runtime.reporting import Reporter

    return Reporter(console).progress(description)


def _pairs_option(values: list[str] | None, option: str, example: str) -> dict[str, str]:
    """NAME=VALUE items of a repeatable option, as a mapping."""
    pairs = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise MsmtuError(f"{option} {item}: expected {example}")
        pairs[name] = value
    return pairs


@app.command("ingest")
def ingest_command(
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="MOD09A1 (Terra) or MYD09A1 (Aqua) C6.1 granules (.hdf), GeoTIFF exports (.tif), or folders of them.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Input cube (Zarr) to write; with several years, a path "
                                                     "with {year} (cubes/{year}.zarr).")] = ...,
    manifest: Annotated[Path | None, typer.Option(help="CSV with columns path,date for GeoTIFF exports.")] = None,
    sensor: Annotated[str | None, typer.Option(
        help="The sensor the granules must be of: MOD09A1, MYD09A1, or MOD09A1+MYD09A1 (Terra and Aqua granules "
             "composited together). Default: the one that reads the granules given.")] = None,
    year: Annotated[list[int] | None, typer.Option(
        help="Year of the cube (default: the inputs' year); repeat it for several years at once on one cluster, "
             "each from the composites that reach into it.")] = None,
    region: Annotated[Path | None, typer.Option(help="Boundary (GeoJSON, GeoPackage...): pixels outside are fill; "
                                                     "the grid is cut to its bounding box.")] = None,
    crs: Annotated[str | None, typer.Option(help="Target CRS, e.g. EPSG:25830 (default: native sinusoidal).")] = None,
    resolution: Annotated[float | None, typer.Option(help="Target pixel size in CRS units, e.g. 460.")] = None,
    resampling: Annotated[str | None, typer.Option(
        help="Reflectance resampling onto a target CRS: nearest (default), average, bilinear, cubic.")] = None,
    composite: Annotated[str | None, typer.Option(
        help="Monthly composite of clear observations: median (default), mean, max_ndvi.")] = None,
    dem: Annotated[Path | None, typer.Option(help="DEM raster (any CRS): altitude and slope.")] = None,
    climate: Annotated[list[str] | None, typer.Option(
        help="NAME=RASTER, repeatable; NAME in precipitation, evapotranspiration, temperature_ave, "
             "temperature_max, temperature_min.")] = None,
    climate_units: Annotated[list[str] | None, typer.Option(
        help="NAME=UNITS, repeatable: the units of a climate raster (CF/udunits, e.g. precipitation='mm month-1', "
             "temperature_ave=K), converted to the cube's (mm year-1, degC). Default: the raster's own unit "
             "metadata, else the cube's units.")] = None,
    model: Annotated[Path | None, typer.Option(help="Model artifact the cube is for: refuse early when "
                                                    "the sources lack ancillary variables it needs.")] = None,
    chunk: Annotated[int | None, typer.Option(help="Spatial chunk of the cube and of the tasks (default 256).")]
        = None,
    band_quality: Annotated[bool | None, typer.Option(
        "--band-quality/--no-band-quality", help="Also reject a band's value that sur_refl_qc_500m flags as not of "
        "the highest quality (MODIS granules; bit layout in docs/ingest.md).")] = None,
    zarr_format: ZarrFormatOption = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML workflow with an 'ingest' section (keys as the flags); flags override it.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address or cluster spec (YAML); default: a LocalCluster on 127.0.0.1.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cube at --out.")] = False,
) -> None:
    """Build an input cube: monthly QA-filtered composites on a grid and region, plus ancillary data."""
    from msmtu_batch.orchestration.ingest import IngestConfig, ingest, ingest_years

    with _user_errors():
        settings = _with_overrides(_config_section(config, "ingest"), dict(
            inputs=inputs or None, manifest=manifest, sensor=sensor, year=year[0] if year and len(year) == 1 else None,
            region=region, crs=crs, resolution=resolution,
            resampling=resampling, composite=composite, dem=dem,
            climate=_pairs_option(climate, "--climate", "NAME=RASTER, e.g. precipitation=pre.tif") or None,
            climate_units=_pairs_option(climate_units, "--climate-units", "NAME=UNITS, e.g. precipitation='mm "
                                        "month-1'") or None,
            chunk=chunk, zarr_format=zarr_format, band_quality=band_quality))
        if year and len(year) > 1:
            summaries = ingest_years(IngestConfig(**settings), year, out, model=model, scheduler=scheduler,
                                     overwrite=overwrite, progress=lambda y: _chunk_progress(f"{y}: dates, chunks"))
        else:
            summaries = [ingest(IngestConfig(**settings), out, model=model, scheduler=scheduler, overwrite=overwrite,
                                progress=_chunk_progress("ingesting: dates, chunks"))]
        for summary in summaries:
            print(f"wrote {summary.out}: {summary.height} x {summary.width} pixels, {summary.observations} dates "
                  f"composited into 12 months, {summary.observed_pixels:,} pixels observed, ancillary "
                  f"{', '.join(summary.ancillary)}; {summary.chunks} chunks in {summary.seconds:.1f} s")


@app.command("run")
def run_command(
    cube: Annotated[Path, typer.Option("--cube", help="Input cube (Zarr).")],
    model: Annotated[Path, typer.Option("--model", help="Model artifact (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Output cube (Zarr) to write.")],
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address (tcp://host:port) or cluster spec (YAML); default: this machine's "
             "cores as threads of this process (a spec with 'processes: true' for worker processes).")] = None,
    chunk: Annotated[int, typer.Option(help="Spatial chunk side in pixels (all months and bands).")] = 256,
    min_months: Annotated[int, typer.Option(help="Fewer observed months give NaN abundances and a flag.")] = 3,
    out_of_distribution: Annotated[OutOfDistribution, typer.Option(
        help="A chunk whose inputs are unlike the model's training data (a band's chunk mean beyond 4, an "
             "ancillary variable's beyond 6 training standard deviations): stop with it named, or flag its "
             "pixels (quality_flag 2) and go on.")] = OutOfDistribution.stop,
    imputed: Annotated[bool, typer.Option(help="Also write imputed_reflectance(time, band, y, x).")] = False,
    expected_error: Annotated[bool, typer.Option(
        help="Write expected_error(y, x), each pixel's expected abundance RMSE, where the model has an error "
             "head (5-11 % of a run's pixels/s on AVX512 CPUs, about 20 % on an AVX2-only one).")] = True,
    precision: Annotated[Precision, typer.Option(
        help="The model's matrix products: fp32; bf16 (the CPU engine's bf16 GEMMs, 1.5x on CPUs with "
             "AVX512-BF16 or AMX; autocast on a GPU); fp16 (autocast, GPUs). The map changes a little: "
             "benchmarks/NOTES.md.")]
        = Precision.fp32,
    zarr_format: ZarrFormatOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an output made from another model, input or "
                                                 "settings.")] = False,
    cog: Annotated[Path | None, typer.Option(help="Also write Cloud-Optimized GeoTIFFs to this folder.")] = None,
    performance_report: Annotated[Path | None, typer.Option(help="Write Dask's HTML performance report.")] = None,
    allow_other_sensor: Annotated[bool, typer.Option(
        help="Map a cube of a sensor other than the model's training data (e.g. MYD09A1 with a MOD09A1 model; the "
             "bands must be the same).")] = False,
) -> None:
    """Unmix an input cube with a model into an output cube; resumable and idempotent."""
    from msmtu_batch.orchestration.pipeline import RunConfig, run

    def announce(client) -> None:
        if not client.scheduler.address.startswith("inproc://"):  # threads of this process: no dashboard
            console.print(f"Dask dashboard: {client.dashboard_link}", highlight=False)

    with _user_errors():
        summary = run(cube, model, out, config=RunConfig(chunk=chunk, min_months=min_months, imputed=imputed,
                                                              expected_error=expected_error,
                                                              out_of_distribution=out_of_distribution.value,
                                                              zarr_format=zarr_format or 3,
                                                              precision=precision.value),
                      scheduler=scheduler, overwrite=overwrite, cog_dir=cog, performance_report=performance_report,
                      progress=_chunk_progress("unmixing chunks"), on_client=announce,
                      allow_other_sensor=allow_other_sensor)
        flagged = f"; WARNING: {summary.flagged_line}" if summary.flagged_pixels else ""
        if summary.already_complete:
            print(f"{out} is already complete for this model, input and settings; nothing to do{flagged}")
            return
        print(f"wrote {out}: {summary.pixels:,} pixels, {summary.valid_pixels:,} estimated, "
              f"{summary.computed_chunks} of {summary.chunks} chunks computed in {summary.seconds:.1f} s "
              f"({summary.pixels_per_second:,.0f} pixels/s)" + (f"; COGs in {cog}" if cog else "") + flagged)


@app.command("catalog")
def catalog_command(
    archive: Annotated[Path, typer.Argument(help="Archive folder: a workflow's output (its latest version), a "
                                                 "version folder (YEAR/abundance.zarr) or a folder of stores.")],
    collection_id: Annotated[str | None, typer.Option(help="STAC Collection id (default msmtu-<folder name>).")]
        = None,
) -> None:
    """Write STAC metadata for an archive: one Item per year (COGs, Zarr, styles, run record) in a Collection."""
    from msmtu_batch.products.catalog import write_catalog

    with _user_errors():
        path = write_catalog(archive, collection_id)
        print(f"wrote {path}")


def _years_option(years: str | None) -> list[int] | None:
    if not years:
        return None
    try:
        return [int(y) for y in years.split(",") if y.strip()]
    except ValueError:
        raise MsmtuError(f"--years {years}: expected years separated by commas, e.g. 2013,2014") from None


@app.command("workflow")
def workflow_command(
    definition: Annotated[Path, typer.Argument(help="Workflow definition (YAML), e.g. workflows/andalusia.yaml.")],
    years: Annotated[str | None, typer.Option(help="Only these years of the definition, e.g. 2013,2014.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would run and why; compute and write nothing.")] = False,
    log_file: Annotated[Path | None, typer.Option(help="Also append every line, time-stamped, to this file.")]
        = None,
) -> None:
    """Produce every year of a definition: ingest -> run -> COG export, each stage only when its
    output is out of date with its inputs by content. Exit status: 0 all years done, 3 some
    years failed (the others finished), 2 a bad definition. A run record (JSON) is written
    under OUTPUT/records/."""
    from msmtu_batch.orchestration.workflow import run_workflow
    from msmtu_batch.runtime.reporting import Reporter

    with _user_errors(), Reporter(console, log_file) as reporter:
        status, record = run_workflow(definition, reporter, _years_option(years), dry_run)
        done = [y for y, r in record["years"].items() if r["status"] != "failed"]
        summary = (f"workflow {'dry run' if dry_run else 'finished'} in {record['seconds']:.1f} s: "
                   f"{len(done)} year(s) {'checked' if dry_run else 'done'}")
        if record["failed_years"]:
            summary += f", {len(record['failed_years'])} failed ({', '.join(map(str, record['failed_years']))})"
        if record.get("record"):
            summary += f"; record {record['record']}"
        reporter.say(summary)
    raise typer.Exit(status)


@app.command("cluster-script")
def cluster_script_command(
    spec: Annotated[str, typer.Argument(help="Cluster spec (YAML) with cluster: slurm or pbs.")],
) -> None:
    """Print the job script a SLURM or PBS cluster spec submits for its workers (dask-jobqueue's
    job_script()), to check before a run. The scheduler address in it changes with every run."""
    from msmtu_batch.runtime.clusters import PbsSpec, SlurmSpec, job_script, load_cluster_spec

    with _user_errors():
        cluster = load_cluster_spec(spec if spec.endswith((".yaml", ".yml")) else spec + ".yaml")
        if not isinstance(cluster, SlurmSpec | PbsSpec):
            raise MsmtuError(f"{spec}: cluster '{cluster.cluster}' submits no jobs; expected slurm or pbs")
        print(job_script(cluster), end="")


@app.command("bench")
def bench_command(
    out: Annotated[Path, typer.Option(help="Working folder (replaced).")] = Path("bench-output"),
    height: Annotated[int, typer.Option(help="Rows of the simulated region.")] = 512,
    width: Annotated[int, typer.Option(help="Columns of the simulated region.")] = 512,
    research_pixels: Annotated[int, typer.Option(help="Pixels run the research-code way.")] = 2000,
    chunk: Annotated[int, typer.Option(help="Spatial chunk of the pipeline.")] = 256,
    memory_sizes: Annotated[list[int] | None, typer.Option(
        "--memory-size", help="Also run the pipeline on a square region of this side and record each worker's "
        "peak memory (repeat the option, e.g. 512 and 2048).")] = None,
    precision_epochs: Annotated[int, typer.Option(
        help="Training epochs of the models the precision table is measured with (0: no table).")] = 10,
    precision_size: Annotated[tuple[int, int], typer.Option(
        help="Rows and columns of the precision table's two simulated regions (seeds 0 and 1).")] = (200, 300),
    model_pixels: Annotated[int, typer.Option(
        help="Pixels each model-only rate is measured on (the region's, repeated).", min=1)] = 65_536,
) -> None:
    """Pixels/s end to end, model only, and the research-code way, against the FLOP ceiling;
    the pipeline's stages; the map with reduced precision against fp32."""
    from msmtu_batch.bench import run_bench

    with _user_errors():
        run_bench(out, height, width, research_pixels, chunk, tuple(memory_sizes or ()),
                  precision_epochs=precision_epochs, precision_size=precision_size, model_pixels=model_pixels)


HUGE_PAGES_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"


def numpy_without_huge_pages() -> None:
    """NumPy asks the kernel for transparent huge pages for arrays of 4 MB and more. Where free
    memory is fragmented (the page cache of a run's own writes), each such page fault waits
    while the kernel compacts memory: on the development VM, 2-3.5 s of a 512 x 512 run's
    20 CPU seconds (benchmarks/NOTES.md, 2026-12-03, night). Off for this command's process
    and the worker processes and batch jobs it starts (they inherit the variable), unless the
    environment already says what NumPy should do."""
    if HUGE_PAGES_VARIABLE in os.environ:
        return  # the operator's choice, which NumPy read at import
    os.environ[HUGE_PAGES_VARIABLE] = "0"
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # NumPy 2 / 1.26
    set_huge_pages = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if set_huge_pages is not None:  # NumPy read the variable at import: tell it again
        set_huge_pages(False)


def run() -> None:
    """Console-script entry point."""
    numpy_without_huge_pages()
    signal.signal(signal.SIGTERM, _raise_terminated)
    warnings.showwarning = _show_warning
    app(prog_name="msmtu-batch")


if __name__ == "__main__":
    sys.exit(run())
