"""``msmtu-batch workflow``: stages skipped by content, reruns that compute only what changed,
model versions and the ``latest`` pointer, failed years, dry runs, run records; and the
production as a SLURM batch job (deploy/slurm/), including the self-resubmitting schedule."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import xarray as xr
import yaml
from rasterio.transform import from_origin
from rich.console import Console

from msmtu_batch.inputs.cube import CLIMATIC_NAMES
from msmtu_batch.orchestration.workflow import load_workflow, run_workflow
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.runtime.reporting import Reporter
from tests.conftest import train_small_model, zarr_files
from tests.test_faults import cli, one_line_error
from tests.test_ingest import geojson, tile_values, write_raster, write_year

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def starts(year: int) -> list[dt.date]:
    """12 of the year's 46 composites, one about every month (enough for every month)."""
    return [dt.date(year, 1, 1) + dt.timedelta(days=8 * i) for i in range(0, 46, 4)]


def year_values(year: int):
    return lambda h: tile_values(h) + np.int16(10 * (year - 2013))


def write_granules(downloads: Path, year: int) -> Path:
    return write_year(downloads / "MOD09A1" / str(year), tiles=((17, 5),), starts=starts(year),
                      values=year_values(year))


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """Granules of 2013-2015 (tile h17v05), a DEM, climate rasters and a boundary."""
    folder = tmp_path_factory.mktemp("downloads")
    for year in (2013, 2014, 2015):
        write_granules(folder, year)
    transform = from_origin(-10.0, 42.0, 0.05, 0.05)
    write_raster(folder / "dem.tif", np.linspace(0, 900, 200 * 300, dtype=np.float32).reshape(200, 300),
                 "EPSG:4326", transform)
    for i, name in enumerate(CLIMATIC_NAMES):
        write_raster(folder / f"{name}.tif", np.full((200, 300), 10.0 * (i + 1), np.float32), "EPSG:4326", transform)
    geojson(folder / "region.geojson", -4.0, 37.0, -0.5, 39.5)
    return folder


@pytest.fixture(scope="module")
def scheduler(local_scheduler) -> dict:
    """The session's LocalCluster, given to the workflows as a `cluster: address` spec: warm
    workers, no start per run."""
    return {"cluster": "address", "address": local_scheduler}


@pytest.fixture(scope="module")
def models(region, small_model, tmp_path_factory) -> tuple[Path, Path]:
    """The session's model, and a second one (another seed): a new model version."""
    return small_model, train_small_model(region, tmp_path_factory.mktemp("models") / "next.safetensors", seed=1)


def definition(downloads: Path, output: Path, model: Path, years=(2013, 2014), cluster=None, **extra) -> dict:
    return {"workflow": {
        "years": list(years), "output": str(output), "model": str(model), "cluster": cluster,
        "ingest": {"inputs": [str(downloads / "MOD09A1" / "{year}" / "*.hdf")],
                   "region": str(downloads / "region.geojson"), "crs": "EPSG:25830", "resolution": 20000,
                   "dem": str(downloads / "dem.tif"),
                   "climate": {name: str(downloads / f"{name}.tif") for name in CLIMATIC_NAMES}, "chunk": 8},
        # the synthetic granules are unlike the simulated region the model learnt: map them flagged
        "run": {"chunk": 8, "out_of_distribution": "flag"},
        **extra}}


def write_definition(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def workflow(path: Path, years=None, dry_run=False, log_file=None) -> tuple[int, dict, str]:
    """Run a workflow in this process, its lines captured as a batch log would have them."""
    lines = []
    with Reporter(Console(stderr=True), log_file, interactive=False) as reporter:
        say = reporter.say
        reporter.say = lambda line: (lines.append(line), say(line))  # what the command prints
        status, record = run_workflow(path, reporter, years, dry_run)
    return status, record, "\n".join(lines)


def stages(record: dict) -> dict[str, dict[str, str]]:
    """year -> stage -> status."""
    return {year: {s["stage"]: s["status"] for s in r["stages"]} for year, r in record["years"].items()}


ALL_RAN = {"ingest": "ran", "run": "ran", "export": "ran"}
ALL_SKIPPED = {"ingest": "up to date", "run": "up to date", "export": "up to date"}


def test_reruns_compute_only_what_changed(downloads, models, scheduler, tmp_path):
    model, next_model = models
    output = tmp_path / "production"
    path = write_definition(tmp_path / "andalusia.yaml", definition(downloads, output, model, cluster=scheduler))

    status, first, log = workflow(path)
    assert status == 0, log
    assert stages(first) == {"2013": ALL_RAN, "2014": ALL_RAN}
    version = output / first["model"]["id"]
    assert first["model"]["id"].startswith("level2-") and os.readlink(output / "latest") == first["model"]["id"]
    for year in (2013, 2014):
        result = xr.open_zarr(version / str(year) / "abundance.zarr", consolidated=False)
        assert np.isfinite(result["abundance"].values).all(axis=0).sum() > 20
        with rasterio.open(version / str(year) / "cog" / f"abundance_{year}.tif") as cog:
            assert cog.count == result.sizes["lulc_class"]
    catalog = pystac.read_file(first["catalog"])  # the version's STAC, read through the `latest` link too
    assert Path(first["catalog"]) == version / "collection.json" and (output / "latest" / "collection.json").is_file()
    assert sorted(item.id for item in catalog.get_items()) == [f"msmtu-{version.name}-{y}" for y in (2013, 2014)]
    assert Path(first["record"]).parent == output / "records"
    assert json.loads(Path(first["record"]).read_text()) == json.loads(json.dumps(first, default=str))
    # each file read once (a shared raster may be read by both years at once)
    assert first["cluster"]["started"] and 2 * 12 + 7 <= first["source_files_hashed"] <= 2 * 12 + 2 * 7
    run_stage = first["years"]["2013"]["stages"][1]
    assert run_stage["details"]["pixels_per_second"] > 0 and run_stage["details"]["worker_peak_mib"] > 50
    # the synthetic granules are mapped flagged: the record, the log, the run record and the STAC
    # Item say how much (every estimated pixel here), so a flagged map never reads as a success
    flags = xr.open_zarr(version / "2013" / "abundance.zarr", consolidated=False)["quality_flag"].values
    flagged, flagged_chunks = int((flags == 2).sum()), run_stage["details"]["flagged_chunks"]
    assert run_stage["details"]["flagged_pixels"] == flagged == run_stage["details"]["valid_pixels"] > 0
    assert 0 < flagged_chunks <= run_stage["details"]["chunks"]
    warning = (f"{flagged:,} pixels in {flagged_chunks} of {run_stage['details']['chunks']} chunks mapped from "
               "inputs unlike the training data (quality_flag 2)")
    assert run_stage["details"]["warning"] == warning
    assert re.search(rf"2013: run done in [\d.]+ s, [\d,]+ pixels/s; WARNING: {re.escape(warning)}", log), log
    manifest = json.loads((version / "2013" / "run-record.json").read_text())["manifest"]
    assert (manifest["flagged_pixels"], manifest["flagged_chunks"]) == (flagged, flagged_chunks)
    item = next(i for i in catalog.get_items() if i.id.endswith("2013"))
    assert (item.properties["msmtu:flagged_pixels"], item.properties["msmtu:flagged_chunks"],
            item.properties["msmtu:valid_pixels"]) == (flagged, flagged_chunks, flagged)
    assert {f["path"] for f in first["years"]["2014"]["inputs"]} >= {
        str(p) for p in (downloads / "MOD09A1" / "2014").glob("*.hdf")}
    assert "2013: run runs: its input cube is rebuilt" in log

    # nothing new: nothing computed, no cluster, no source file read again
    outputs = {year: zarr_files(version / str(year) / "abundance.zarr") for year in (2013, 2014)}
    status, second, log = workflow(path)
    assert status == 0 and stages(second) == {"2013": ALL_SKIPPED, "2014": ALL_SKIPPED}
    assert not second["cluster"]["started"] and second["source_files_hashed"] == 0
    assert second["seconds"] < first["seconds"] / 2

    # a year added: only it is computed
    path = write_definition(path, definition(downloads, output, model, years=(2013, 2014, 2015), cluster=scheduler))
    status, third, _ = workflow(path)
    assert status == 0 and stages(third) == {"2013": ALL_SKIPPED, "2014": ALL_SKIPPED, "2015": ALL_RAN}

    # a granule of 2014 reprocessed with other values (same name): 2014 reruns, the others do not;
    # a granule touched without a change of content reruns nothing
    touched = sorted((downloads / "MOD09A1" / "2013").glob("*.hdf"))[0]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    changed = sorted((downloads / "MOD09A1" / "2014").glob("*.hdf"))[3]
    original = changed.read_bytes()
    write_year(changed.parent, tiles=((17, 5),), starts=[starts(2014)[3]], values=year_values(2000))
    assert changed.read_bytes() != original
    status, fourth, log = workflow(path)
    assert status == 0 and stages(fourth) == {"2013": ALL_SKIPPED, "2014": ALL_RAN, "2015": ALL_SKIPPED}
    assert f"2014: ingest runs: 1 source file(s) changed, added or removed (first: {changed.name})" in log
    assert zarr_files(version / "2013" / "abundance.zarr") == outputs[2013]
    assert zarr_files(version / "2014" / "abundance.zarr") != outputs[2014]

    # a new model: every year recomputed into a new version, the old one kept; latest moves once
    # every year of the definition is in the new version
    path = write_definition(path, definition(downloads, output, next_model, years=(2013, 2014, 2015),
                                                cluster=scheduler))
    status, fifth, log = workflow(path, years=[2013, 2015])
    assert status == 0
    assert stages(fifth) == {year: {"ingest": "up to date", "run": "ran", "export": "ran"} for year in ("2013", "2015")}
    assert "2013: run runs: no output yet" in log
    assert fifth["latest"] is None and os.readlink(output / "latest") == first["model"]["id"]
    status, sixth, _ = workflow(path)
    assert stages(sixth) == {"2013": ALL_SKIPPED, "2014": {"ingest": "up to date", "run": "ran", "export": "ran"},
                             "2015": ALL_SKIPPED}
    assert os.readlink(output / "latest") == sixth["model"]["id"] != first["model"]["id"]
    assert zarr_files(version / "2013" / "abundance.zarr") == outputs[2013]  # the previous version, intact
    assert xr.open_zarr(output / "latest" / "2013" / "abundance.zarr", consolidated=False).attrs["model_hash"] == \
        sixth["model"]["hash"]


def test_dry_run_says_what_would_run_and_why_and_writes_nothing(downloads, models, scheduler, tmp_path):
    output = tmp_path / "production"
    path = write_definition(tmp_path / "w.yaml", definition(downloads, output, models[0], cluster=scheduler))
    status, record, log = workflow(path, dry_run=True)
    assert status == 0 and not output.exists()
    assert stages(record) == {year: {"ingest": "would run", "run": "would run", "export": "would run"}
                              for year in ("2013", "2014")}
    assert "2013: ingest would run: no cube yet" in log and "2014: run would run: its input cube is rebuilt" in log
    assert "2014: export would run: its output is recomputed" in log


def test_a_failed_year_is_reported_and_the_others_finish(downloads, models, scheduler, tmp_path):
    output = tmp_path / "production"
    values = definition(downloads, output, models[0], years=(2013, 2016), cluster=scheduler, cog=False)
    path = write_definition(tmp_path / "w.yaml", values)
    status, record, lines = workflow(path, log_file=tmp_path / "log.txt")
    assert status == 3, lines
    pattern = downloads / "MOD09A1" / "2016" / "*.hdf"
    assert f"2016: ingest failed: year 2016: inputs pattern {pattern} matches no file" in lines
    assert record == json.loads(next((output / "records").iterdir()).read_text())
    assert record["failed_years"] == [2016] and record["exit_status"] == 3 and record["latest"] is None
    assert stages(record)["2013"] == {"ingest": "ran", "run": "ran"}
    assert not (output / "latest").exists()  # the version is incomplete: latest is not moved
    log = (tmp_path / "log.txt").read_text().splitlines()
    # batch log: time-stamped lines, progress in steps, no bar
    assert all(len(line) > 21 and line[20] == " " and line[:4] == str(dt.date.today().year) for line in log)
    assert any(line.endswith("s") and "2013 run: " in line and "(100 %)" in line for line in log), log


@pytest.mark.parametrize("change, message", [
    ({"years": []}, "invalid workflow definition: years: List should have at least 1 item"),
    ({"ingest": {"inputs": ["x"], "resolutoin": 20}}, "invalid workflow definition: resolutoin: Extra inputs are "
                                                      "not permitted"),
    ({"cluster": {"cluster": "slurm", "cores": 0}}, "cluster: invalid cluster spec: cores: Input should be greater "
                                                    "than or equal to 1"),
    ({"concurrent_year": 2}, "invalid workflow definition: concurrent_year: Extra inputs are not permitted"),
])
def test_bad_definitions_are_refused_in_one_line(downloads, models, tmp_path, change, message):
    values = definition(downloads, tmp_path / "out", models[0])
    values["workflow"].update(change)
    path = write_definition(tmp_path / "w.yaml", values)
    with pytest.raises(MsmtuError) as caught:
        load_workflow(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_bad_definition_exits_2_before_any_work(downloads, models, tmp_path):
    values = definition(downloads, tmp_path / "out", models[0])
    path = write_definition(tmp_path / "w.yaml", values)
    assert one_line_error(cli("workflow", path, "--years", "2013,2019")) == (
        f"{path}: --years 2019 not among the definition's years (2013, 2014)")
    assert not (tmp_path / "out").exists()
    # a year whose inputs are missing: exit 3, the summary names it
    values["workflow"]["years"] = [2016]
    result = cli("workflow", write_definition(path, values))
    assert result.returncode == 3, result.stderr
    assert "workflow finished in " in result.stdout and "0 year(s) done, 1 failed (2016)" in result.stdout


def test_the_shipped_definitions_are_valid():
    from msmtu_batch.orchestration.workflow import WorkflowDefinition, year_ingest_config
    from msmtu_batch.runtime.clusters import cluster_spec_from

    values = yaml.safe_load((ROOT / "workflows" / "andalusia.yaml").read_text())["workflow"]
    production = WorkflowDefinition(**values)
    config = year_ingest_config(production, 2014, expand=False)
    assert config.year == 2014 and "2014" in str(config.inputs[0]) and config.crs == "EPSG:25830"
    for name in ("cpu.yaml", "gpu.yaml"):
        spec = cluster_spec_from(yaml.safe_load((ROOT / "deploy" / "slurm" / name).read_text()), name)
        assert spec.cluster == "slurm" and spec.gpu == (name == "gpu.yaml")


# --- the production as SLURM batch jobs ------------------------------------------------------

def sbatch(slurm, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=600,
                          env=os.environ | slurm.env | env, check=True)
    return done.stdout.strip().split(";")[0]


def wait_for_jobs(slurm, name: str, count: int, seconds: float) -> list[dict[str, str]]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        jobs = [job for job in slurm.jobs() if job.get("Name") == name]
        if len(jobs) >= count:
            return jobs
        time.sleep(1)
    raise AssertionError(f"{count} job(s) {name} did not finish within {seconds} s: {slurm.jobs()}")


def test_workflow_as_a_self_resubmitting_batch_job_with_slurm_workers(slurm, downloads, models, tmp_path):
    """deploy/slurm/rerun.sbatch at a short interval: the driver is a batch job whose workers
    are SLURM jobs too; it submits itself again, and the second run starts by itself and
    finds nothing to do."""
    output = tmp_path / "production"
    spec = {"cluster": "slurm", "queue": "batch", "cores": 1, "memory": "2GB", "walltime": "00:10:00",
            "jobs": 1, "shared_directory": str(tmp_path / "tls"), "worker_start_timeout": 120}
    path = write_definition(tmp_path / "w.yaml", definition(downloads, output, models[0], years=(2013,),
                                                             cluster=spec, cog=False))
    before = {j["JobId"] for j in slurm.jobs()}  # by id: scontrol lists the jobs in no fixed order
    # --chdir: the resubmitted job's default output file lands there too
    first = sbatch(slurm, "--chdir", str(tmp_path), "--output", str(tmp_path / "rerun-%j.out"),
                   str(ROOT / "deploy/slurm/rerun.sbatch"),
                   env={"MSMTU_WORKFLOW": str(path), "MSMTU_BATCH": str(BIN / "msmtu-batch"), "MSMTU_BEGIN": "now+2",
                        "MSMTU_RESUBMIT_TIMES": "1", "MSMTU_LOG": str(tmp_path / "workflow.log")})
    drivers = wait_for_jobs(slurm, "msmtu-rerun", 2, 400)
    outputs = [p.read_text() for p in tmp_path.glob("*.out")]
    assert [(j["JobState"], j["ExitCode"]) for j in drivers] == [("COMPLETED", "0:0")] * 2, outputs
    assert drivers[0]["JobId"] == first and drivers[1]["StartTime"] >= drivers[0]["EndTime"]
    workers = [j for j in slurm.jobs() if j["JobId"] not in before and j["Name"] == "msmtu-worker"]
    # the first run's one worker job ran inside the driver's time; the second run needed none
    assert len(workers) == 1, slurm.jobs()
    assert drivers[0]["StartTime"] <= workers[0]["StartTime"] <= workers[0]["EndTime"] <= drivers[0]["EndTime"]
    first_record, second_record = (json.loads(r.read_text()) for r in sorted((output / "records").iterdir()))
    assert first_record["slurm_job_id"] == first and stages(first_record) == {"2013": {"ingest": "ran", "run": "ran"}}
    assert first_record["cluster"]["started"] and not second_record["cluster"]["started"]
    assert stages(second_record) == {"2013": {"ingest": "up to date", "run": "up to date"}}
    assert second_record["slurm_job_id"] == drivers[1]["JobId"]
    assert (tmp_path / "workflow.log").read_text().count("workflow finished") == 2
    assert "msmtu-rerun" not in subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True,
                                               env=os.environ | slurm.env).stdout  # the chain ended
