"""The package's floors hold: no module imports from a floor above its own (import-linter's
layers contract in pyproject.toml, docs/architecture.md)."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, capture_output=True, text=True, env={"PYTHONPATH": str(package_parent)},
                          timeout=300)


def _floors() -> list[str]:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_no_import_runs_up_a_floor():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_every_module_of_the_package_is_on_a_floor():
    package = ROOT / "msmtu_batch"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules == set(_floors())


def test_an_import_up_a_floor_is_caught(tmp_path):
    shutil.copytree(ROOT / "msmtu_batch", tmp_path / "msmtu_batch", ignore=shutil.ignore_patterns("__pycache__"))
    tiling = tmp_path / "msmtu_batch" / "runtime" / "tiling.py"
    tiling.write_text(tiling.read_text() + "\nfrom msmtu_batch.orchestration.pipeline import run  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1
    assert "msmtu_batch.runtime.tiling -> msmtu_batch.orchestration.pipeline" in result.stdout
