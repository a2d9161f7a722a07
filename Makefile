# Two commands for a fresh machine (Python 3.11 + pip):
#   make demo   -> create .venv, install pinned deps, run a coordinator + emulated heterogeneous fleet
#   make test   -> create .venv, install pinned deps, run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench protos clean browser

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q -ra tests

# Best effort: Debian's Chromium for the dashboard's headless-browser test (skipped without it).
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  timeout 300 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null' ) \
	  || echo "chromium not installed: the dashboard browser test will be skipped"

demo: $(STAMP)
	$(PY) tools/fleet.py --config tools/demo_fleet.yaml --out runs/demo

protos: $(STAMP)
	$(PY) tools/gen_protos.py

clean:
	rm -rf $(VENV) runs
