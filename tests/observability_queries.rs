//! The dashboard (`charts/detour/dashboards/detour.json`) and the alert rules
//! (`charts/detour/rules/detour-rules.yaml`) checked without a Prometheus: every expression parses,
//! names only metrics and labels a running sidecar and the operator export (read from their
//! `/metrics` text, not from a list kept here), reads counters only through `rate`/`increase`,
//! and groups on every label its legend or description shows; the dashboard follows Grafana's
//! provisioning conventions; the rules pass `promtool check rules` and `promtool test rules`
//! (one unit test file per alert plus one of healthy traffic, in `charts/detour/rules/tests/`).
#![forbid(unsafe_code)]

#[path = "support/promql.rs"]
mod promql;
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use promql::{check, legend_labels, substitute, ungrouped, Catalog, DASHBOARD, RULES};
use serde_json::Value;
use support::{
    eventually,
    sidecar::{fast_policy, Fault, Harness},
    PATIENCE,
};

/// What the sidecar and the operator export: a sidecar whose endpoint failed (so the lazily
/// created per-endpoint series exist) and an operator registry that counted once.
async fn exported() -> Catalog {
    let mut p = fast_policy();
    p.outlier_detection.consecutive_gateway_errors = 1;
    let h = Harness::start(2, p).await;
    h.fail_pod0_until_it_is_asked(Fault::Always502).await;
    // A config source's gauges appear once the sidecar follows one: a file holding its config
    // (one file per sidecar: the tests of this file run at the same time).
    let file = std::env::temp_dir().join(format!(
        "detour-obs-{}-{}.yaml",
        std::process::id(),
        h.sidecar.admin_addr().port()
    ));
    std::fs::write(&file, h.config().to_yaml()).unwrap();
    let follow = h.sidecar.follow(detour::sidecar::ConfigSource::File {
        path: file.clone(),
        interval: std::time::Duration::from_millis(50),
    });
    eventually(PATIENCE, "the config source's gauges", || {
        (h.sidecar
            .metrics_text()
            .contains("detour_config_source_connected{"))
        .then_some(())
    })
    .await;
    follow.abort();
    let _ = std::fs::remove_file(&file);
    let sidecar = h.sidecar.metrics_text();
    let operator = detour::operator::Metrics::new();
    operator.reconciled("ok", 0.01);
    operator.rendered("applied");
    operator.status_patched("ok");
    let operator = operator.text();
    let catalog = Catalog::from_exposition(&[&sidecar, &operator]);
    assert!(
        catalog
            .series
            .get("detour_endpoint_attempt_failures_total")
            .is_some_and(|(_, l)| l.contains("upstream_pod")),
        "{sidecar}"
    );
    catalog
}

fn rules() -> serde_json::Value {
    support::yaml::from_str(&std::fs::read_to_string(RULES).expect("rules file")).expect("YAML")
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard")).expect("JSON")
}

/// Every rule of the file: (group, rule).
fn each_rule(rules: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        let name = g["name"].as_str().expect("group name").to_string();
        for r in g["rules"].as_array().expect("rules") {
            out.push((name.clone(), r.clone()));
        }
    }
    out
}

/// Adds the file's recording rules to the catalog (in order: a rule may use an earlier one).
fn with_recorded(mut cat: Catalog, rules: &serde_json::Value) -> Catalog {
    for (_, r) in each_rule(rules) {
        if let Some(name) = r["record"].as_str() {
            let c = check(r["expr"].as_str().expect("expr"), &cat);
            assert!(c.problems.is_empty(), "{name}: {:?}", c.problems);
            let labels = c
                .grouped
                .unwrap_or_else(|| panic!("{name} is not aggregated"));
            cat.add_recorded(name, labels);
        }
    }
    cat
}

// === alerts ===

#[tokio::test]
async fn every_alert_expression_and_description_uses_what_detour_exports() {
    let rules = rules();
    let cat = with_recorded(exported().await, &rules);
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .expect("docs/observability.md");
    let uid = dashboard()["uid"].as_str().expect("uid").to_string();
    let mut problems = Vec::new();
    let mut alerts = BTreeSet::new();
    for (group, r) in each_rule(&rules) {
        let Some(alert) = r["alert"].as_str() else {
            continue;
        };
        alerts.insert(alert.to_string());
        let mut bad = |what: String| problems.push(format!("{group}/{alert}: {what}"));
        if !alert.starts_with("Detour") {
            bad("alert names start with Detour".into());
        }
        let sev = r["labels"]["severity"].as_str().unwrap_or_default();
        if !matches!(sev, "critical" | "warning") {
            bad(format!("severity {sev:?} is not critical or warning"));
        }
        let c = check(r["expr"].as_str().expect("expr"), &cat);
        for p in &c.problems {
            bad(p.clone());
        }
        let a = &r["annotations"];
        for key in ["summary", "description", "runbook_url", "dashboard_url"] {
            if a[key].as_str().is_none_or(str::is_empty) {
                bad(format!("no {key}"));
            }
        }
        if a["summary"].as_str().unwrap_or_default().contains("{{") {
            bad("the summary is static; values go in the description".into());
        }
        // `$labels` holds the expression's labels only (not the rule's own `labels:`).
        let templated = format!(
            "{} {}",
            a["description"].as_str().unwrap_or_default(),
            a["dashboard_url"].as_str().unwrap_or_default()
        );
        let used = labels_used(&templated);
        if !used.contains("namespace") {
            bad("the description does not name the namespace".into());
        }
        for l in &used {
            if !c.grouped.as_ref().is_some_and(|g| g.contains(l)) {
                bad(format!(
                    "$labels.{l} is not a label of the expression's result"
                ));
            }
        }
        // Queries inside the description (`query (printf "...")`) are checked the same way.
        for q in template_queries(&templated) {
            for p in check(&q, &cat).problems {
                bad(format!("description query {q}: {p}"));
            }
        }
        let link = a["dashboard_url"].as_str().unwrap_or_default();
        if !link.starts_with(&format!("/d/{uid}/")) {
            bad(format!(
                "dashboard_url {link} is not the dashboard (uid {uid})"
            ));
        }
        let anchor = a["runbook_url"]
            .as_str()
            .and_then(|u| u.split_once("docs/observability.md#"))
            .map(|(_, a)| a.to_string())
            .unwrap_or_default();
        if anchor != alert.to_lowercase() || !docs.contains(&format!("### {alert}\n")) {
            bad(format!(
                "runbook_url must point at the '### {alert}' section of docs/observability.md"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for want in [
        "DetourErrorBudgetBurn",
        "DetourUpstreamPodFailing",
        "DetourNoEligibleEndpoint",
        "DetourRetryBudgetExhausted",
        "DetourRetriesHidingFailures",
        "DetourConfigHashesDiffer",
        "DetourOperatorReconcileErrors",
        "DetourOperatorNoLeader",
    ] {
        assert!(alerts.contains(want), "no alert {want}: {alerts:?}");
    }
}

/// The burn-rate alerts: the SRE workbook's four (long, short, factor, for) pairs, every
/// threshold the same SLO.
#[test]
fn burn_rate_alerts_are_multi_window_on_one_slo() {
    let rules = rules();
    let mut seen = BTreeMap::new();
    for (_, r) in each_rule(&rules) {
        if r["alert"].as_str() != Some("DetourErrorBudgetBurn") {
            continue;
        }
        let long = r["labels"]["long"].as_str().expect("long").to_string();
        let short = r["labels"]["short"].as_str().expect("short").to_string();
        let expr = r["expr"].as_str().expect("expr");
        for w in [&long, &short] {
            assert!(
                expr.contains(&format!("detour:gateway_errors:ratio_rate{w} > (")),
                "{expr}"
            );
        }
        let factors: BTreeSet<&str> = expr
            .match_indices(" > (")
            .map(|(i, _)| {
                let rest = &expr[i + 4..];
                rest[..rest.find(')').expect(")")].trim()
            })
            .collect();
        assert_eq!(factors.len(), 1, "both windows share a threshold: {expr}");
        let f = factors.into_iter().next().unwrap().to_string();
        seen.insert(
            (long, short),
            (
                f,
                r["for"].as_str().unwrap_or_default().to_string(),
                r["labels"]["severity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
        );
    }
    let want = [
        ("1h", "5m", "14.4 * 0.001", "2m", "critical"),
        ("6h", "30m", "6 * 0.001", "15m", "critical"),
        ("1d", "2h", "3 * 0.001", "1h", "warning"),
        ("3d", "6h", "1 * 0.001", "3h", "warning"),
    ];
    assert_eq!(seen.len(), want.len(), "{seen:?}");
    for (l, s, f, d, sev) in want {
        assert_eq!(
            seen.get(&(l.to_string(), s.to_string())),
            Some(&(f.to_string(), d.to_string(), sev.to_string())),
            "{l}/{s}"
        );
    }
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = Command::new(&promtool)
        .args(["check", "rules", RULES])
        .output()
        .expect("run promtool");
    assert!(out.status.success(), "{}", output(&out));
    let dir = Path::new(RULES).parent().unwrap().join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("rules/tests")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .args(&files)
        .output()
        .expect("run promtool");
    assert!(out.status.success(), "{}", output(&out));

    // One file fires each alert; healthy.yaml holds every alert silent.
    let rules = rules();
    let alerts: BTreeSet<String> = each_rule(&rules)
        .iter()
        .filter_map(|(_, r)| r["alert"].as_str().map(str::to_string))
        .collect();
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for f in &files {
        let t: serde_json::Value =
            support::yaml::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let healthy = f.file_name().unwrap() == "healthy.yaml";
        for case in t["tests"].as_array().unwrap() {
            for a in case["alert_rule_test"].as_array().into_iter().flatten() {
                let name = a["alertname"].as_str().unwrap().to_string();
                let firing = a["exp_alerts"].as_array().is_some_and(|v| !v.is_empty());
                if healthy {
                    assert!(!firing, "healthy.yaml expects {name} to fire");
                    silent.insert(name);
                } else if firing {
                    fired.insert(name);
                }
            }
        }
    }
    assert_eq!(fired, alerts, "alerts without a test that fires them");
    assert_eq!(silent, alerts, "alerts healthy.yaml does not check");
}

// === dashboard ===

#[tokio::test]
async fn every_dashboard_query_uses_what_detour_exports_and_groups_its_legend() {
    let d = dashboard();
    let cat = exported().await;
    let mut problems = Vec::new();
    let mut queries = 0;
    for (title, target) in targets(&d) {
        let expr = target["expr"].as_str().expect("expr");
        let c = check(&substitute(expr, "5m"), &cat);
        queries += 1;
        for p in &c.problems {
            problems.push(format!("{title}: {p}\n  {expr}"));
        }
        let legend = legend_labels(target["legendFormat"].as_str().unwrap_or_default());
        for l in ungrouped(&legend, &c) {
            problems.push(format!("{title}: legend label {l} is not grouped on"));
        }
        if target["format"] == "table" {
            // A table's columns are the labels: all of them come from a `by`.
            if c.grouped.is_none() {
                problems.push(format!("{title}: a table query must aggregate"));
            }
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        let Some(expr) = a["expr"].as_str() else {
            continue;
        };
        let name = a["name"].as_str().unwrap_or_default();
        let c = check(&substitute(expr, "1m"), &cat);
        problems.extend(c.problems.iter().map(|p| format!("annotation {name}: {p}")));
        for key in ["titleFormat", "textFormat"] {
            let legend = legend_labels(a[key].as_str().unwrap_or_default());
            for l in ungrouped(&legend, &c) {
                problems.push(format!("annotation {name}: {l} is not grouped on"));
            }
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        let Some(def) = v["definition"].as_str() else {
            continue;
        };
        // label_values(selector, label)
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: {def}", v["name"]));
        let (sel, label) = inner.rsplit_once(',').expect("label_values(sel, label)");
        let sel = substitute(sel.trim(), "5m");
        let metric = sel.split('{').next().unwrap().trim();
        // A bare selector of a counter is fine here: only its label values are read.
        let c = check(
            &format!("sum by ({}) (rate({sel}[5m]))", label.trim()),
            &cat,
        );
        problems.extend(
            c.problems
                .iter()
                .map(|p| format!("variable {}: {metric}: {p}", v["name"])),
        );
    }
    assert!(queries >= 20, "only {queries} queries found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_follows_grafana_provisioning_conventions() {
    let d = dashboard();
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    assert_eq!(d["uid"], "detour-upstreams", "the uid is what links use");
    assert!(d.get("__inputs").is_none() && !text.contains("${DS_"));
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for want in ["datasource", "namespace", "upstream"] {
        assert!(vars.contains(&want), "no ${want} variable: {vars:?}");
    }
    let ds = &d["templating"]["list"][0];
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );

    let want_ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let mut rows = Vec::new();
    let mut ids = BTreeSet::new();
    for (row, p) in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id: {title}"
        );
        let ty = p["type"].as_str().unwrap();
        if ty == "row" {
            rows.push((title.to_string(), p["collapsed"] == true));
            continue;
        }
        // Angular panels are gone from Grafana 11.
        assert!(
            matches!(ty, "timeseries" | "table" | "stat" | "bargauge" | "text"),
            "{title}: panel type {ty}"
        );
        assert_eq!(p["datasource"], want_ds, "{title}");
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"], want_ds, "{title}");
        }
        let desc = p["description"].as_str().unwrap_or_default();
        assert!(
            desc.len() >= 80,
            "{title}: a newcomer needs a description to act on"
        );
        assert!(!row.is_empty(), "{title} is outside a row");
    }
    let titles: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    for (i, want) in [
        "What users saw",
        "Why",
        "Who",
        "Retries",
        "Config and operator",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            titles.get(i).is_some_and(|t| t.starts_with(want)),
            "rows: {titles:?}"
        );
    }
    assert_eq!(
        rows.last().map(|r| r.1),
        Some(true),
        "config and operator is collapsed"
    );
    // Annotations: ejections and config changes.
    let names: Vec<&str> = d["annotations"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["expr"].as_str().and(a["name"].as_str()))
        .collect();
    assert_eq!(names, ["Ejections", "Config changes"]);
    // The who table links each pod to this dashboard filtered to it.
    let (_, table) = panels(&d)
        .into_iter()
        .find(|(_, p)| p["type"] == "table")
        .expect("a table");
    let links = table["fieldConfig"]["overrides"].to_string();
    assert!(
        links.contains("/d/detour-upstreams/")
            && links.contains("var-upstream_pod=${__data.fields.upstream_pod}"),
        "{links}"
    );
}

// === helpers ===

/// (row title, panel) for every panel, the collapsed rows' nested ones included.
fn panels(d: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut row = String::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap_or_default().to_string();
            out.push((row.clone(), p.clone()));
            for inner in p["panels"].as_array().into_iter().flatten() {
                out.push((row.clone(), inner.clone()));
            }
        } else {
            out.push((row.clone(), p.clone()));
        }
    }
    out
}

/// (panel title, target) of every query.
fn targets(d: &Value) -> Vec<(String, Value)> {
    panels(d)
        .into_iter()
        .flat_map(|(_, p)| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t))
        })
        .collect()
}

/// `$labels.x` names in a Prometheus template.
fn labels_used(template: &str) -> BTreeSet<String> {
    template
        .match_indices("$labels.")
        .map(|(i, m)| {
            template[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The PromQL of `query (printf "..." args)` in a template, with `%q`/`%s` filled in.
fn template_queries(template: &str) -> Vec<String> {
    template
        .match_indices("query (printf \"")
        .map(|(i, m)| {
            let rest = &template[i + m.len()..];
            let end = rest.find("\" ").expect("end of the printf format");
            rest[..end].replace("%q", "\"x\"").replace("%s", "5m")
        })
        .collect()
}

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = format!(
            "{name} must be on PATH (apt-get install -y prometheus; `bash .ci/test` installs it)"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The checker itself: each rule it enforces, caught on a bad expression.
#[test]
fn the_checks_catch_what_they_are_for() {
    let cat = Catalog::from_exposition(&[concat!(
        "# TYPE detour_requests_total counter\n",
        "detour_requests_total{upstream=\"a\",status=\"200\"} 1\n",
        "# TYPE detour_endpoints gauge\n",
        "detour_endpoints{upstream=\"a\",state=\"healthy\"} 1\n",
        "# TYPE detour_request_duration_seconds histogram\n",
        "detour_request_duration_seconds_bucket{upstream=\"a\",le=\"+Inf\"} 1\n",
    )]);
    let problems = |e: &str| check(e, &cat).problems;
    let good = "sum by (namespace, upstream) (rate(detour_requests_total{upstream=~\"a\"}[5m]))";
    assert!(problems(good).is_empty(), "{:?}", problems(good));
    for (bad, why) in [
        ("sum(rate(detour_requests_total[5m]", "does not parse"),
        ("sum by (upstream) (detour_requests_total)", "is a counter"),
        (
            "sum by (le) (detour_request_duration_seconds_bucket)",
            "is a counter",
        ),
        (
            "sum(rate(detour_request_total[5m]))",
            "not a metric detour exports",
        ),
        (
            "sum(rate(detour_requests_total{endpoint_pod=\"x\"}[5m]))",
            "has no label endpoint_pod",
        ),
        (
            "sum by (cause) (rate(detour_requests_total[5m]))",
            "no series here has that label",
        ),
        (
            "sum without (status) (rate(detour_requests_total[5m]))",
            "by (...) instead",
        ),
    ] {
        let p = problems(bad);
        assert!(p.iter().any(|p| p.contains(why)), "{bad}: {p:?}");
    }
    // Legends: a label the query does not group on is reported.
    let c = check("sum by (upstream) (detour_endpoints)", &cat);
    let legend = legend_labels("{{upstream}} {{state}}");
    assert_eq!(ungrouped(&legend, &c), ["state"]);
    let c = check(
        "histogram_quantile(0.9, sum by (upstream, le) (rate(detour_request_duration_seconds_bucket[5m])))",
        &cat,
    );
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    assert_eq!(c.grouped, Some(BTreeSet::from(["upstream".to_string()])));
    assert_eq!(
        substitute(
            "rate(x{a=~\"$namespace\",b=~\"${upstream}\"}[$__rate_interval])",
            "1m"
        ),
        "rate(x{a=~\".*\",b=~\".*\"}[1m])"
    );
}
