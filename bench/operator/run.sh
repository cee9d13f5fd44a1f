#!/usr/bin/env bash
# Scale benchmark of `detour operator` against the in-memory API server (tests/support).
# Builds in release mode, runs the benchmark RUNS times (default 3) and writes the medians to
# bench/operator/results.md. Sizes: DETOUR_BENCH_NAMESPACES (100), DETOUR_BENCH_POLICIES_PER_NS (10),
# DETOUR_BENCH_ENDPOINTS (50), DETOUR_BENCH_SAMPLES (100).
set -euo pipefail
# shellcheck source=../lib/test-bench.sh
source "$(dirname "$0")/../lib/test-bench.sh"
OUT="${OUT:-bench/operator/results.md}"
raw="$(mktemp)"
trap 'rm -f "$raw"' EXIT

run_test_bench operator_scale "$raw"

python3 - "$raw" "$OUT" "$RUNS" <<'PY'
import sys
sys.dont_write_bytecode = True
sys.path.insert(0, "bench/lib")
from bench_results import load, median, each as each_of, provenance, raw_results, write
raw, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = load(raw, runs)
med = lambda k: median(rows, k)
each = lambda k, scale=1.0, digits=2: each_of(rows, k, scale, digits)
r0 = rows[0]
lines = [
    "# detour operator scale benchmark",
    "",
    *provenance("bench/operator/run.sh", runs),
    "",
    f"Workload: {r0['policies']} UpstreamPolicies over {r0['namespaces']} namespaces, one Service with "
    f"{r0['endpoints_per_service']} endpoints (one EndpointSlice) per policy; the operator runs as its own "
    "release-mode process (`detour operator --leader-election=false`) against the in-memory API server over "
    "HTTP on 127.0.0.1 (server in the benchmark process, so its memory is not counted).",
    "",
    "| metric | median | target | runs |",
    "|---|---|---|---|",
    f"| first full convergence (all policies Ready with all endpoints, all ConfigMaps rendered) | {med('convergence_seconds'):.2f} s | < 10 s | {each('convergence_seconds')} |",
    f"| endpoint change → ConfigMap, p50 ({r0['propagation_samples']} sequential changes) | {med('propagation_p50_seconds')*1000:.0f} ms | | {each('propagation_p50_seconds', 1000, 0)} |",
    f"| endpoint change → ConfigMap, p99 | {med('propagation_p99_seconds')*1000:.0f} ms | < 1 s | {each('propagation_p99_seconds', 1000, 0)} |",
    f"| endpoint change → ConfigMap, max | {med('propagation_max_seconds')*1000:.0f} ms | | {each('propagation_max_seconds', 1000, 0)} |",
    f"| operator peak RSS (VmHWM) | {med('peak_rss_mib'):.1f} MiB | < 150 MiB | {each('peak_rss_mib', 1, 1)} |",
    f"| operator RSS after convergence | {med('rss_after_convergence_mib'):.1f} MiB | | {each('rss_after_convergence_mib', 1, 1)} |",
    "",
    "Propagation includes the operator's 100 ms debounce and the benchmark's 2 ms polling of the ConfigMap.",
    "",
    *raw_results(rows),
]
write(out, lines)
PY
