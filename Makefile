# The README's two commands: `make run` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
TINY := manifests/examples/tiny.yaml

.PHONY: setup run test lint

setup: $(VENV)/.installed

# uv resolves and installs the multi-GB torch stack in seconds and caches it in ~/.cache/uv.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@

run: setup
	$(BIN)/chatflow example tiny --dest manifests/examples/tiny-assets
	$(BIN)/chatflow schedule -f $(TINY) --png runs/tiny/schedule.png
	$(BIN)/chatflow sample -f $(TINY) --count 16 --decode

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest
