#!/usr/bin/env bash
# fedlink's single test command: installs what the tests need (a pinned Synapse from PyPI
# into .venv; python3-venv from Debian only if missing; Debian's prometheus; a pinned
# schemathesis from PyPI into .venv-st), then runs every target: benches once in test
# mode, then every test.
# Extra arguments go to `cargo test`.
set -euo pipefail
FEDLINK_TEST_TOOLS=1 source "$(dirname "${BASH_SOURCE[0]}")/ensure-synapse.sh"
log "using $("$PY" -c 'import synapse; print("synapse", synapse.__version__)') from $PY"
# Benches build and run once in test mode first, so the run closes on cargo's test summary.
cargo test --benches "$@"
exec cargo test --lib --bins --tests "$@"
