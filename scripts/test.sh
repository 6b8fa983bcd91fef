#!/usr/bin/env bash
# Runs every test: formatting and lint gates, unit tests, and the end-to-end tests on local
# clusters. Installs what it needs first (etcd, Kubernetes 1.20.2 built once from Debian's
# source package, Helm v4 and moto (the AWS API emulator), all cached in ~/.cache/portico).
set -euo pipefail
cd "$(dirname "$0")/.."

e2e/scripts/install-control-plane.sh
e2e/scripts/install-helm.sh
e2e/scripts/install-moto.sh
if ! command -v cargo-nextest >/dev/null; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the operator, the local cloud and the testbed as processes.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast
