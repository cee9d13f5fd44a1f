#!/usr/bin/env python3
"""Plots the detour dashboard's panels from a real Prometheus run, for the README.

The data is what `tests/observability_prometheus.rs` got from Prometheus when it ran every query
of charts/detour/dashboards/detour.json over its run (a sidecar under failing and rescued
traffic). This is not a Grafana screenshot: no Grafana server is involved, only the dashboard's
own queries on real data, drawn with matplotlib.

    DETOUR_OBS_DUMP=$PWD/target/obs/dashboard-queries.json DETOUR_OBS_SECS=75 \\
        cargo test --test observability_prometheus
    python3 -m pip install -r scripts/dashboard-plot/requirements.txt
    python3 scripts/dashboard-plot/plot.py target/obs/dashboard-queries.json docs/img/dashboard.png
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The panels drawn, in the dashboard's order (title prefixes); the rest need an operator.
PANELS = [
    "Gateway errors (share",
    "Rescued by a retry",
    "Requests per second",
    "Latency p50",
    "Gateway errors detour answered",
    "Gateway errors the upstream sent",
    "Failed attempts by cause",
    "Upstream pods behind failed attempts",
    "Endpoints by state",
    "Retries by the failure",
    "Retries refused",
]


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "").strip()


def main(src, dst):
    doc = json.load(open(src))
    start = doc["start"]
    panels = {p["title"]: p for p in doc["panels"]}
    chosen = []
    for prefix in PANELS:
        chosen += [p for t, p in panels.items() if t.startswith(prefix)][:1]
    cols = 3
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.1))
    for ax, p in zip(axes.flat, chosen):
        ax.set_title(p["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        if p["type"] == "table":
            rows_ = []
            for t in p["targets"]:
                for r in t["result"]:
                    m = r["metric"]
                    rows_.append([m.get("upstream_pod", ""), m.get("upstream", ""),
                                  m.get("cause", ""), f"{r['value']:.0f}"])
            ax.axis("off")
            if rows_:
                tab = ax.table(cellText=rows_[:8], colLabels=["pod", "upstream", "cause", "failed"],
                               loc="center", cellLoc="left")
                tab.auto_set_font_size(False)
                tab.set_fontsize(7)
            continue
        ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
        for t in p["targets"]:
            for series in t["result"]:
                xs = [float(v[0]) - start for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                # Grafana draws the series that stay at 0 too; here they would only crowd the
                # legend.
                if not any(ys):
                    continue
                ax.plot(xs, ys, label=legend(t["legendFormat"], series["metric"]), linewidth=1.2)
        unit = p.get("unit") or ""
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        elif unit:
            ax.set_ylabel(unit, fontsize=7)
        ax.set_xlabel("seconds into the run", fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(
        "detour dashboard: the dashboard's queries on real data, not a Grafana screenshot\n"
        "(a real Prometheus scraping a sidecar: shop/pay has a pod answering 502, shop/gone's "
        "endpoints refuse connections)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(dst, dpi=90)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
