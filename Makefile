# The two commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install the package with its pinned CPU torch.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench stress install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that pip takes the local CPU build instead of a CUDA download.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/aoe demo $(if $(CORPUS),--corpus $(CORPUS)) $(if $(DATASET),--dataset $(DATASET)) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/aoe bench $(BENCH_ARGS)

stress: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m stress tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
