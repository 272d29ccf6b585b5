#!/usr/bin/env bash
# Moat's whole test suite: formatting, lints, build, unit and end-to-end tests (including the
# root-only network-namespace tests), manifest validation, and a benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

tests/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Root-only tests must run here, not skip.
if [[ $(id -u) -eq 0 ]]; then export MOAT_REQUIRE_ROOT_TESTS=1; fi

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "build (release)"
cargo build --release --workspace --locked
step "lint"
cargo clippy --release --workspace --all-targets --locked -- -D warnings
step "tests"
cargo test --release --workspace --locked
step "manifests (kustomize render, schema validation, security scan)"
MOAT_CA_BIN="$PWD/target/release/moat-ca" MOAT_PROXY_BIN="$PWD/target/release/moat-proxy" bash deploy/validate.sh
step "benchmark harness (plot script tests, then every benchmark in smoke mode)"
python3 benches/test_plot.py
target/release/moat-bench all --smoke --out target/bench-smoke
printf '\nall checks passed in %ss\n' "$(( $(date +%s) - start ))"
