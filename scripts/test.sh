#!/usr/bin/env bash
# fedlink's single test command: installs what the tests need (a pinned Synapse from PyPI
# into .venv; python3-venv from Debian only if missing), then runs every test target.
# Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure-synapse.sh"
log "using $("$PY" -c 'import synapse; print("synapse", synapse.__version__)') from $PY"
exec cargo test --all-targets "$@"
