# moesim — `make demo` runs the quickstart scenario, `make test` runs the test suite,
# `make fuzz` the large fuzzing profile.
# Both create (or reuse) the virtual environment .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test fuzz bench lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "moesim needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/moesim run scenarios/quickstart.yaml --out runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fuzz suite's large profile: >= 5,000 validate cases and >= 300 small runs; prints the
# counts of clean errors, crashes, hangs and invariant violations (failing cases are saved).
fuzz: export OPENBLAS_NUM_THREADS := 1
fuzz: export MOESIM_FUZZ := full
fuzz: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/reliability/test_fuzz.py

bench: export OPENBLAS_NUM_THREADS := 1
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/gate_speed.py
	$(BIN)/python benchmarks/engine_scale.py

lint: $(STAMP)
	$(BIN)/ruff check moesim tests benchmarks
	$(BIN)/ruff format --check moesim tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
