#!/usr/bin/env python3
"""The table of detour's own scenarios (bench/scenarios/run.sh), medians over repetitions.

  report.py RESULTS_JSONL [--harness-lib DIR] [--title TEXT]

idle  client-visible errors (the harness's own count: non-2xx, socket errors, client timeouts)
      and ids seen more than once at the upstreams (a request sent twice). Target: 0 and 0.
gray  client p50 / p90 / p99 through the proxy, the healthy pods' own p90 (same load straight to
      them, just before), and p90 / healthy p90. Target: at most 1.5.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from targets import load_report, med  # noqa: E402  (bench/targets.py: the same harness hooks)

GRAY_LIMIT = 1.5


def per_run(xs, fmt):
    return " / ".join(fmt(x) for x in xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--harness-lib", default=os.path.join(here, "..", "..", "..", "shared", "bench", "lib"))
    ap.add_argument("--title", default="detour scenarios")
    a = ap.parse_args()
    rep = load_report(a.harness_lib)
    runs = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    order = []
    for r in runs:
        if r["target"] not in order:
            order.append(r["target"])
    out = [f"# {a.title}", ""]
    idle = [r for r in runs if r["scenario"] == "idle"]
    if idle:
        out += ["## idle: upstreams close idle keep-alive connections after ~1 s; POST bursts ~1 s apart", "",
                "| proxy | client-visible errors | ids seen twice at the upstreams | POSTs sent | per run: errors (dup ids) | target 0 / 0 |",
                "|---|---:|---:|---:|---|---|"]
        for t in order:
            rs = [r for r in idle if r["target"] == t]
            if not rs:
                continue
            errs = [rep.derive(r)["errors"] for r in rs]
            dups = [r.get("dup_ids") or 0 for r in rs]
            sent = [r["requests"] + rep.derive(r)["sock"] + (r.get("err_timeout") or 0) for r in rs]
            ok = all(e == 0 for e in errs) and all(d == 0 for d in dups)
            out.append(f"| {t} | {med(errs):g} | {med(dups):g} | {med(sent):g} | "
                       f"{' / '.join(f'{e} ({d})' for e, d in zip(errs, dups))} | {'met' if ok else 'not met'} |")
        out.append("")
    gray = [r for r in runs if r["scenario"] == "gray"]
    if gray:
        out += ["## gray: pod 3 healthy but 20x slower", "",
                "| proxy | p50 ms | p90 ms | p99 ms | healthy pods' p90 ms | p90 ÷ healthy p90 (per run) | errors | target ≤ 1.5 |",
                "|---|---:|---:|---:|---:|---|---:|---|"]
        for t in order:
            rs = [r for r in gray if r["target"] == t]
            if not rs:
                continue
            ratios = [(r["p90_us"] / 1000) / r["healthy_p90_ms"] if r.get("healthy_p90_ms") else None for r in rs]
            m = med(ratios)
            out.append(
                f"| {t} | {med([r['p50_us'] / 1000 for r in rs]):.2f} | {med([r['p90_us'] / 1000 for r in rs]):.2f} | "
                f"{med([r['p99_us'] / 1000 for r in rs]):.1f} | {med([r.get('healthy_p90_ms') for r in rs]):.2f} | "
                f"{m:.2f} ({per_run(ratios, lambda x: f'{x:.2f}')}) | {med([rep.derive(r)['errors'] for r in rs]):g} | "
                f"{'met' if m is not None and m <= GRAY_LIMIT else 'not met'} |")
        out.append("")
    loads = [r.get("loadavg") for r in runs if r.get("loadavg") is not None]
    if loads:
        out.append(f"1-minute load average at run starts: {min(loads)}-{max(loads)} on a 2-core machine shared "
                   "with other engineers' builds.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
