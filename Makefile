# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on the development machines; on a GPU box pass e.g. TORCH_SPEC="torch==2.13.0"
# with your CUDA index configured, or install torch into $(VENV) yourself first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# A second venv with the lowest versions pyproject.toml claims (constraints-min.txt), for `make test-min`.
VENV_MIN ?= .venv-min
STAMP_MIN := $(VENV_MIN)/.installed

.PHONY: setup demo test test-fast test-min lint format clean

setup: $(STAMP)

# $(call install-venv,VENV,EXTRA_PIP_ARGS): torch first (TORCH_SPEC), then this package with [dev].
define install-venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH_SPEC)" $(2)
	$(1)/bin/python -m pip install -q -e ".[dev]" $(2)
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call install-venv,$(VENV),)

$(STAMP_MIN): pyproject.toml constraints-min.txt
	$(call install-venv,$(VENV_MIN),-c constraints-min.txt)

demo: setup
	OMP_NUM_THREADS=1 $(PY) -m trainer demo --output runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The unit tests against the lowest supported versions (the integration tests need `make test`).
test-min: $(STAMP_MIN)
	$(VENV_MIN)/bin/python -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VENV_MIN) runs .pytest_cache .ruff_cache *.egg-info
