"""Training for production: checkpoints that survive SIGKILL, fine-tuning from a trained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from msmtu_batch.inputs.training_data import read_cube_reference
from msmtu_batch.model.artifact import artifact_hash, load_artifact, save_artifact
from msmtu_batch.model.checkpoint import checkpoint_path, load_checkpoint
from msmtu_batch.model.train import Checkpointing, FineTuning, TrainConfig, train
from msmtu_batch.runtime.errors import MsmtuError
from msmtu_batch.synthetic.simulate import SimulationConfig, simulate
from tests.conftest import SMALL, die_mid_write

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(hidden=16, embed=8, head_hidden=16)


def train_command(region, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "msmtu-batch"), "train", "--cube", str(region.cube), "--reference", str(region.reference),
            "--level", "level2", "--out", str(out), "--hidden", "16", "--epochs", "8", "--patience", "8",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def uninterrupted(region, tmp_path_factory) -> Path:
    whole = tmp_path_factory.mktemp("whole") / "whole.safetensors"
    done = subprocess.run(train_command(region, whole), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not checkpoint_path(whole).exists(), "the checkpoint goes once the artifact is written"
    return whole


def wait_for_checkpoint(checkpoint: Path, epoch: int, running) -> None:
    while not checkpoint.exists() or load_checkpoint(checkpoint).epoch < epoch:
        assert running(), "the training ended before it could be interrupted"
        time.sleep(0.02)


def test_a_training_killed_with_sigkill_resumes_to_the_same_model(region, uninterrupted, tmp_path):
    whole = uninterrupted
    out = tmp_path / "killed.safetensors"
    checkpoint = checkpoint_path(out)
    training = subprocess.Popen(train_command(region, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    wait_for_checkpoint(checkpoint, 3, lambda: training.poll() is None)
    os.killpg(training.pid, signal.SIGKILL)
    training.wait()
    assert not out.exists() and load_checkpoint(checkpoint).epoch < 8
    die_mid_write(checkpoint)  # as a training killed while it saved its checkpoint leaves it
    assert list(tmp_path.glob(f".{checkpoint.name}.*.partial")), "(the training may have left one too)"

    resumed = subprocess.run(train_command(region, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed after epoch " in resumed.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.metrics.json", "killed.safetensors"], \
        "no checkpoint, and nothing that killed writers left"
    # same weights, bit for bit, and the same record of every epoch
    assert out.read_bytes() == whole.read_bytes()
    metrics = [json.loads(p.with_suffix(".metrics.json").read_text()) for p in (whole, out)]
    assert metrics[0]["validation_rmse"] == metrics[1]["validation_rmse"]
    assert [h["validation_rmse"] for h in metrics[0]["history"]] == [h["validation_rmse"] for h in
                                                                      metrics[1]["history"]]


def test_a_training_batch_job_requeued_midway_resumes_to_the_same_model(slurm, region, uninterrupted, tmp_path):
    """deploy/slurm/train.sbatch, requeued while it trains (as at its walltime signal, or by
    preemption): the job runs again and its training resumes from the checkpoint."""
    out = tmp_path / "job.safetensors"
    env = os.environ | slurm.env
    submit = ["sbatch", "--parsable", "--chdir", str(tmp_path), "--output", str(tmp_path / "train.out"),
              "--cpus-per-task", str(os.cpu_count()), "--mem", "2G", str(ROOT / "deploy/slurm/train.sbatch")]
    job = subprocess.run([*submit, *train_command(region, out)[2:]], capture_output=True, text=True, timeout=60,
                         check=True, env=env | {"MSMTU_BATCH": str(BIN / "msmtu-batch")}).stdout.strip().split(";")[0]
    wait_for_checkpoint(checkpoint_path(out), 3, lambda: job in slurm.queue())
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, env=env)
    deadline, released = time.time() + 300, False
    while job in slurm.queue() or not out.exists():
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True,
                               env=env).stdout
        assert time.time() < deadline, (state, slurm.jobs(), (tmp_path / "train.out").read_text())
        # SLURM holds a requeued job back for two minutes, not the point here; but once its first
        # run is recorded, as the node cleans that run up, a restart at once can fail
        if not released and "BeginTime" in state and any(j.get("JobId") == job for j in slurm.jobs()):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], timeout=60, env=env)
            released = True
        time.sleep(0.5)
    log = (tmp_path / "train.out").read_text()
    assert "(resumed after epoch " in log, log
    assert [j["JobState"] for j in slurm.jobs() if j.get("JobId") == job][-1] == "COMPLETED", slurm.jobs()
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_a_checkpoint_of_another_training_is_refused(region, tmp_path):
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    checkpointing = Checkpointing(tmp_path / "ckpt")
    train(pixels, "level2", TrainConfig(epochs=1, **SMALL_MODEL), checkpointing=checkpointing)
    with pytest.raises(MsmtuError) as err:
        train(pixels, "level2", TrainConfig(epochs=1, seed=1, **SMALL_MODEL), checkpointing=checkpointing)
    assert str(err.value) == (f"{tmp_path / 'ckpt'}: a checkpoint of another training (settings, training data or "
                              "parent model differ); delete it to start afresh")
    (tmp_path / "ckpt").write_bytes(b"\x80\x04not a checkpoint")  # e.g. a pickle put there
    with pytest.raises(MsmtuError) as err:
        train(pixels, "level2", TrainConfig(epochs=1, **SMALL_MODEL), checkpointing=checkpointing)
    assert str(err.value).startswith(f"{tmp_path / 'ckpt'}: not a readable training checkpoint (")


@pytest.fixture(scope="module")
def parent(region, tmp_path_factory):
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    result = train(pixels, "level2", TrainConfig(epochs=8, patience=8, **SMALL_MODEL))
    return save_artifact(result.artifact, tmp_path_factory.mktemp("parent") / "parent.safetensors")


@pytest.fixture(scope="module")
def second_region(tmp_path_factory):
    """Another simulated region (another seed): the new data a user fine-tunes on."""
    return simulate(SimulationConfig(**(SMALL.model_dump() | {"seed": 8})), tmp_path_factory.mktemp("second"))


def test_fine_tuning_beats_training_from_scratch_on_new_data(parent, second_region):
    pixels = read_cube_reference(second_region.cube, second_region.reference, "level2")
    tuning = FineTuning(load_artifact(parent), str(parent), artifact_hash(parent))
    cfg = TrainConfig(epochs=2, patience=2)  # the architecture comes from the parent
    tuned = train(pixels, "level2", cfg, init_from=tuning)
    scratch = train(pixels, "level2", cfg.model_copy(update=SMALL_MODEL))
    assert tuned.validation_rmse < scratch.validation_rmse - 0.005, (tuned.validation_rmse, scratch.validation_rmse)
    artifact = tuned.artifact
    assert artifact.config.hidden == 16 and artifact.training["parent_model_hash"] == artifact_hash(parent)
    assert artifact.training["statistics"] == "parent's" and artifact.training["fresh_parameters"] == []
    np.testing.assert_array_equal(artifact.band_stats.mean, tuning.parent.band_stats.mean)
    refitted = train(pixels, "level2", cfg, init_from=FineTuning(tuning.parent, str(parent), tuning.parent_hash,
                                                                 refit_statistics=True))
    assert not np.array_equal(refitted.artifact.band_stats.mean, tuning.parent.band_stats.mean)


def test_fine_tuning_to_other_classes_starts_a_new_head(parent, region):
    pixels = read_cube_reference(region.cube, region.reference, "level1")
    tuning = FineTuning(load_artifact(parent), str(parent), artifact_hash(parent))
    result = train(pixels, "level1", TrainConfig(epochs=1), init_from=tuning)
    model, parent_model = result.artifact.model.state_dict(), tuning.parent.model.state_dict()
    fresh = result.artifact.training["fresh_parameters"]
    assert sorted(fresh) == sorted(f"{d}.head.{i}" for d in ("forward_pass", "backward_pass") for i in
                                   ("3.weight", "3.bias")), fresh
    assert model["forward_pass.head.3.weight"].shape[0] == len(pixels.classes) != len(tuning.parent.classes)
    # everything else started from the parent (and moved a little in one epoch)
    kept = "forward_pass.cell.weight_hh"
    assert (model[kept] - parent_model[kept]).abs().max() < 0.05


def test_a_setting_that_contradicts_the_parent_is_refused(parent, region):
    pixels = read_cube_reference(region.cube, region.reference, "level2")
    tuning = FineTuning(load_artifact(parent), str(parent), artifact_hash(parent))
    with pytest.raises(MsmtuError) as err:
        train(pixels, "level2", TrainConfig(epochs=1, hidden=32), init_from=tuning)
    assert str(err.value) == (f"--init-from {parent}: hidden 32 differs from the parent model's 16; leave it out "
                              "to keep the parent's")


def test_train_command_fine_tunes_and_refuses_in_one_line(parent, second_region, tmp_path):
    out = tmp_path / "tuned.safetensors"
    base = [str(BIN / "msmtu-batch"), "train", "--cube", str(second_region.cube), "--reference",
            str(second_region.reference), "--level", "level2", "--out", str(out), "--epochs", "1", "--device", "cpu"]
    tuned = subprocess.run([*base, "--init-from", str(parent)], capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr
    assert load_artifact(out).training["parent_model_hash"] == artifact_hash(parent)
    for extra, line in (
            (("--init-from", str(parent), "--ancillary", "none"),
             f"--init-from {parent}: ancillary none differs from the parent model's all; leave it out to keep the "
             "parent's"),
            (("--refit-statistics",), "--refit-statistics applies to --init-from only")):
        refused = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [f"msmtu-batch: error: {line}"]
