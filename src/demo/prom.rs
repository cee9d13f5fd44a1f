//! Just enough of the Prometheus text format to read the sidecar's own metrics back: the demo
//! reports what the sidecar absorbed, and tests compare counters before and after an action.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics line {line}: {reason}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
    pub text: String,
}

// === impl Metrics ===

impl Metrics {
    /// Parses exposition text; comment (`# HELP`, `# TYPE`) and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Metrics, ParseError> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason| ParseError {
                line: i + 1,
                reason,
                text: line.to_string(),
            };
            samples.push(parse_sample(line).map_err(err)?);
        }
        Ok(Metrics { samples })
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Sum of every sample named `name` whose labels include all of `labels` (other labels are
    /// summed over). 0 when nothing matches: a counter never incremented may be absent.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether any sample named `name` matches `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// `self - before` for `sum(name, labels)`.
    pub fn delta(&self, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels) - before.sum(name, labels)
    }

    /// Sums of `name` (matching `labels`) grouped by the value of label `by`.
    pub fn by_label(&self, name: &str, labels: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.matching(name, labels) {
            if let Some(v) = s.labels.get(by) {
                *out.entry(v.clone()).or_insert(0.0) += s.value;
            }
        }
        out
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    // A timestamp may follow the value; it is ignored.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| "value is not a number")?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The labels of a sample, from just after its `{`: the labels and what follows the `}`.
fn parse_labels(body: &str) -> Result<(BTreeMap<String, String>, &str), &'static str> {
    let mut labels = BTreeMap::new();
    let mut chars = body.char_indices().peekable();
    let end = loop {
        while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
        let Some(&(start, c)) = chars.peek() else {
            return Err("unterminated labels");
        };
        if c == '}' {
            break start;
        }
        let mut key_end = start;
        for (i, c) in chars.by_ref() {
            if c == '=' {
                key_end = i;
                break;
            }
        }
        let key = body[start..key_end].trim().to_string();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err("label value must be quoted");
        }
        labels.insert(key, quoted_value(&mut chars)?);
    };
    Ok((labels, &body[end + 1..]))
}

/// A label value after its opening quote, up to and including the closing one, unescaped.
fn quoted_value(chars: &mut impl Iterator<Item = (usize, char)>) -> Result<String, &'static str> {
    let mut value = String::new();
    loop {
        match chars.next() {
            None => return Err("unterminated label value"),
            Some((_, '"')) => return Ok(value),
            Some((_, '\\')) => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value"),
            },
            Some((_, c)) => value.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP detour_attempt_failures_total Failed attempts.
# TYPE detour_attempt_failures_total counter
detour_attempt_failures_total{cause="connection_refused",upstream="shop/web"} 3
detour_attempt_failures_total{cause="keepalive_race",upstream="shop/web"} 1
detour_attempt_failures_total{cause="connection_refused",upstream="other"} 10
detour_config_reloads_total{result="success"} 2
detour_request_duration_seconds_bucket{upstream="shop/web",le="+Inf"} 7
detour_request_duration_seconds_sum{upstream="shop/web"} 0.25
odd{v="a \"quoted\" \\ back, and, commas}"} 1e3
plain 4 1700000000000
"#;

    #[test]
    fn sums_by_label_subset() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.sum("detour_attempt_failures_total", &[]), 14.0);
        assert_eq!(
            m.sum("detour_attempt_failures_total", &[("upstream", "shop/web")]),
            4.0
        );
        assert_eq!(
            m.sum(
                "detour_attempt_failures_total",
                &[("upstream", "shop/web"), ("cause", "keepalive_race")]
            ),
            1.0
        );
        assert_eq!(m.sum("missing_total", &[]), 0.0);
        assert!(!m.has("missing_total", &[]));
        assert_eq!(
            m.by_label("detour_attempt_failures_total", &[], "cause"),
            BTreeMap::from([
                ("connection_refused".to_string(), 13.0),
                ("keepalive_race".to_string(), 1.0)
            ])
        );
        assert_eq!(
            m.sum("detour_request_duration_seconds_bucket", &[("le", "+Inf")]),
            7.0
        );
        assert_eq!(m.sum("detour_request_duration_seconds_sum", &[]), 0.25);
    }

    #[test]
    fn escapes_timestamps_and_deltas() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(
            m.sum("odd", &[("v", r#"a "quoted" \ back, and, commas}"#)]),
            1000.0
        );
        assert_eq!(m.sum("plain", &[]), 4.0);
        let later = Metrics::parse(&TEXT.replace("success\"} 2", "success\"} 5")).unwrap();
        assert_eq!(
            later.delta(&m, "detour_config_reloads_total", &[("result", "success")]),
            3.0
        );
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = Metrics::parse("ok 1\nbad{x=1} 2\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("quoted"), "{e}");
        assert!(Metrics::parse("name notanumber").is_err());
        assert!(Metrics::parse("name{a=\"b\"").is_err());
    }
}
