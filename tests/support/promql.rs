//! Checks on the PromQL of the dashboard (`charts/detour/dashboards/`) and the rules
//! (`charts/detour/rules/`): every expression parses (crates.io `promql-parser`, Grafana variables
//! substituted first), names only metrics and labels detour exports, reads counters and histogram
//! buckets only through `rate`/`increase`, and groups on every label its legend or annotation
//! shows. Included with `#[path]` by the tests that need it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::label::Labels;
use promql_parser::parser::{
    self, AggregateExpr, BinaryExpr, Call, Expr, LabelModifier, VectorMatchCardinality,
    VectorSelector,
};

pub const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/detour/dashboards/detour.json"
);
pub const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/detour/rules/detour-rules.yaml"
);

/// Labels Prometheus (and the Prometheus Operator's monitors) attach to every scraped series.
pub const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "container",
    "endpoint",
    "service",
    "instance",
    "job",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// `_bucket`, `_sum` and `_count` of a histogram: counters too.
    HistogramPart,
    /// A recording rule's output.
    Recorded,
}

/// What detour exports: series name -> (kind, labels).
#[derive(Debug, Default)]
pub struct Catalog {
    pub series: BTreeMap<String, (Kind, BTreeSet<String>)>,
}

impl Catalog {
    /// From Prometheus text exposition (`# TYPE` lines give the kinds, samples the labels).
    pub fn from_exposition(texts: &[&str]) -> Catalog {
        let mut types = BTreeMap::new();
        let mut series: BTreeMap<String, (Kind, BTreeSet<String>)> = BTreeMap::new();
        for text in texts {
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let mut it = rest.split_whitespace();
                    if let (Some(n), Some(t)) = (it.next(), it.next()) {
                        types.insert(n.to_string(), t.to_string());
                    }
                    continue;
                }
                if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                }
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = &line[..name_end];
                let labels = sample_labels(&line[name_end..]);
                let kind = match types.get(name).map(String::as_str) {
                    Some("counter") => Kind::Counter,
                    Some("gauge") => Kind::Gauge,
                    _ => {
                        let base = ["_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|s| name.strip_suffix(s));
                        match base.and_then(|b| types.get(b)).map(String::as_str) {
                            Some("histogram") => Kind::HistogramPart,
                            other => panic!("{name}: unexpected metric type {other:?}"),
                        }
                    }
                };
                series
                    .entry(name.to_string())
                    .or_insert_with(|| (kind, BTreeSet::new()))
                    .1
                    .extend(labels);
            }
        }
        Catalog { series }
    }

    /// Adds the recording rules of a rules file (their outputs become selectable series).
    pub fn add_recorded(&mut self, name: &str, labels: BTreeSet<String>) {
        self.series
            .insert(name.to_string(), (Kind::Recorded, labels));
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.series.keys().map(String::as_str)
    }
}

/// Label names of `{a="x",b="y"} 1`.
fn sample_labels(rest: &str) -> Vec<String> {
    let Some(body) = rest.strip_prefix('{') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut in_value = false;
    let mut escaped = false;
    let mut name = String::new();
    for c in body.chars() {
        if in_value {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_value = false,
                _ => {}
            }
            continue;
        }
        match c {
            '}' => break,
            '=' => out.push(std::mem::take(&mut name).trim().to_string()),
            '"' => in_value = true,
            ',' | ' ' => {}
            c => name.push(c),
        }
    }
    out
}

/// Grafana's variables replaced by values PromQL accepts (`promql-parser`'s lexer rejects `$`):
/// interval variables by `interval`, every other variable by `.*` (they sit in `=~` matchers).
pub fn substitute(query: &str, interval: &str) -> String {
    let mut out = String::new();
    let mut rest = query;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(b) = after.strip_prefix('{') {
            let end = b.find('}').expect("closed ${...}");
            (&b[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let name = name.split(':').next().unwrap_or(name);
        out.push_str(match name {
            "__rate_interval" | "__interval" | "__range" => interval,
            _ => ".*",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// What a check found: the problems (empty when the expression is fine) and, when the result's
/// labels are known from an aggregation, those labels.
#[derive(Debug, Default)]
pub struct Checked {
    pub problems: Vec<String>,
    /// `None` when some part of the result is not aggregated (its labels are whatever the series
    /// carry): a legend label must then not be relied on.
    pub grouped: Option<BTreeSet<String>>,
}

/// Parses and checks one expression against the catalog.
pub fn check(expr: &str, catalog: &Catalog) -> Checked {
    let ast = match parser::parse(expr) {
        Ok(ast) => ast,
        Err(e) => {
            return Checked {
                problems: vec![format!("does not parse: {e}")],
                grouped: None,
            }
        }
    };
    let mut problems = Vec::new();
    let out = walk(&ast, catalog, false, &mut problems);
    Checked {
        problems,
        grouped: out.grouped,
    }
}

/// Labels an expression's result can carry: `all` (for matcher and `by` checks) and `grouped`
/// (the explicit set, when an aggregation fixed it).
struct Out {
    all: BTreeSet<String>,
    grouped: Option<BTreeSet<String>>,
}

impl Out {
    fn scalar() -> Out {
        Out {
            all: BTreeSet::new(),
            grouped: Some(BTreeSet::new()),
        }
    }
}

fn names(l: &Labels) -> BTreeSet<String> {
    l.labels.iter().cloned().collect()
}

fn walk(e: &Expr, cat: &Catalog, in_rate: bool, problems: &mut Vec<String>) -> Out {
    match e {
        Expr::Aggregate(a) => aggregate(a, cat, problems),
        Expr::Unary(u) => walk(&u.expr, cat, in_rate, problems),
        Expr::Binary(b) => binary(b, cat, problems),
        Expr::Paren(p) => walk(&p.expr, cat, in_rate, problems),
        Expr::Subquery(s) => walk(&s.expr, cat, in_rate, problems),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Out::scalar(),
        Expr::VectorSelector(vs) => selector(vs, cat, in_rate, problems),
        Expr::MatrixSelector(ms) => selector(&ms.vs, cat, in_rate, problems),
        Expr::Call(c) => call(c, cat, problems),
        Expr::Extension(_) => {
            problems.push("extension expression".into());
            Out::scalar()
        }
    }
}

fn selector(vs: &VectorSelector, cat: &Catalog, in_rate: bool, problems: &mut Vec<String>) -> Out {
    let Some(name) = vs.name.as_deref() else {
        problems.push(format!("selector without a metric name: {vs}"));
        return Out::scalar();
    };
    let Some((kind, labels)) = cat.series.get(name) else {
        problems.push(format!("{name} is not a metric detour exports"));
        return Out::scalar();
    };
    if matches!(kind, Kind::Counter | Kind::HistogramPart) && !in_rate {
        problems.push(format!(
            "{name} is a counter: read it through rate() or increase()"
        ));
    }
    let mut all: BTreeSet<String> = labels.clone();
    // A recording rule's series carry exactly its `by` labels; scraped ones the target's too.
    if *kind != Kind::Recorded {
        all.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
    }
    for m in &vs.matchers.matchers {
        if m.name != "__name__" && !all.contains(&m.name) {
            problems.push(format!("{name} has no label {}", m.name));
        }
    }
    let grouped = (*kind == Kind::Recorded).then(|| all.clone());
    Out { all, grouped }
}

fn aggregate(a: &AggregateExpr, cat: &Catalog, problems: &mut Vec<String>) -> Out {
    let inner = walk(&a.expr, cat, false, problems);
    if let Some(p) = &a.param {
        walk(p, cat, false, problems);
    }
    let op = a.op.to_string();
    // topk/bottomk/limitk keep whole series: their labels are the input's.
    if matches!(op.as_str(), "topk" | "bottomk") && a.modifier.is_none() {
        return inner;
    }
    match &a.modifier {
        Some(LabelModifier::Include(by)) => {
            let by = names(by);
            for l in by.difference(&inner.all) {
                problems.push(format!("{op} by ({l}): no series here has that label"));
            }
            if matches!(op.as_str(), "topk" | "bottomk") {
                return inner;
            }
            Out {
                all: by.clone(),
                grouped: Some(by),
            }
        }
        Some(LabelModifier::Exclude(_)) => {
            problems.push(format!("{op} without (...): group with by (...) instead"));
            Out {
                all: inner.all,
                grouped: None,
            }
        }
        None => Out::scalar(),
    }
}

fn binary(b: &BinaryExpr, cat: &Catalog, problems: &mut Vec<String>) -> Out {
    let lhs = walk(&b.lhs, cat, false, problems);
    let rhs = walk(&b.rhs, cat, false, problems);
    let scalar = |e: &Expr| {
        matches!(
            e.value_type(),
            parser::value::ValueType::Scalar | parser::value::ValueType::String
        )
    };
    if scalar(&b.lhs) {
        return rhs;
    }
    if scalar(&b.rhs) {
        return lhs;
    }
    let set_op = b.op.is_set_operator();
    let comparison =
        b.op.is_comparison_operator() && !b.modifier.as_ref().is_some_and(|m| m.return_bool);
    let modifier = b.modifier.as_ref();
    if let Some(LabelModifier::Include(on)) = modifier.and_then(|m| m.matching.as_ref()) {
        for l in names(on) {
            if !lhs.all.contains(&l) || !rhs.all.contains(&l) {
                problems.push(format!("on ({l}): not a label of both sides"));
            }
        }
    }
    match modifier.map(|m| &m.card) {
        Some(VectorMatchCardinality::ManyToOne(extra)) => extend(lhs, names(extra)),
        Some(VectorMatchCardinality::OneToMany(extra)) => extend(rhs, names(extra)),
        _ if set_op || comparison => lhs,
        _ => match modifier.and_then(|m| m.matching.as_ref()) {
            // One-to-one arithmetic with on(...): the result keeps only those labels.
            Some(LabelModifier::Include(on)) => {
                let on = names(on);
                Out {
                    all: on.clone(),
                    grouped: Some(on),
                }
            }
            _ => lhs,
        },
    }
}

fn extend(mut out: Out, extra: BTreeSet<String>) -> Out {
    out.all.extend(extra.iter().cloned());
    if let Some(g) = out.grouped.as_mut() {
        g.extend(extra);
    }
    out
}

fn call(c: &Call, cat: &Catalog, problems: &mut Vec<String>) -> Out {
    let name = c.func.name;
    let rate = matches!(name, "rate" | "increase");
    let mut outs: Vec<Out> = c
        .args
        .args
        .iter()
        .map(|a| walk(a, cat, rate, problems))
        .collect();
    match name {
        "histogram_quantile" => {
            let mut v = outs.pop().unwrap_or_else(Out::scalar);
            if !v.all.contains("le") {
                problems.push("histogram_quantile over series without le".into());
            }
            v.all.remove("le");
            if let Some(g) = v.grouped.as_mut() {
                g.remove("le");
            }
            v
        }
        "time" | "vector" | "scalar" => Out::scalar(),
        _ => outs
            .into_iter()
            .find(|o| !o.all.is_empty() || o.grouped.is_none())
            .unwrap_or_else(Out::scalar),
    }
}

/// The `{{label}}` names of a Grafana legend or annotation format.
pub fn legend_labels(format: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = format;
    while let Some(at) = rest.find("{{") {
        let after = &rest[at + 2..];
        let end = after.find("}}").expect("closed {{");
        out.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    out
}

/// Legend labels that the expression does not group on.
pub fn ungrouped(legend: &[String], checked: &Checked) -> Vec<String> {
    legend
        .iter()
        .filter(|l| !checked.grouped.as_ref().is_some_and(|g| g.contains(*l)))
        .cloned()
        .collect()
}
