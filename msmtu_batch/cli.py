"""Command line: ``msmtu-batch simulate | validate | demo`` (DESIGN.md section 4b)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import track

from msmtu_batch import __version__
from msmtu_batch.cube import ANCILLARY_NAMES, GEOTOPO_NAMES, open_input_cube
from msmtu_batch.errors import MsmtuError
from msmtu_batch.simulate import SimulationConfig, describe_region, simulate

app = typer.Typer(help="LULC abundance mapping from MODIS monthly time series with BRITS.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


class AncillaryChoice(StrEnum):
    none = "none"
    geotopo = "geotopo"
    all = "all"

    @property
    def names(self) -> tuple[str, ...]:
        return {"none": (), "geotopo": GEOTOPO_NAMES, "all": ANCILLARY_NAMES}[self.value]


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


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """msmtu-batch command line."""


def _simulation_config(config: Path | None, **overrides: object) -> SimulationConfig:
    values: dict = {}
    if config is not None:
        if not config.is_file():
            raise MsmtuError(f"{config}: configuration file not found")
        loaded = yaml.safe_load(config.read_text()) or {}
        values = loaded.get("simulate", loaded) if isinstance(loaded, dict) else None
        if not isinstance(values, dict):
            raise MsmtuError(f"{config}: expected a mapping of simulation settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SimulationConfig(**values)


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
        cfg = _simulation_config(config, height=height, width=width, seed=seed, year=year,
                                 msmtu_pixels=msmtu_pixels, chunk=chunk)
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
    """Check an input cube against the data contract (DESIGN.md section 4)."""
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
) -> None:
    """End-to-end demo: simulate a region, validate it and print a summary."""
    with _user_errors():
        cfg = SimulationConfig(height=height, width=width, seed=seed)
        seconds = _run_simulation(cfg, out, overwrite=True)
        open_input_cube(out / "cube.zarr")
        print(f"simulated and validated {out / 'cube.zarr'} in {seconds:.1f} s")
        print(describe_region(out))


def run() -> None:
    """Console-script entry point."""
    app(prog_name="msmtu-batch")


if __name__ == "__main__":
    sys.exit(run())
