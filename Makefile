# Two entry points: `make smoke` (the tiny hybrid on the bundled corpus, CPU, 2 ranks) and
# `make test` (the whole suite). Both create .venv and install the project on first use;
# later runs skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The CPU build of torch; a GPU cluster installs its own torch before `pip install -e .[gpu]`.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup slurm-setup smoke test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

smoke: setup
	$(VENV)/bin/nemotron-train train configs/smoke.yaml $(ARGS)

# The SLURM tests run on `nemotron-train local-cluster` (a real slurm-wlm + munge cluster of
# network namespaces); installing those packages is part of the test set-up, as root. Without
# root this says so once and the SLURM tests skip with that reason.
slurm-setup: setup
	@if [ "$$(id -u)" = 0 ]; then $(VENV)/bin/nemotron-train local-cluster install; \
	else echo "not root: skipping the slurm-wlm/munge install; the SLURM tests will skip"; fi

test: setup slurm-setup
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs
