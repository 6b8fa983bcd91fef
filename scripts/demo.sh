#!/usr/bin/env bash
# The main job on the embedded default: a local cluster (real control plane, simulated nodes),
# the local cloud, the Portico operator, and a demo Service of type LoadBalancer that answers
# on its EXTERNAL-IP. Everything stays up afterwards; `scripts/demo.sh down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

e2e/scripts/install-control-plane.sh
e2e/scripts/install-helm.sh
cargo build --workspace --bins --locked
exec target/debug/portico-testbed demo "$@"
