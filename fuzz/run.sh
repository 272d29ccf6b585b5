#!/usr/bin/env bash
# Builds the fuzz targets and runs each one in turn from the seed corpus (fuzz/seeds.py).
#   fuzz/run.sh              30 seconds per target
#   fuzz/run.sh 600          600 seconds per target
#   fuzz/run.sh -runs=10000000   a fixed number of executions per target
#   FUZZ_TARGETS="csr jwt" fuzz/run.sh 60   only some targets
# Fails on the first crash, leak of time (a slow unit) or out-of-memory; the input that did it
# is kept under fuzz/artifacts/<target>/ and should become a regression test.
set -euo pipefail
cd "$(dirname "$0")"
limit=${1:-30}
[[ $limit == -* ]] || limit="-max_total_time=$limit"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz --locked; tests/setup.sh does it)" >&2
  exit 1
fi
# cargo-fuzz passes -Z flags to rustc; this lets a stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
# Moat's crates forbid unsafe code, so AddressSanitizer would add nothing to them but build and
# run time: the targets find panics, arithmetic overflows (debug assertions are on), hangs and
# runaway allocations.
flags=(-O --debug-assertions --sanitizer none)
cargo fetch --locked >/dev/null   # Cargo.lock is committed: fail rather than re-resolve
python3 seeds.py
cargo fuzz build "${flags[@]}"

read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"
printf '%-16s %14s %10s %8s\n' target executions exec/s seconds
for t in "${targets[@]}"; do
  log=$(mktemp)
  start=$(date +%s)
  # -rss_limit_mb / -timeout: an input that takes 256 MiB or 10 s is a denial of service.
  # The longest input that means anything: detection only ever sees a 4 KiB peek.
  case $t in detect) max_len=4096 ;; *) max_len=65536 ;; esac
  if ! cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- "$limit" -rss_limit_mb=256 -timeout=10 \
       -max_len=$max_len -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $t FAILED; the input is under fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  secs=$(( $(date +%s) - start ))
  printf '%-16s %14s %10s %8s\n' "$t" "$runs" "$(( runs / (secs > 0 ? secs : 1) ))" "$secs"
  rm -f "$log"
done
