#!/usr/bin/env python3
"""detour's benchmark targets (issue 2), checked against the peers measured in the SAME run.

  bench/targets.py RESULTS_JSONL [--proxy detour] [--peers envoy,haproxy,nginx] [--harness-lib DIR]

RESULTS_JSONL is the harness's per-run record (bench/run.sh copies it next to the results table).
Per-run figures come from the harness's own lib/report.py (`derive`), so "client-visible errors",
"longest 2xx gap" and the paired S1 ratio mean exactly what the results table says. Medians over
the repetitions. Targets:
  S2-S5  0 client-visible errors, and no stall: the longest stretch with no successful response
         (100 ms buckets) stays under STALL_S, a quarter of the client's 2 s patience
  S1     paired throughput ratio (proxy req/s / direct req/s) >= the best peer's
  S1     p99 <= Envoy's (same upstreams, same load: what the proxy adds is what differs)
  S1     peak RSS under 20 MiB (64 connections)
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys

STALL_S = 0.5
RSS_LIMIT_MIB = 20.0


def load_report(lib):
    spec = importlib.util.spec_from_file_location("report", os.path.join(lib, "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def baseline_p99_ms(d):
    """p99 of the paired direct run made right before an S1 proxy run (raw data, if still there)."""
    path = os.path.join(d.get("rundir") or "", "baseline.json")
    try:
        return json.load(open(path))["p99_us"] / 1000
    except (OSError, ValueError, KeyError):
        return None


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_lib = os.path.join(os.path.dirname(os.environ.get("BENCH_HARNESS", "")) or
                               os.path.join(here, "..", "..", "shared", "bench"), "lib")
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--proxy", default="detour")
    p.add_argument("--peers", default="envoy,haproxy,nginx")
    p.add_argument("--harness-lib", default=default_lib)
    a = p.parse_args()
    report = load_report(a.harness_lib)

    runs = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    cells = {}
    for d in runs:
        m = report.derive(d)
        cells.setdefault((d["scenario"], d["target"]), []).append((d, m))

    def cell(scen, target, key):
        return med([m.get(key) for _, m in cells.get((scen, target), [])])

    def per_run(scen, target, key, nd):
        return " / ".join("—" if m.get(key) is None else f"{m[key]:,.{nd}f}"
                          for _, m in cells.get((scen, target), []))

    me = a.proxy
    peers = [t for t in a.peers.split(",") if t]
    out = [f"## {me}: targets against {', '.join(peers)} in the same run", "",
           "| target | " + me + " (median; per run) | peers (median) | met? |", "|---|---|---|---|"]
    verdicts = []

    def row(name, mine, theirs, ok):
        verdicts.append(ok)
        out.append(f"| {name} | {mine} | {theirs} | {'yes' if ok else ('—' if ok is None else '**no**')} |")

    for scen in ("s2", "s3", "s4", "s5"):
        if (scen, me) not in cells:
            continue
        errs, gap = cell(scen, me, "errors"), cell(scen, me, "gap")
        theirs = "; ".join(f"{t} {cell(scen, t, 'errors'):,.0f} err, gap {cell(scen, t, 'gap'):.1f} s"
                           for t in peers if (scen, t) in cells)
        row(f"{report.SCEN[scen][0]}: 0 client-visible errors, longest 2xx gap < {STALL_S} s",
            f"{errs:,.0f} err ({per_run(scen, me, 'errors', 0)}), gap {gap:.1f} s ({per_run(scen, me, 'gap', 1)})",
            theirs, errs == 0 and gap is not None and gap < STALL_S)

    if ("s1", me) in cells:
        ratio = cell("s1", me, "ratio")
        peer_ratios = {t: cell("s1", t, "ratio") for t in peers if ("s1", t) in cells}
        best = max(peer_ratios.items(), key=lambda kv: kv[1]) if peer_ratios else None
        row("S1 throughput (paired ratio to direct) >= best peer",
            f"{ratio:.2f} ({per_run('s1', me, 'ratio', 2)}), {cell('s1', me, 'rps'):,.0f} req/s",
            "; ".join(f"{t} {r:.2f} ({cell('s1', t, 'rps'):,.0f} req/s)" for t, r in peer_ratios.items())
            + (f"; best {best[0]}: {me} is {ratio / best[1]:.2f}x" if best else ""),
            ratio >= best[1] if best else None)
        # Every target in a run is measured with the same upstreams and the same load, interleaved,
        # so the difference between two proxies' p99 is the difference of what they add. The
        # paired direct run's own p99 is shown only for reference: on a loaded 2-core machine a
        # direct run's tail is dominated by scheduling noise (it can exceed the proxied runs').
        mine_p99, envoy_p99 = cell("s1", me, "p99"), cell("s1", "envoy", "p99")
        direct_p99 = med([baseline_p99_ms(d) for t in [me] + peers for d, _ in cells.get(("s1", t), [])])
        if envoy_p99 is not None:
            theirs = "; ".join(f"{t} {cell('s1', t, 'p99'):.1f} ms" for t in peers if ("s1", t) in cells)
            if direct_p99 is not None:
                theirs += f"; paired direct runs {direct_p99:.1f} ms"
            row("S1 p99 (same load, same upstreams) <= Envoy's, i.e. added p99 no worse",
                f"{mine_p99:.1f} ms ({per_run('s1', me, 'p99', 1)}); p50 {cell('s1', me, 'p50'):.2f} ms, "
                f"p99.9 {cell('s1', me, 'p999'):.1f} ms",
                theirs, mine_p99 <= envoy_p99)
        def rss_mib(t):
            return [(d.get("rss_peak_kb") or 0) / 1024 for d, _ in cells.get(("s1", t), [])]
        rss = med(rss_mib(me))
        if rss:
            row(f"S1 peak RSS at 64 connections < {RSS_LIMIT_MIB:.0f} MiB",
                f"{rss:.1f} MiB ({' / '.join(f'{r:.1f}' for r in rss_mib(me))})",
                "; ".join(f"{t} {med(rss_mib(t)):.1f} MiB" for t in peers if ("s1", t) in cells),
                rss < RSS_LIMIT_MIB)

    # The figures side by side: one column per proxy, medians over the repetitions.
    cols = [me] + peers
    out += ["", "| median of the runs | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def line(label, scen, fn):
        if any((scen, t) in cells for t in cols):
            out.append(f"| {label} | " + " | ".join(fn(t) if (scen, t) in cells else "—" for t in cols) + " |")

    def f(scen, key, nd, unit=""):
        return lambda t: f"{cell(scen, t, key):,.{nd}f}{unit}"

    line("S1 req/s ÷ paired direct req/s", "s1", f("s1", "ratio", 2))
    line("S1 req/s", "s1", f("s1", "rps", 0))
    line("S1 p50 / p99 / p99.9 ms", "s1", lambda t: " / ".join(
        f"{cell('s1', t, k):.{nd}f}" for k, nd in (("p50", 2), ("p99", 1), ("p999", 1))))
    line("S1 peak RSS", "s1", lambda t: f"{med([(d.get('rss_peak_kb') or 0) / 1024 for d, _ in cells[('s1', t)]]):.1f} MiB")
    for scen in ("s2", "s3", "s4", "s5"):
        line(f"{scen.upper()} client-visible errors (longest 2xx gap s)", scen,
             lambda t, scen=scen: f"{cell(scen, t, 'errors'):,.0f} ({cell(scen, t, 'gap'):.1f})")
        line(f"{scen.upper()} req/s, p99 ms", scen,
             lambda t, scen=scen: f"{cell(scen, t, 'rps'):,.0f}, {cell(scen, t, 'p99'):.1f}")

    la = [d.get("loadavg") for d in runs if d.get("loadavg") is not None]
    out += ["", f"Runs: {len(runs)}; 1-min load average at run start {min(la):.1f}-{max(la):.1f} "
            f"on {os.cpu_count()} cores. Met: {sum(1 for v in verdicts if v)} of {len(verdicts)}."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
