"""The command line, run as a user runs it: its output and exit status. In this process
(typer's runner: the same error handling as the installed command, without the 8 s of
imports a new interpreter costs on the CI machine), except where the process is the point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from msmtu_batch.inputs.cube import open_input_cube
from msmtu_batch.model.amx import amx_available
from tests.test_faults import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_module_runs_as_the_command():
    result = subprocess.run([sys.executable, "-m", "msmtu_batch.cli", "--help"], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "catalog" in result.stdout


def test_the_command_turns_numpys_huge_pages_off():
    """The command's process and what it starts (worker processes, batch jobs: the variable)
    fault memory in without waiting for the kernel to compact it (benchmarks/NOTES.md)."""
    script = ("import os, sys, numpy\n"
              "from msmtu_batch.cli import run\n"
              "sys.argv = ['msmtu-batch', '--version']\n"
              "try:\n    run()\nexcept SystemExit:\n    pass\n"
              "core = getattr(numpy, '_core', None) or numpy.core\n"  # NumPy 2 / 1.26
              "print(core.multiarray._set_madvise_hugepage(True), os.environ['NUMPY_MADVISE_HUGEPAGE'])")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False 0"


def test_an_operators_huge_page_setting_is_kept(monkeypatch):
    import numpy

    from msmtu_batch.cli import numpy_without_huge_pages

    core = getattr(numpy, "_core", None) or numpy.core  # NumPy 2 / 1.26
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    previous = core.multiarray._set_madvise_hugepage(True)
    try:
        numpy_without_huge_pages()
        assert core.multiarray._set_madvise_hugepage(previous) is True  # still on: the operator's choice
    finally:
        core.multiarray._set_madvise_hugepage(previous)
    assert os.environ["NUMPY_MADVISE_HUGEPAGE"] == "1"


@pytest.mark.parametrize("command", ["simulate", "validate", "demo", "run", "catalog"])
def test_every_command_has_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_simulate_writes_the_three_products_then_validates(tmp_path):
    result = cli("simulate", "--out", str(tmp_path), "--height", "20", "--width", "30",
                 "--seed", "4", "--msmtu-pixels", "25")
    assert result.returncode == 0, result.stderr
    assert "(20 x 30 pixels, seed 4)" in result.stdout
    assert open_input_cube(tmp_path / "cube.zarr").sizes["x"] == 30
    assert len(list((tmp_path / "msmtu" / "ts_files").iterdir())) == 25
    checked = cli("validate", str(tmp_path / "cube.zarr"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == (f"{tmp_path / 'cube.zarr'}: valid input cube "
                                      "(20 x 30 pixels, 12 months, CRS EPSG:25830)")


def test_workflow_file_drives_simulate_and_flags_override_it(tmp_path):
    result = cli("simulate", "--config", ROOT / "workflows" / "synthetic_andalusia.yaml", "--out", str(tmp_path),
                 "--height", "16", "--width", "24", "--msmtu-pixels", "10")
    assert result.returncode == 0, result.stderr
    ds = xr.open_zarr(tmp_path / "cube.zarr", consolidated=False)
    assert (ds.sizes["y"], ds.sizes["x"]) == (16, 24)
    assert '"split_block":16' in ds.attrs["simulation_config"]


@pytest.mark.parametrize(("args", "message"), [
    (("simulate", "--out", "{tmp}", "--height", "4"),
     "msmtu-batch: error: invalid configuration: height: Input should be greater than or equal to 8"),
    (("simulate", "--out", "{tmp}", "--config", "{tmp}/absent.yaml"),
     "msmtu-batch: error: {tmp}/absent.yaml: configuration file not found"),
    (("validate", "{tmp}/absent.zarr"), "msmtu-batch: error: {tmp}/absent.zarr: input cube not found"),
])
def test_bad_input_gives_one_line_and_status_2(tmp_path, args, message):
    result = cli(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2
    assert result.stderr.strip() == message.format(tmp=tmp_path)
    assert "Traceback" not in result.stderr


def test_simulate_refuses_to_replace_outputs_without_overwrite(tmp_path):
    args = ("simulate", "--out", str(tmp_path), "--height", "16", "--width", "16", "--msmtu-pixels", "5")
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"msmtu-batch: error: {tmp_path / 'cube.zarr'} already exists; "
                                    "pass --overwrite to replace it")
    assert cli(*args, "--overwrite").returncode == 0


def test_validate_names_the_ancillary_a_model_needs(region, tmp_path):
    from msmtu_batch.inputs.cube import write_input_cube

    store = tmp_path / "no_climate.zarr"
    write_input_cube(open_input_cube(region.cube).drop_vars("precipitation"), store)
    assert cli("validate", str(store), "--ancillary", "geotopo").returncode == 0
    result = cli("validate", str(store))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"msmtu-batch: error: {store}: variable 'precipitation': expected "
                                     "an ancillary data variable (y, x), found nothing")


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", str(out), "--height", "40", "--width", "48", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"simulated and validated {out / 'cube.zarr'} in ")
    assert [line.split()[0] for line in lines[1:10]] == [
        "region", "position", "terrain", "climate", "observed", "gaps", "mixing", "classes", "msmtu"]
    assert "40 x 48 pixels" in lines[1]
    assert lines[10].startswith(f"trained {out / 'model.safetensors'} in ")
    assert lines[11].startswith("unmixed 1,920 pixels (") and "on this machine" in lines[11]
    assert lines[12].startswith("accuracy on ") and "against the simulated truth: RMSE 0." in lines[12]
    assert lines[13] == f"maps: {out / 'abundance_map.png'}, {out / 'dominant_class.png'}"
    assert (out / "abundance_map.png").stat().st_size > 10_000
    assert (out / "cogs" / "abundance_2013.tif").is_file() and (out / "abundance.zarr").is_dir()


def test_example_runs(tmp_path):
    result = subprocess.run([sys.executable, "examples/simulate_and_validate.py", "--out",
                             str(tmp_path), "--height", "40", "--width", "56"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "valid input cube" in result.stdout


def test_train_evaluate_and_ablation_from_the_command_line(region, tmp_path):
    model = tmp_path / "model.safetensors"
    trained = cli("train", "--msmtu", str(region.msmtu), "--level", "level1", "--out", str(model),
                  "--epochs", "2", "--hidden", "16", "--ancillary", "geotopo")
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.startswith(f"wrote {model} and {tmp_path / 'model.metrics.json'}: best validation RMSE")
    history = json.loads((tmp_path / "model.metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]

    report = tmp_path / "report"
    scored = cli("evaluate", "--model", str(model), "--msmtu", str(region.msmtu), "--level", "level1",
                 "--out", str(report), "--trees", "10", "--split", "validation")
    assert scored.returncode == 0, scored.stderr
    assert "| brits |" in scored.stdout and (report / "report.md").is_file()
    assert json.loads((report / "metrics.json").read_text())["split"] == "validation"

    wrong = cli("evaluate", "--model", str(model), "--msmtu", str(region.msmtu), "--level", "level2",
                "--out", str(report))
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (f"msmtu-batch: error: {model}: model was trained for level 'level1', "
                                    "--level is 'level2'")

    ablation = cli("ablation", "--msmtu", str(region.msmtu), "--level", "level1", "--out",
                   str(tmp_path / "ablation"), "--epochs", "1", "--trees", "10")
    assert ablation.returncode == 0, ablation.stderr
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    for method in ("brits_none", "brits_geotopo", "brits_all", "fcls", "random_forest_ancillary"):
        assert f"| {method} |" in table


def test_train_needs_exactly_one_data_source(region, tmp_path):
    result = cli("train", "--level", "level1", "--out", str(tmp_path / "m.safetensors"),
                 "--msmtu", str(region.msmtu), "--cube", str(region.cube))
    assert result.returncode == 2
    assert result.stderr.strip() == "msmtu-batch: error: give either --msmtu DIR or --cube CUBE with --reference REF"


def test_train_device_is_checked_before_the_data_is_read(tmp_path):
    missing = tmp_path / "no-such-folder"
    wrong = cli("train", "--level", "level1", "--out", str(tmp_path / "m.safetensors"), "--msmtu", str(missing),
                "--device", "gpu")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "msmtu-batch: error: --device gpu: expected auto, cpu or cuda[:N]"
    absent = cli("train", "--level", "level1", "--out", str(tmp_path / "m.safetensors"), "--msmtu", str(missing),
                 "--device", "cuda:99")
    assert absent.returncode == 2
    assert re.fullmatch(r"msmtu-batch: error: --device cuda:99: torch sees \d+ CUDA device\(s\) here",
                        absent.stderr.strip()), absent.stderr


def test_gpu_check_runs_on_a_cpu_and_says_so(tmp_path):
    """benchmarks/gpu_check.py end to end at toy sizes where torch sees no GPU (as in CI): every
    section runs on the CPU, the GPU=1 worker alone runs the model, the table says "no GPU"."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--size", "32", "--demo-size", "24", "32", "--gemm-seconds", "0.05",
                           "--model-pixels", "2048"], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# gpu_check ") and ": no GPU (CUDA not visible to torch" in done.stdout
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["device"]["device"] == "cpu" and not record["summary"]["cuda_used"]
    assert set(record["gemm_flops"]) == {"fp32", "bf16"} and all(r > 0 for r in record["gemm_flops"].values())
    assert [(r["precision"], r["batch_size"]) for r in record["model"]] == [("fp32", 1024), ("bf16", 1024)]
    fp32, bf16 = record["equality"]
    assert fp32["precision"] == "fp32" and fp32["max_abs_difference"] <= 1e-4, "model and CPU engine agree"
    assert 0 < bf16["max_abs_difference"] < 0.05, "bf16 differs, a little"
    assert record["pipeline"]["pixels"] == 32 * 32 and record["pipeline"]["model_only_on_the_gpu_worker"]
    assert record["training"]["train_pixels"] > 0 and record["training"]["cpu_threads"] == 2
    for heading in ("GEMM at the LSTM shape on cpu", "Model alone on cpu", "Equality on 1,024 pixels",
                    "Pipeline end to end, 32 x 32", "Training, 1 epoch(s) on the demo data"):
        assert f"\n{heading}" in done.stdout, heading
    assert not (tmp_path / "gpu-check-output.zarr").exists()


def test_workflow_train_section_is_a_valid_training_config():
    import yaml

    from msmtu_batch.model.train import TrainConfig

    section = yaml.safe_load((ROOT / "workflows" / "synthetic_andalusia.yaml").read_text())["train"]
    assert TrainConfig(**section) == TrainConfig(), "the workflow documents the defaults"


def test_bench_reports_every_method_against_the_ceiling(tmp_path):
    result = cli("bench", "--out", str(tmp_path / "bench"), "--height", "32", "--width", "40",
                 "--research-pixels", "60", "--chunk", "16", "--memory-size", "24", "--precision-epochs", "1",
                 "--precision-size", "24", "32", "--model-pixels", "2048")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # the CPU every figure comes from, as lscpu names it
    lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                               check=True).stdout.splitlines() if ":" in line)
    flags = set(lscpu["Flags"].split())
    assert lines[0] == (f"CPU: {lscpu['Model name'].strip()}, {os.cpu_count()} cores; " + ", ".join(
        f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile",
                                                                  "amx_bf16")))
    assert lines[1].startswith("region 32 x 40 (1,280 pixels), chunk 16; ceiling ")
    rows = [line for line in lines if line.startswith("| ") and "pixels/s |" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| msmtu-batch run (Zarr in, Zarr + COG out, threads of one process)",
        "| model only, fused CPU engine (prepared inputs in memory)",
        "| model only, fused CPU engine + error head (all a run's per-pixel modelling)",
        "| model only, fused CPU engine with bf16 GEMMs (`--precision bf16`)",
        "| model only, straightforward PyTorch BRITS (same inputs)",
        "| research-code way (JSON per pixel, DataLoader, per-step model, CSV)",
        "| 24 x 24",
        "| region", "| 32 x 40", "| 24 x 24",
        "| seed", "| 0", "| 0", "| 0", "| 1", "| 1", "| 1"]
    assert rows[5].split(" | ")[2] == "1.0x"
    record = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert record["memory_scaling"]["24"]["pixels"] == 576
    assert record["cpu"]["flags"] == {flag: flag in flags for flag in record["cpu"]["flags"]}
    # the per-stage split: the table shows what the record holds, every stage and phase ran
    assert rows[7] == ("| region | plan | cluster | chunks | finish | export | read | prepare | model | write | "
                       "user | system | model share |")
    for row, result in ((rows[8], record["end_to_end"]), (rows[9], record["memory_scaling"]["24"])):
        *numbers, share = row.strip("| ").split(" | ")[1:]
        # the model stage's task seconds over one task slot per core for the run's wall time
        assert share == f"{result['stage_seconds']['model'] / (os.cpu_count() * result['seconds']):.1%}", row
        assert 0 < result["model_share"] <= 1, result
        cells = [float(c) for c in numbers]
        assert cells == [round(result["phase_seconds"][k], 2) for k in ("plan", "cluster", "chunks", "finish",
                                                                         "export")] + \
            [round(result["stage_seconds"][k], 2) for k in ("read", "prepare", "model", "write")] + \
            [round(result["process_cpu_seconds"][k], 2) for k in ("user", "system")]
        assert all(seconds > 0 for seconds in [*result["phase_seconds"].values(), *result["stage_seconds"].values()]
                   ), row
        # the model's work is in this process's user time: the workers are its threads
        assert result["process_cpu_seconds"]["user"] >= result["stage_seconds"]["model"] * 0.5, result
    # reduced precision against fp32 on two trained models' test pixels
    precision = record["precision"]
    assert [(r["seed"], r["precision"]) for r in precision] == [(s, p) for s in (0, 1) for p in ("fp32", "bf16",
                                                                                                 "fp16")]
    for r in precision:
        assert (r["max_abs_difference"] == 0) == (r["precision"] == "fp32"), r
        assert r["max_abs_difference"] < 0.05 and r["keeps_the_map"] == (abs(r["rmse_change"]) < 1e-3), r
    assert rows[12].split(" | ")[1:3] == ["bf16", f"{precision[1]['max_abs_difference']:.2e}"]
    assert rows[12].split(" | ")[6] == f"{precision[1]['fraction_of_ceiling']:.1%}"
    bf16 = record["rates"]["model_fused_bf16"]
    assert (f"bf16 engine: {bf16 / record['rates']['model_fused']:.2f}x the fp32 engine, "
            f"{bf16 / record['bf16_ceiling']:.1%} of the bf16 ceiling") in "\n".join(lines)
    # each ceiling: the faster of torch's GEMM and the engine's own product where it runs in blocks
    from msmtu_batch.model.inference import FP32_IN_BLOCKS

    assert (record["vector_gemm_flops"] is not None) == FP32_IN_BLOCKS
    assert record["gemm_flops"] == max(record["torch_gemm_flops"], record["vector_gemm_flops"] or 0.0)
    assert (record["tile_gemm_flops"] is not None) == amx_available()
    assert record["bf16_ceiling"] == pytest.approx(
        max(record["bf16_gemm_flops"], record["tile_gemm_flops"] or 0.0) * record["ceiling"] / record["gemm_flops"])
    around = record["end_to_end"]["model_only_before_and_after"]
    assert [around[name][0] for name in around] == [record["rates"][name] for name in around]
    ratio, with_head = (record["end_to_end"]["pixels_per_second"] / (sum(around[name]) / 2)
                        for name in ("model_fused", "model_fused_error_head"))
    assert (f"pipeline / model only (fused; the model measured before and after the run): {ratio:.1%} at 32 x 40; "
            f"/ model + error head: {with_head:.1%}") in lines
    assert rows[6].split(" | ")[4:6] == [f"{record['memory_scaling']['24'][k]:.0%}"
                                         for k in ("vs_model_only", "vs_model_with_error_head")]
    peaks = record["memory_scaling"]["24"]["worker_peak_mib"]
    assert peaks and all(100 < p < 8000 for p in peaks), "every worker reports its peak memory"
    # the peak of the process that ran it (a fresh one per run), as the table shows it
    run_peak = record["memory_scaling"]["24"]["run_peak_mib"]
    assert 100 < run_peak < 8000 and rows[6].split(" | ")[6] == f"{run_peak:,.0f}"
    predictions = (tmp_path / "bench" / "research_predictions.csv").read_text().splitlines()
    assert len(predictions) == 61, "the research-code way predicted every sampled pixel"
