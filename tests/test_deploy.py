"""deploy/: the container recipes install as the README does (their install steps resolved in
a fresh venv), and every command the scripts, the scrontab and the systemd unit run exists."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from msmtu_batch.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in a recipe (line continuations joined)."""
    joined = text.replace("\\\n", " ")
    return [shlex.split(m.group(1)) for m in re.finditer(r"-m pip install ([^&\n]+)", joined)]


def test_container_recipes_pin_torch_first_then_install_the_package():
    makefile_torch = re.search(r"^TORCH\s+\?=\s+(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    docker = (DEPLOY / "container" / "Dockerfile").read_text()
    apptainer = (DEPLOY / "container" / "msmtu-batch.def").read_text()
    assert f"ARG TORCH_VERSION={makefile_torch.split('==')[1]}" in docker
    assert f"TORCH_VERSION={makefile_torch.split('==')[1]}" in apptainer
    for recipe, package in ((docker, "."), (apptainer, "/opt/msmtu-batch")):
        installs = [args for args in pip_installs(recipe) if "--upgrade" not in args]
        torch, project = installs
        assert torch[1].startswith("torch==") and "--index-url" in torch  # never PyPI's default (CUDA) build
        assert "whl/cpu" in recipe and project[-1] == package


def test_container_install_steps_resolve_in_a_fresh_venv(tmp_path):
    """As far as this machine allows (no Docker, no internet): the recipe's two installs in a
    new venv, as pip would do them (dry run) from the machine's package index: the pinned
    torch exists as a CPU build, and the package builds from a plain (non-editable) copy.
    Their dependencies are resolved by `make test` itself (same pyproject); resolving them
    again here would cost a minute of the suite."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    pip = tmp_path / "venv" / "bin" / "pip"
    torch = next(args for args in pip_installs((DEPLOY / "container" / "Dockerfile").read_text())
                 if args[1].startswith("torch=="))[1].replace("${TORCH_VERSION}", "2.13.0")
    report = tmp_path / "report.json"
    done = subprocess.run([pip, "install", "--quiet", "--dry-run", "--no-deps", "--report", str(report), torch,
                           str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved.keys() == {"torch", "msmtu-batch"} and resolved["torch"].startswith("2.13.0")
    requires = next(item["metadata"]["requires_dist"] for item in json.loads(report.read_text())["install"]
                    if item["metadata"]["name"] == "msmtu-batch")
    assert any(r.startswith("dask-jobqueue") for r in requires) and any(r.startswith("torch") for r in requires)


def command_options(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {option for parameter in command.params for option in getattr(parameter, "opts", [])}


def msmtu_command_lines(text: str) -> list[list[str]]:
    """Every msmtu-batch invocation in a script or unit file (after `exec`, `cd ... &&` etc.)."""
    joined = text.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#") or "workflow" not in line:
            continue
        match = re.search(r"(msmtu-batch|MSMTU_BATCH:-msmtu-batch\}\"?) (\w[\w-]*)(.*)", line)
        if match:
            lines.append([match.group(2), *re.findall(r"(--[\w-]+)", match.group(3))])
    return lines


def test_scripts_and_units_call_commands_and_options_that_exist():
    files = [DEPLOY / "slurm" / "workflow.sbatch", DEPLOY / "slurm" / "rerun.sbatch",
             DEPLOY / "slurm" / "msmtu.scrontab", DEPLOY / "systemd" / "msmtu-workflow.service"]
    seen = 0
    for path in files:
        for command, *options in msmtu_command_lines(path.read_text()):
            assert command == "workflow", path
            assert set(options) <= command_options(command), (path, options)
            seen += 1
    assert seen == len(files)
    for script in ("workflow.sbatch", "rerun.sbatch", "train.sbatch"):  # train.sbatch runs in test_training
        subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / script)], check=True)
    readme = "".join((ROOT / "docs" / page).read_text() for page in ("operations.md", "training.md"))  # their reference
    for command in ("msmtu-batch cluster-script deploy/slurm/cpu.yaml", "deploy/slurm/workflow.sbatch",
                    "scrontab deploy/slurm/msmtu.scrontab", "deploy/slurm/rerun.sbatch", "deploy/slurm/train.sbatch"):
        assert command in readme


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn", "rio_cogeo": "rio-cogeo", "cf_xarray": "cf-xarray",
                 "dask_jobqueue": "dask-jobqueue"}


def test_every_library_the_package_imports_is_declared_in_both_environments():
    import ast

    imported = set()
    for path in (ROOT / "msmtu_batch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {DISTRIBUTIONS.get(m, m) for m in imported - set(sys.stdlib_module_names) - {"msmtu_batch"}}
    pyproject = (ROOT / "pyproject.toml").read_text()
    conda = (ROOT / "environment.yml").read_text().replace("_", "-").replace("matplotlib-base", "matplotlib")
    conda = conda.replace("pytorch", "torch")
    assert sorted(d for d in third_party if not re.search(rf'"{d}(\[[a-z,]+\])?>', pyproject)) == []
    assert sorted(d for d in third_party if f"- {d}>" not in conda) == []
