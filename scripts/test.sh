#!/usr/bin/env bash
# fedlink's single test command: installs what the tests need (a pinned Synapse from PyPI
# into .venv; python3-venv from Debian only if missing; Debian's prometheus; a pinned
# schemathesis from PyPI into .venv-st; Debian's make and gcc if missing, for jemalloc), then runs every target: benches once in test
# mode, then every test.
# Extra arguments go to `cargo test`.
set -euo pipefail
FEDLINK_TEST_TOOLS=1 source "$(dirname "${BASH_SOURCE[0]}")/ensure-synapse.sh"
# Building fedlink compiles jemalloc (its allocator) from C: that needs make and a C compiler.
command -v make >/dev/null || apt_install make
command -v cc >/dev/null || apt_install gcc
log "using $("$PY" -c 'import synapse; print("synapse", synapse.__version__)') from $PY"
# Benches build and run once in test mode first, so the run closes on cargo's test summary.
cargo test --benches "$@"
exec cargo test --lib --bins --tests "$@"
