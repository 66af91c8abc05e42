# Fresh-machine entry points. `make test` creates .venv if missing, installs the pinned
# dependencies and the project (with its C++ extension and console commands), runs the linter
# (ruff, configured in ruff.toml) and the CPU test suite;
# `make quickstart` installs the same and runs the whole pipeline on an embedded default.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.nbdiff-installed

.PHONY: test lint install quickstart clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) requirements.txt requirements-eval.txt setup.py $(wildcard csrc/*)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt -r requirements-eval.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VPY) -m pytest -q tests

# The whole pipeline on an embedded default (CPU, under 15 minutes with the install).
quickstart: $(STAMP)
	$(VPY) examples/quickstart/quickstart.py --workdir runs/quickstart

clean:
	rm -rf build *.egg-info megatron_nbdiff/*.so
