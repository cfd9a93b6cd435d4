# Everything a fresh machine needs, from the project's own files: a virtualenv with the pinned
# dependencies (uv inside it), and Apache Kafka's jars from Maven Central on first broker start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit bench-tiny schemas clean prometheus-tools

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv==0.13.8 || $(PY) -m ensurepip
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[test,bench]'
	$(PY) -c "from consumer.local_kafka import ensure_jars; ensure_jars()"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m consumer demo

# The observability tests run a real Prometheus and promtool (Debian package `prometheus`).
prometheus-tools:
	sh deploy/prometheus/install.sh

test: setup prometheus-tools
	$(PY) -m pytest

test-unit: setup prometheus-tools
	$(PY) -m pytest tests/unit

schemas: setup
	$(PY) -m consumer.schemas schemas

clean:
	rm -rf $(VENV) .kafka .demo .pytest_cache
