# detour plugin for the shared reverse-proxy benchmark harness (sourced by its lib/harness.sh;
# see its README "Adding a proxy"). bench/run.sh builds the binary and points PROXIES_DIR here.
#
# DETOUR_BIN            the binary (default: <repo>/target/release/detour, what bench/run.sh builds)
# DETOUR_BENCH_SCRAPE   1 (default): save the sidecar's /metrics every second (S2-S5) to {RUNDIR}/metrics.txt
#                       (the last one survives the run: retries, ejections, absorbed errors); 0: off
# DETOUR_BENCH_LOG      RUST_LOG for the sidecar (default info: ejections and health changes only)
DETOUR_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
DETOUR_BIN=${DETOUR_BIN:-$DETOUR_REPO/target/release/detour}
[ -x "$DETOUR_BIN" ] ||
  PROXY_MISSING="detour not built at $DETOUR_BIN: run bench/run.sh (cargo build --release --locked) or set DETOUR_BIN"

# Admin server (metrics) on a free loopback port, picked afresh for every run.
DETOUR_ADMIN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

PROXY_CONF_TEMPLATE=sidecar.yaml.tmpl
PROXY_UPSTREAM_LINE='  - { address: "{HOST}:{PORT}", pod: upstream{IDX} }'
PROXY_CHECK_CMD="'$DETOUR_BIN' check --config {CONF}"
# `env` execs the sidecar, so the harness's PID (SIGTERM, memory samples) is detour itself.
# Worker threads = the harness's THREADS (2), as haproxy nbthread / nginx worker_processes / envoy
# --concurrency. The harness allows 5 s between SIGTERM and SIGKILL: drain for at most 3.
PROXY_CMD="env RUST_LOG=${DETOUR_BENCH_LOG:-info} NO_COLOR=1 '$DETOUR_BIN' sidecar --config {CONF} --admin 127.0.0.1:$DETOUR_ADMIN_PORT --threads {THREADS} --drain-timeout 3s"
PROXY_VERSION_CMD="'$DETOUR_BIN' --version"
PROXY_WARMUP_S=2
# A bounded background scraper, started before the sidecar: it waits for the admin port (at most
# 30 s), then keeps the latest /metrics in the run folder, and ends once the port has gone away (at
# most 10 min in all). Off in S1: the throughput run gets no extra process spawns the peers do not.
if [ "${DETOUR_BENCH_SCRAPE:-1}" = 1 ] && command -v curl >/dev/null; then
  PROXY_PREPARE="case {RUNDIR} in */s1-*) exit 0 ;; esac
    ( up=0; for i in \$(seq 1 600); do
      if curl -fsS -m 1 -o {RUNDIR}/metrics.tmp http://127.0.0.1:$DETOUR_ADMIN_PORT/metrics 2>/dev/null; then
        mv {RUNDIR}/metrics.tmp {RUNDIR}/metrics.txt; up=1
      elif [ \$up = 1 ] || [ \$i -gt 30 ]; then break; fi
      sleep 1
    done ) </dev/null >/dev/null 2>&1 &"
fi
