# The README's two commands: `make run` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
TINY := manifests/examples/tiny.yaml

.PHONY: setup lock run test lint generate controlplane

setup: $(VENV)/.installed

# The environment is exactly uv.lock (every package pinned, with hashes), never resolved anew.
# uv itself comes from PyPI at UV_VERSION, then the lock keeps that same uv in the environment.
# Two syncs: DeepSpeed's sdist imports torch to build, so it is built after everything else is in
# (see [tool.uv] in pyproject.toml). A stamp older than pyproject.toml or uv.lock reinstalls.
SYNC := VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv sync --active --locked --quiet
$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(BIN)/uv
	@$(BIN)/uv lock --check --quiet || { echo "make: uv.lock does not match pyproject.toml: \
	run 'make lock' and commit uv.lock (README, 'Dependencies')" >&2; exit 2; }
	$(SYNC) --extra dev --no-install-package deepspeed
	$(SYNC) --extra dev
	touch $@

# Re-resolve uv.lock after a change to pyproject.toml's dependencies (`make lock`), or move one
# package to its newest allowed release (`make lock UPGRADE=transformers`). Commit the result.
lock: | $(BIN)/uv
	$(BIN)/uv lock $(if $(UPGRADE),--upgrade-package $(UPGRADE))

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
	$(BIN)/chatflow-operator runtime > manifests/trainjob/clustertrainingruntime.yaml
	$(BIN)/chatflow-operator runtime --helm > charts/chatflow-operator/templates/clustertrainingruntime.yaml
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
