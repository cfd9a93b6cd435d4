# Everything a fresh machine needs, from the project's own files: a virtualenv with the pinned
# dependencies (uv inside it), and Apache Kafka's jars from Maven Central on first broker start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lint test test-flavours test-unit bench-tiny bench-pipeline schemas clean prometheus-tools deploy-tools

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip -q
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv==0.13.8
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[test,bench]'
	$(PY) -c "from devtools.local_kafka import ensure_jars, ensure_tool_jars; ensure_jars(); ensure_tool_jars()"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m devtools demo

# The observability tests run a real Prometheus and promtool (Debian package `prometheus`).
prometheus-tools:
	sh deploy/prometheus/install.sh

# The deployment checks (tests/deploy) need kustomize and KEDA's and the Prometheus operator's CRDs,
# from the Go module proxy into .tools/ (once; versions pinned here), and a compose CLI: Debian's
# docker-compose when neither `docker compose` nor `docker-compose` is there.
TOOLS := $(CURDIR)/.tools
KUSTOMIZE_VERSION := v5.8.1
KEDA_VERSION := v2.21.0
PROMETHEUS_OPERATOR_VERSION := v0.85.0
GO_MODULE_DIR = go mod download -json $(1) | $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'

$(TOOLS)/bin/.kustomize-$(KUSTOMIZE_VERSION):
	GOBIN=$(TOOLS)/bin go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	touch $@

# The ScaledObject CRD, and the Prometheus scaler's source (the trigger parameters KEDA reads). The stamp
# names what is fetched, so a checkout that fetched the Kafka scaler's files before fetches these.
KEDA_STAMP := $(TOOLS)/keda/.$(KEDA_VERSION)-prometheus
$(KEDA_STAMP):
	dir=$$($(call GO_MODULE_DIR,github.com/kedacore/keda/v2@$(KEDA_VERSION))) && mkdir -p $(TOOLS)/keda && \
	install -m 644 $$dir/config/crd/bases/keda.sh_scaledobjects.yaml $$dir/pkg/scalers/prometheus_scaler.go $(TOOLS)/keda/
	touch $@

$(TOOLS)/prometheus-operator/.$(PROMETHEUS_OPERATOR_VERSION):
	dir=$$($(call GO_MODULE_DIR,github.com/prometheus-operator/prometheus-operator@$(PROMETHEUS_OPERATOR_VERSION))) && \
	mkdir -p $(TOOLS)/prometheus-operator && \
	install -m 644 $$dir/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml $(TOOLS)/prometheus-operator/
	touch $@

deploy-tools: $(TOOLS)/bin/.kustomize-$(KUSTOMIZE_VERSION) $(KEDA_STAMP) \
		$(TOOLS)/prometheus-operator/.$(PROMETHEUS_OPERATOR_VERSION)
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends docker-compose; \
	else echo "tests/deploy needs 'docker compose' or 'docker-compose' (Debian/Ubuntu: apt-get install docker-compose)" >&2; fi

# Lint, format and types first (pyproject.toml: [tool.ruff], [tool.mypy]), then the suite.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup prometheus-tools deploy-tools lint
	$(PY) -m pytest

# The suite again as each CPU flavour below this machine's would run it (devtools/flavours.py): run it
# before a change lands, since CI runs on whichever flavour it gets.
test-flavours: setup prometheus-tools deploy-tools
	$(PY) -m devtools.flavours

test-unit: setup prometheus-tools
	$(PY) -m pytest tests/unit

# Pipeline throughput without a model (ENGINE=echo) against plain Kafka loops: bench/README.md.
bench-pipeline: setup
	$(PY) -m bench.pipeline

# The engine's per-call overhead on the tiny model (bench/README.md has the others).
bench-tiny: setup
	$(PY) -m bench.engine_tiny

schemas: setup
	$(PY) -m consumer.schemas schemas

clean:
	rm -rf $(VENV) .kafka .demo .pytest_cache .tools
