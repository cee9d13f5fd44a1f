#!/usr/bin/env python3
"""Render or lint a chart with the real Helm v4 engine (PyPI helm-python-sdk==0.2.2, which embeds
Helm as a shared library: there is no helm CLI here). Used by tests/chart_render.rs.

    helm-chart.py render CHART NAMESPACE [VALUES.yaml ...]   # manifests, `---` separated, on stdout
    helm-chart.py lint CHART NAMESPACE [VALUES.yaml ...]     # lint messages; exit 1 on any error
    helm-chart.py files CHART                                # the non-template files packaged

Values files merge left to right, as `helm -f a.yaml -f b.yaml` does. Errors (a values file the
schema refuses, a template that fails) go to stderr with exit status 1.
"""
import sys

import helm_python as helm


def merged_values(files):
    values = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            layer = helm.values_from_yaml(f.read()) or {}
        values = deep_merge(values, layer)
    return values


def deep_merge(base, layer):
    out = dict(base)
    for k, v in layer.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main(argv):
    if len(argv) == 2 and argv[0] == "files":
        for f in helm.Chart.load(argv[1]).files:
            print(f["name"])
        return 0
    if len(argv) < 3 or argv[0] not in ("render", "lint"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, chart_dir, namespace, files = argv[0], argv[1], argv[2], argv[3:]
    try:
        values = merged_values(files)
        if cmd == "lint":
            report = helm.lint(chart_dir, values, strict=True, namespace=namespace)
            for m in report.get("messages") or []:
                print(f"[{m.get('severity')}] {m.get('path')}: {m.get('error')}")
            errors = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
            errors += report.get("errors") or []
            return 1 if errors else 0
        chart = helm.Chart.load(chart_dir)
        chart.validate_schema(values)
        manifests = chart.render(values, name="detour", namespace=namespace, is_install=True)
    except helm.HelmError as e:
        print(f"helm: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for path in sorted(manifests):
        if path.endswith("NOTES.txt") or not manifests[path].strip():
            continue
        print(f"---\n# Source: {path}\n{manifests[path].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
