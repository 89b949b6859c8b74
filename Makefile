# Two-command setup: `make demo` and `make test` each create or reuse .venv, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

# Debian's packages that the examples and the tests use beyond Python: the HDF-EOS2 library
# (test granules written as MODAPS writes them), GDAL's command-line tools (the outputs read
# by gdalinfo), and a one-node SLURM for the cluster tests. Needs root (or sudo) and apt-get.
SYSTEM_PACKAGES := libhdfeos0 gdal-bin slurmctld slurmd slurm-client munge

.PHONY: demo test lint bench clean system-packages

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: on the project's machines pip takes a local CPU build; a bare
	# `torch` requirement could otherwise resolve a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/msmtu-batch demo --out demo-output

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/simulate_scaling.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/msmtu-batch bench --out bench-output/inference --memory-size 512 --memory-size 2048
	$(BIN)/python benchmarks/ingest_andalusia.py --out bench-output/ingest

system-packages:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null

clean:
	rm -rf demo-output bench-output .pytest_cache
