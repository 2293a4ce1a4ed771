# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install
# everything they need. Torch is installed first so that the package's torch requirement
# (a range) is already satisfied and pip never pulls a multi-GB CUDA build by accident.
#
# Choosing another torch build: `make demo TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"`
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,serve,inference]"
	touch $(VENV)/.installed

install: $(VENV)/.installed

demo: install
	$(BIN)/dpq demo

# Two workers (pytest-xdist), one test file each at a time: many tests wait on processes they
# start (ranks, servers, Ray actors, a browser), so two files run side by side on two cores.
test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
