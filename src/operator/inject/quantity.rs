//! Kubernetes resource quantities (`50m`, `128Mi`, `1e3`) as the sidecar flags take them.

use std::{fmt, str::FromStr};

/// A Kubernetes resource quantity (`50m`, `128Mi`, `1.5`, `2e3`), non-negative, checked when it
/// is parsed so that an injected pod never carries one the API server refuses.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity(String);

impl Quantity {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The amount in base units (cores, bytes), for comparisons.
    pub(super) fn value(&self) -> f64 {
        parse_quantity(&self.0).expect("checked when parsed")
    }
}

impl FromStr for Quantity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_quantity(s)
            .map(|_| Quantity(s.to_owned()))
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a Kubernetes quantity: a non-negative number with an optional \
                 suffix (m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent e3), \
                 like 50m or 128Mi"
                )
            })
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The value of a quantity (apimachinery's `resource.Quantity` grammar without a sign), or
/// `None` when it is not one.
fn parse_quantity(s: &str) -> Option<f64> {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(exp.parse().ok()?)
        }
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for ok in [
            "0", "50m", "1", "1.5", ".5", "2.", "128Mi", "1Gi", "2k", "1e3", "5E-2", "3e+1",
        ] {
            assert!(ok.parse::<Quantity>().is_ok(), "{ok}");
        }
        for bad in [
            "", "-1", "+1", "m", "1mi", "1MB", "1..5", "1.2.3", "1 Mi", "e3", "1e", "1e+", "abc",
        ] {
            let err = bad.parse::<Quantity>().unwrap_err();
            assert!(err.contains("not a Kubernetes quantity"), "{bad}: {err}");
        }
        let v = |s: &str| s.parse::<Quantity>().unwrap().value();
        assert_eq!(v("50m"), 0.05);
        assert_eq!(v("128Mi"), 128.0 * 1024.0 * 1024.0);
        assert_eq!(v("1e3"), v("1k"));
        assert!(v("1Gi") > v("1000Mi") && v("1000Mi") > v("1G"));
    }
}
