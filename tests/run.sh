#!/usr/bin/env bash
# Moat's whole test suite: formatting, lints, build, unit and end-to-end tests (including the
# root-only network-namespace tests), the cluster suite on a live Kubernetes (root), a short
# run of every fuzz target, manifest validation, and a benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

tests/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Root-only tests must run here, not skip.
if [[ $(id -u) -eq 0 ]]; then export MOAT_REQUIRE_ROOT_TESTS=1; fi

step() { printf '\n== %s\n' "$*"; }

step "format"
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
  cargo fmt --manifest-path fuzz/Cargo.toml -- --check
else
  echo "*** format check SKIPPED: cargo fmt is not installed (rustup component add rustfmt)" >&2
fi
step "build (release)"
cargo build --release --workspace --locked
step "lint"
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --workspace --all-targets --locked -- -D warnings
else
  echo "*** lint SKIPPED: cargo clippy is not installed (rustup component add clippy)" >&2
fi
step "tests"
cargo test --release --workspace --locked
step "cluster suite (Moat on a live one-node Kubernetes, tests/cluster/), then the controller benchmark smoke run on it"
if [[ $(id -u) -eq 0 ]]; then
  trap 'tests/cluster/down.sh >/dev/null 2>&1 || true' EXIT
  cluster_env=$(tests/cluster/up.sh)   # exactly KUBECONFIG=... and KUBECTL=...
  eval "$cluster_env"
  export KUBECONFIG KUBECTL
  MOAT_REQUIRE_CLUSTER_TESTS=1 cargo test --release -p moat-e2e --locked --test cluster
  # The discovery controller against this live API server, at a tenth of its scale target.
  target/release/moat-bench controller --smoke
  tests/cluster/down.sh
  trap - EXIT
else
  echo "*** cluster suite SKIPPED: tests/cluster/up.sh needs root" >&2
fi
step "fuzz targets (built, then each run for 10 s from its seeds; fuzz/README.md)"
fuzz/run.sh 10
step "manifests (kustomize render, schema validation, security scan)"
MOAT_CA_BIN="$PWD/target/release/moat-ca" MOAT_PROXY_BIN="$PWD/target/release/moat-proxy" bash deploy/validate.sh
step "benchmark harness (plot script tests, then every benchmark in smoke mode)"
python3 benches/test_plot.py
target/release/moat-bench all --smoke --out target/bench-smoke
target/release/moat-bench discovery --smoke
printf '\nall checks passed in %ss\n' "$(( $(date +%s) - start ))"
