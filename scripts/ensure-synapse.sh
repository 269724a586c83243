#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: makes sure .venv holds the pinned Synapse and exports
# FEDLINK_SYNAPSE_PYTHON.
#
# 1. Makes sure a repo-local virtualenv `.venv` has matrix-synapse $SYNAPSE_VERSION
#    (installs python3-venv from Debian only if `python3 -m venv` does not work).
# 2. Exports FEDLINK_SYNAPSE_PYTHON for the end-to-end tests (tests/support/synapse.rs).
# 3. With FEDLINK_TEST_TOOLS=1 (the test command): installs Debian's `prometheus`
#    (prometheus and promtool) when missing, and schemathesis (pinned) into `.venv-st`
#    (exports FEDLINK_SCHEMATHESIS).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SYNAPSE_VERSION=1.163.2
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '[fedlink] %s\n' "$*" >&2; }

apt_install() {
    log "apt-get install -y $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@"
}

have_synapse() {
    [ -x "$PY" ] && "$PY" - "$SYNAPSE_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("matrix-synapse") == sys.argv[1] else 1)
PYEOF
}

# The test tools, when the test command asks for them (FEDLINK_TEST_TOOLS=1; not the demo).
if [ "${FEDLINK_TEST_TOOLS:-0}" = 1 ]; then
# Prometheus and promtool for the operator tests (alert rules, dashboard, a real scrape).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    apt_install --no-install-recommends prometheus
    # The package enables a system Prometheus on :9090; the tests start their own.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl disable --now prometheus || true
    fi
fi

# Schemathesis (PyPI, pinned) in its own virtualenv, for the admin API's OpenAPI test.
SCHEMATHESIS_VERSION=4.32.5
ST_VENV="$ROOT/.venv-st"
if ! "$ST_VENV/bin/schemathesis" --version 2>/dev/null | grep -qxF "schemathesis, version $SCHEMATHESIS_VERSION"; then
    command -v python3 >/dev/null || apt_install python3
    rm -rf "$ST_VENV"
    python3 -m venv "$ST_VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$ST_VENV"; }
    log "installing schemathesis $SCHEMATHESIS_VERSION into $ST_VENV"
    "$ST_VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
export FEDLINK_SCHEMATHESIS="$ST_VENV/bin/schemathesis"
fi

if ! have_synapse; then
    command -v python3 >/dev/null || apt_install python3
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
    log "installing matrix-synapse==$SYNAPSE_VERSION into .venv"
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$PY" -m pip install --quiet --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
    have_synapse || { log "matrix-synapse $SYNAPSE_VERSION not importable after install"; exit 1; }
fi

export FEDLINK_SYNAPSE_PYTHON="$PY"
