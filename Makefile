# Fresh-machine entry points. `make test` creates .venv if missing, installs the pinned
# dependencies and the project (with its C++ extension) and runs the CPU test suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.nbdiff-installed

.PHONY: test install clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) requirements.txt setup.py $(wildcard csrc/*)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

clean:
	rm -rf build *.egg-info megatron_nbdiff/*.so
