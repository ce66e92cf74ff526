# The README's two commands: `make run` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
TINY := manifests/examples/tiny.yaml
DEEPSPEED_BUILD_DEPS := setuptools wheel packaging psutil ninja py-cpuinfo hjson msgpack einops

.PHONY: setup run test lint generate controlplane

setup: $(VENV)/.installed

# uv resolves and installs the multi-GB torch stack in seconds and caches it in ~/.cache/uv.
# DeepSpeed ships as a source distribution whose setup imports torch: torch and its build tools go
# in first, then DeepSpeed builds against them (DS_BUILD_OPS=0: no C++ ops compiled).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python torch==2.15.0 $(DEEPSPEED_BUILD_DEPS)
	DS_BUILD_OPS=0 $(BIN)/uv pip install --quiet --python $(BIN)/python \
		--no-build-isolation-package deepspeed -e '.[dev]'
	touch $@

run: setup
	$(BIN)/chatflow example tiny --dest manifests/examples/tiny-assets
	$(BIN)/chatflow schedule -f $(TINY) --png runs/tiny/schedule.png
	$(BIN)/chatflow train -f $(TINY) --output runs/tiny
	$(BIN)/chatflow report --history runs/tiny/history.jsonl -o runs/tiny/report.png

# Files generated from code (the spec models, the dashboard and alert rules); tests fail when a
# committed copy differs from what this writes.
generate: setup
	$(BIN)/chatflow-operator crd > manifests/base/crd.yaml
	$(BIN)/chatflow-operator crd --helm > charts/chatflow-operator/templates/crd.yaml
	$(BIN)/python -m chatflow_operator.reference > docs/reference.md
	$(BIN)/python -m chatflow.observability

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The integration tests' Kubernetes control plane (kube-apiserver, kube-controller-manager, etcd),
# built from source with Go: 7-9 minutes once, then cached outside the repository per version
# (see tests/controlplane/README.md), so a warm `make test` spends milliseconds here.
controlplane:
	tests/controlplane/build.sh

test: lint controlplane
	$(BIN)/pytest
