#!/bin/sh
# Puts `prometheus` and `promtool` on PATH for the tests (Debian/Ubuntu package `prometheus`).
# Idempotent and quick when both are already there; `make test` runs it.
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install Prometheus so that prometheus and promtool are on PATH (https://prometheus.io/download/)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

install_package() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
}
echo "installing Debian's prometheus package (prometheus, promtool) for the tests"
install_package || { $SUDO apt-get update -q && install_package; }

# The package starts a system-wide Prometheus on :9090 where an init system lets it. The tests run
# their own on a free port, so put the machine back as it was: no Prometheus running.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1
