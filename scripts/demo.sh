#!/usr/bin/env bash
# See fedlink work: brings up two Synapse homeservers (kiwi and litchi) and fedlink on
# loopback, links @alice on both, and narrates an invite following the person, step by
# step. Everything runs in temporary directories and is torn down on exit (or Ctrl-C).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure-synapse.sh"
exec cargo test --test demo -- --ignored --nocapture --test-threads=1
