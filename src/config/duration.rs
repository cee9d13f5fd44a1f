//! Gateway API style durations (`500ms`, `5s`, `1m30s`, `1h`).
//!
//! The textual form is what users write in config files and CRDs, so it round-trips: parsing and
//! printing are inverse for canonical strings. The accepted grammar is the Gateway API `Duration`
//! (GEP-2257): one to four `<number><unit>` pairs, number up to 5 digits, unit one of `h`, `m`,
//! `s`, `ms`. It is also a valid Go duration, so Kubernetes CEL `duration()` accepts it.

use std::{borrow::Cow, fmt, str::FromStr, time};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The regular expression published in the CRD schema for every duration field.
pub const DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// A non-negative duration written as a Gateway API duration string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(time::Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"500ms\", \"5s\", \"1m30s\")")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

// === impl Duration ===

impl Duration {
    pub const ZERO: Duration = Duration(time::Duration::ZERO);

    pub const fn from_millis(ms: u64) -> Self {
        Duration(time::Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Duration(time::Duration::from_secs(s))
    }

    pub const fn get(self) -> time::Duration {
        self.0
    }

    pub fn as_millis(self) -> u128 {
        self.0.as_millis()
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        let bytes = input.as_bytes();
        let mut i = 0;
        let mut parts = 0;
        let mut total_ms: u64 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &input[start..i];
            if digits.is_empty() {
                return Err(err("each part must start with a number"));
            }
            if digits.len() > 5 {
                return Err(err("at most 5 digits per part"));
            }
            let n: u64 = digits.parse().map_err(|_| err("bad number"))?;
            let unit_ms = if input[i..].starts_with("ms") {
                i += 2;
                1
            } else if input[i..].starts_with('h') {
                i += 1;
                3_600_000
            } else if input[i..].starts_with('m') {
                i += 1;
                60_000
            } else if input[i..].starts_with('s') {
                i += 1;
                1_000
            } else {
                return Err(err("unit must be one of h, m, s, ms"));
            };
            total_ms += n * unit_ms;
            parts += 1;
            if parts > 4 {
                return Err(err("at most 4 parts"));
            }
        }
        Ok(Duration::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    /// Canonical form: largest units first, zero parts omitted; `0s` for zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            let n = ms / size;
            if n > 0 {
                write!(f, "{n}{unit}")?;
                ms -= n * size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 500ms, 5s, 1m or 1h30m (Gateway API format)."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_examples() {
        for (s, ms) in [
            ("0s", 0),
            ("500ms", 500),
            ("5s", 5_000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("1h2m3s4ms", 3_723_004),
            ("99999ms", 99_999),
        ] {
            assert_eq!(s.parse::<Duration>().unwrap().as_millis(), ms, "{s}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5 s",
            "100000s",
            "1h1h1h1h1h",
            "5sec",
            "1d",
        ] {
            assert!(s.parse::<Duration>().is_err(), "{s} should not parse");
        }
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for s in ["0s", "500ms", "5s", "1m30s", "1h", "1h0m1s"] {
            let d: Duration = s.parse().unwrap();
            let back: Duration = d.to_string().parse().unwrap();
            assert_eq!(d, back);
        }
        assert_eq!(Duration::from_millis(90_500).to_string(), "1m30s500ms");
    }

    #[test]
    fn error_names_the_input() {
        let e = "5x".parse::<Duration>().unwrap_err().to_string();
        assert!(e.contains("\"5x\"") && e.contains("unit"), "{e}");
    }
}
