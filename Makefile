# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on the development machines; on a GPU box pass e.g. TORCH_SPEC="torch==2.13.0"
# with your CUDA index configured, or install torch into $(VENV) yourself first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The exact versions CI tested (every package but torch, which TORCH_SPEC or you choose): `make setup`
# installs them, so a fresh clone gets what passed. `make lock` moves it forward (README, "Versions").
LOCK ?= constraints-lock.txt
# A second venv with the lowest versions pyproject.toml claims (constraints-min.txt), for `make test-min`.
VENV_MIN ?= .venv-min
STAMP_MIN := $(VENV_MIN)/.installed
# A third with the newest releases pyproject.toml allows, upgraded at every `make test-latest`.
VENV_LATEST ?= .venv-latest

.PHONY: setup demo test test-fast test-min test-latest lock lint format clean

setup: $(STAMP)

# $(call install-venv,VENV,EXTRA_PIP_ARGS): torch first (TORCH_SPEC, unless one is installed), then this
# package with [dev], the installed torch kept as it is (a CUDA build of your choice, or TORCH_SPEC's).
define install-venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH_SPEC)" $(2)
	$(1)/bin/python -m pip install -q -e ".[dev]" $(2) \
	  "torch==$$($(1)/bin/python -c 'from importlib.metadata import version; print(version("torch"))')"
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install-venv,$(VENV),-c $(LOCK))

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

# The unit tests against the newest releases the bounds allow (torch stays TORCH_SPEC's): drift seen on purpose.
test-latest:
	$(call install-venv,$(VENV_LATEST),--upgrade --upgrade-strategy eager)
	$(VENV_LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|deepspeed|datasets|numpy)=='
	$(VENV_LATEST)/bin/python -m pytest -q tests/unit

# Rewrite the lock from what `make test-latest` installed (then run `make test` on it and commit both).
lock:
	test -x $(VENV_LATEST)/bin/python || { echo "run 'make test-latest' first: the lock is what it tested"; exit 1; }
	{ echo "# The exact versions \`make setup\` installs (torch excluded: TORCH_SPEC or your CUDA build)."; \
	  echo "# Written by \`make lock\` from $(VENV_LATEST) on $$(date -u +%F); see README, \"Versions\"."; \
	  $(VENV_LATEST)/bin/python -m pip list --format=freeze --exclude-editable \
	    | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|pip)==' ; } > $(LOCK)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VENV_MIN) $(VENV_LATEST) runs .pytest_cache .ruff_cache *.egg-info
