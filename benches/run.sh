#!/usr/bin/env bash
# Every benchmark in one run: builds the binaries as they ship (profile `dist`: fat LTO, one
# codegen unit) and the harness, then runs `moat-bench all`. Arguments go to `moat-bench all`
# (e.g. `--smoke`, `--repeats 3`, `--out DIR`). Needs haproxy, nginx, iperf3, wrk, h2load and
# Python with matplotlib: tests/setup.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile dist --locked -p moat-proxy -p moat-ca -p moat-injector
cargo build --release --locked -p moat-bench
export PATH="$PWD/.venv/bin:$PATH"
MOAT_BIN_DIR="$PWD/target/dist" exec target/release/moat-bench all "$@"
