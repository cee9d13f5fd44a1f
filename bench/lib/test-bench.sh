# Sourced by the benchmarks that are an ignored integration test printing one line
# `DETOUR_BENCH_RESULT {json}` (bench/operator/run.sh, bench/config-freshness/run.sh).
# After sourcing, the working directory is the repository's root and RUNS (default 3) is set.
#
#   run_test_bench TEST RAW   builds the release binary and the test, runs the test RUNS times
#                             and appends each run's JSON line to the file RAW.
# The table is written by each script's own Python, with bench/lib/bench_results.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS="${RUNS:-3}"

run_test_bench() {
  local test=$1 raw=$2 i
  cargo build --release --locked --bin detour
  cargo test --release --locked --test "$test" --no-run
  for i in $(seq 1 "$RUNS"); do
    echo "run $i/$RUNS" >&2
    cargo test --release --locked --test "$test" -- --ignored --nocapture 2>&1 |
      grep '^DETOUR_BENCH_RESULT ' | sed 's/^DETOUR_BENCH_RESULT //' | tee -a "$raw"
  done
}
