# Two commands for a fresh machine (Python 3.11 + pip):
#   make demo   -> create .venv, install pinned deps, run a coordinator + emulated heterogeneous fleet
#   make test   -> create .venv, install pinned deps, run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench protos clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

demo: $(STAMP)
	$(PY) tools/fleet.py --config tools/demo_fleet.yaml --out runs/demo

protos: $(STAMP)
	$(PY) tools/gen_protos.py

clean:
	rm -rf $(VENV) runs
