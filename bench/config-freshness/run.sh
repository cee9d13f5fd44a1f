#!/usr/bin/env bash
# Freshness of config delivery through the Kubernetes API (`detour sidecar --config-source
# kubernetes`): the in-memory API server (tests/support) over HTTP on 127.0.0.1, the operator,
# DETOUR_BENCH_SIDECARS (10) sidecar processes watching `detour-config`, DETOUR_BENCH_SAMPLES
# (200) EndpointSlice changes; times each change until every sidecar serves it, and compares a
# sidecar's memory in kubernetes mode with the same config from a file. Release build; runs RUNS
# times (default 3) and writes the medians to bench/config-freshness/results.md.
set -euo pipefail
# shellcheck source=../lib/test-bench.sh
source "$(dirname "$0")/../lib/test-bench.sh"
OUT="${OUT:-bench/config-freshness/results.md}"
raw="$(mktemp)"
trap 'rm -f "$raw"' EXIT

run_test_bench config_freshness "$raw"

python3 - "$raw" "$OUT" "$RUNS" <<'PY'
import sys
sys.dont_write_bytecode = True
sys.path.insert(0, "bench/lib")
from bench_results import load, median, each as each_of, provenance, raw_results, write
raw, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = load(raw, runs)
med = lambda k: median(rows, k)
each = lambda k, scale=1.0, digits=1: each_of(rows, k, scale, digits)
r0 = rows[0]
diff = med("rss_kubernetes_mib") - med("rss_file_mib")
lines = [
    "# Config freshness through the API",
    "",
    *provenance("bench/config-freshness/run.sh", runs),
    "",
    f"Workload: {r0['sidecars']} `detour sidecar --config-source kubernetes` processes (release build), each "
    f"serving its own UpstreamPolicy of one Service with {r0['endpoints']} endpoints, watching `detour-config` "
    "of the in-memory API server over HTTP on 127.0.0.1; the operator runs in the benchmark process "
    f"(100 ms debounce). {r0['samples']} samples: one endpoint turns terminating in the EndpointSlice; the time "
    "runs until every sidecar's `/endpoints` reports it (polled every 2 ms; the sample then waits for all "
    "to see it ready again).",
    "",
    "| metric | median | target | runs |",
    "|---|---|---|---|",
    f"| EndpointSlice change → every sidecar serving it, p50 | {med('p50_seconds')*1000:.0f} ms | | {each('p50_seconds', 1000, 0)} |",
    f"| EndpointSlice change → every sidecar serving it, p99 | {med('p99_seconds')*1000:.0f} ms | < 1 s | {each('p99_seconds', 1000, 0)} |",
    f"| EndpointSlice change → every sidecar serving it, max | {med('max_seconds')*1000:.0f} ms | | {each('max_seconds', 1000, 0)} |",
    f"| sidecar RSS, `--config-source kubernetes` | {med('rss_kubernetes_mib'):.1f} MiB | | {each('rss_kubernetes_mib')} |",
    f"| sidecar RSS, same config from a file | {med('rss_file_mib'):.1f} MiB | | {each('rss_file_mib')} |",
    f"| difference | {diff:+.1f} MiB | within 5 MiB | |",
    f"| peak RSS (VmHWM) after the run, kubernetes / file | {med('peak_kubernetes_mib'):.1f} / {med('peak_file_mib'):.1f} MiB | | |",
    "",
    "Propagation includes the operator's 100 ms debounce. RSS is read from /proc after both sidecars are "
    "ready and idle for 1 s (no traffic).",
    "",
    *raw_results(rows),
]
write(out, lines)
PY
