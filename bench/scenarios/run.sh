#!/usr/bin/env bash
# detour's own benchmark scenarios, on the shared harness (its README, "Add-on scenario folders"):
#
#   idle  The upstreams close idle keep-alive connections after IDLE_CLOSE_MS (1000: like a
#         framework with a 1 s keep-alive timeout), and the clients send bursts of POSTs with
#         unique ids about 1 s apart (IDLE_GAP_MS 900:1100), so every burst meets connections the
#         upstream is closing just then. A POST without Idempotency-Key cannot be replayed.
#         Measured: client-visible errors, and ids that reached the upstreams twice.
#   gray  One of three pods healthy but 20x slower (GRAY_FAST_MS 5 / GRAY_SLOW_MS 100). Measured:
#         the client's p90 through the proxy against the healthy pods' own p90 (the same load
#         straight to pods 1 and 2, run just before in the same set-up).
#
#   bench/scenarios/run.sh detour,envoy,haproxy,nginx idle,gray
#
# Run it through bench/run.sh, which builds detour, installs the peers and points PROXIES_DIR at
# bench/proxies:   BENCH_HARNESS=bench/scenarios/run.sh bench/run.sh detour,envoy,haproxy,nginx idle,gray
# Writes results-<date>-<proxies>-<scenarios>[-TAG].md (the table of bench/scenarios/report.py)
# to BENCH_OUT; raw data (id logs, loadgen JSON, proxy logs, detour's /metrics) under BENCH_RAW.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=${BENCH_DIR:-$(cd "$HERE/../../../shared/bench" 2>/dev/null && pwd || true)}
[ -f "$BENCH_DIR/lib/harness.sh" ] || { echo "shared harness not found: set BENCH_DIR" >&2; exit 1; }
# shellcheck source=/dev/null
source "$BENCH_DIR/lib/harness.sh"

IDLE_CLOSE_MS=${IDLE_CLOSE_MS:-1000}
IDLE_GAP_MS=${IDLE_GAP_MS:-900:1100}
IDLE_CONNS=${IDLE_CONNS:-32}
IDLE_DURATION=${IDLE_DURATION:-20}
GRAY_FAST_MS=${GRAY_FAST_MS:-5}
GRAY_SLOW_MS=${GRAY_SLOW_MS:-100}
GRAY_DURATION=${GRAY_DURATION:-10}
ALL_SCENARIOS="idle gray"
RESULTS_HOME=${RESULTS_HOME:-$HERE/../results}

# idle: POST bursts against upstreams that close idle connections after IDLE_CLOSE_MS.
scenario_idle() {
  new_rundir idle
  local i url targets="" dup seen
  for ((i = 1; i <= N_UPSTREAMS; i++)); do
    start_upstream "$i" --mode healthy --idle-close-ms "$IDLE_CLOSE_MS" \
      --id-header x-bench-id --id-log "$RUNDIR/ids-upstream$i.log"
  done
  wait_upstreams 1 2 3
  start_proxy
  url="http://$LOOPBACK:$PROXY_PORT/"
  if [ "$PROXY_NAME" = direct ]; then url="http://$LOOPBACK:$(up_port 1)/"; targets=$(upstreams_csv); fi
  run_loadgen "$RUNDIR/wrk.json" "$IDLE_CONNS" "$IDLE_DURATION" "$url" "$targets" \
    --method POST --body-bytes 256 --id-header x-bench-id --ids-out "$RUNDIR/ids-client.txt" \
    --burst-gap-ms "$IDLE_GAP_MS"
  stop_all # the upstreams flush their id logs on SIGTERM
  dup=$(cat "$RUNDIR"/ids-upstream*.log | sort | uniq -d | wc -l)
  seen=$(cat "$RUNDIR"/ids-upstream*.log | wc -l)
  record idle "close-${IDLE_CLOSE_MS}ms-post-bursts" "$RUNDIR/wrk.json" dup_ids="$dup" ids_seen="$seen"
  finish_run
}

# gray: pod 3 answers 20x slower than pods 1 and 2; all three stay healthy.
scenario_gray() {
  new_rundir gray
  start_upstream 1 --mode slow --delay-ms "$GRAY_FAST_MS"
  start_upstream 2 --mode slow --delay-ms "$GRAY_FAST_MS"
  start_upstream 3 --mode slow --delay-ms "$GRAY_SLOW_MS"
  wait_upstreams 1 2 3
  start_proxy
  # The healthy pods' own latency under the same load: straight to pods 1 and 2.
  run_loadgen "$RUNDIR/healthy.json" "$WRK_CONNS" "$GRAY_DURATION" "http://$LOOPBACK:$(up_port 1)/" \
    "$LOOPBACK:$(up_port 1),$LOOPBACK:$(up_port 2)"
  local healthy_p90
  healthy_p90=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["p90_us"] / 1000)' "$RUNDIR/healthy.json")
  sleep 1
  if [ "$PROXY_NAME" = direct ]; then
    run_loadgen "$RUNDIR/wrk.json" "$WRK_CONNS" "$GRAY_DURATION" "http://$LOOPBACK:$(up_port 1)/" "$(upstreams_csv)"
  else
    run_loadgen "$RUNDIR/wrk.json" "$WRK_CONNS" "$GRAY_DURATION" "http://$LOOPBACK:$PROXY_PORT/"
  fi
  record gray "pod3-${GRAY_SLOW_MS}ms-vs-${GRAY_FAST_MS}ms" "$RUNDIR/wrk.json" healthy_p90_ms="$healthy_p90"
  finish_run
}

bench_setup "${1:-detour,envoy,haproxy,nginx}" "${2:-all}"
bench_loop
md=$(results_md)
python3 "$HERE/report.py" "$RESULTS_JSONL" --harness-lib "$BENCH_DIR/lib" \
  --title "detour scenarios, $(date '+%F %H:%M'), $(nproc) cores, 127.0.0.1, REPS=$REPS" | tee "$md"
log "table written to $md; raw data in $RUN_ROOT"
