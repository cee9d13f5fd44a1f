//! YAML in and out for `detour inject`: the documents of a stream read into [`Yaml`] values that
//! keep the user's key order, and a small block-style writer.
//!
//! The writer exists because Kubernetes reads manifests as YAML 1.1, where `yes`, `on` or `1_000`
//! are a boolean and a number, while YAML 1.2 writers print them as plain strings (a ConfigMap
//! value `"yes"` would no longer be a string). Here a string is written plain only when no YAML
//! version can read it as anything else, and double-quoted (JSON escapes, valid YAML) otherwise;
//! multi-line strings as literal blocks.

use std::fmt::{self, Write as _};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// A YAML value as read, mapping keys in the order the user wrote them.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(String),
    Seq(Vec<Yaml>),
    Map(Vec<(Yaml, Yaml)>),
}

/// A YAML value that has no plain block form here: a collection as a mapping key.
#[derive(Debug)]
pub(super) struct Unsupported(pub &'static str);

// === reading ===

/// The documents of a YAML stream, numbered from 1 the way a YAML reader counts them (an empty
/// document counts), each parsed on its own so that an error names its document.
pub(super) fn documents(
    input: &str,
) -> impl Iterator<Item = (usize, Result<Yaml, serde_saphyr::Error>)> + '_ {
    split_documents(input)
        .into_iter()
        .enumerate()
        .map(|(i, text)| (i + 1, parse(text)))
}

/// One document.
pub(super) fn parse(text: &str) -> Result<Yaml, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, crate::config::yaml_options())
}

/// Cuts a stream at its `---` lines. YAML forbids a line starting with `---` (then a space or
/// the line's end) inside a document's content, quoted or block scalars included, so such a
/// line always starts a document. What comes before the first marker is a document only when it
/// holds more than comments and directives.
fn split_documents(input: &str) -> Vec<&str> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in input.split_inclusive('\n') {
        if starts_document(line) {
            starts.push(offset);
        }
        offset += line.len();
    }
    match starts.first() {
        None => {
            return if has_content(input) {
                vec![input]
            } else {
                Vec::new()
            }
        }
        Some(&first) if has_content(&input[..first]) => starts.insert(0, 0),
        // Comments and directives belong to the first explicit document.
        Some(_) => starts[0] = 0,
    }
    let ends = starts.iter().skip(1).copied().chain([input.len()]);
    starts
        .iter()
        .zip(ends)
        .map(|(&s, e)| &input[s..e])
        .collect()
}

fn starts_document(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// Anything but blank lines, comments, directives (`%YAML`) and document ends (`...`).
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim();
        !(t.is_empty() || t.starts_with('#') || l.starts_with('%') || t == "...")
    })
}

impl<'de> Deserialize<'de> for Yaml {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(YamlVisitor)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Yaml;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Yaml, E> {
        Ok(Yaml::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Yaml, E> {
        Ok(Yaml::Int(n))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Yaml, E> {
        // One spelling per number, whichever way the reader hands it over.
        Ok(i64::try_from(n).map_or(Yaml::UInt(n), Yaml::Int))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Yaml, E> {
        Ok(Yaml::Float(f))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Yaml, E> {
        Ok(Yaml::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Yaml, E> {
        Ok(Yaml::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Yaml::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Yaml, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Yaml::Map(entries))
    }
}

// === impl Yaml ===

impl Yaml {
    /// The JSON form the injector works on. Scalar keys become strings as serde_json writes
    /// them (`7` → `"7"`); a non-finite number becomes null, as in serde_json.
    pub(super) fn to_json(&self) -> Result<Value, String> {
        Ok(match self {
            Yaml::Null => Value::Null,
            Yaml::Bool(b) => Value::Bool(*b),
            Yaml::Int(n) => Value::from(*n),
            Yaml::UInt(n) => Value::from(*n),
            Yaml::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Yaml::String(s) => Value::String(s.clone()),
            Yaml::Seq(items) => {
                Value::Array(items.iter().map(Yaml::to_json).collect::<Result<_, _>>()?)
            }
            Yaml::Map(entries) => {
                let mut map = serde_json::Map::new();
                for (k, v) in entries {
                    map.insert(k.key_text()?, v.to_json()?);
                }
                Value::Object(map)
            }
        })
    }

    fn key_text(&self) -> Result<String, String> {
        match self {
            Yaml::String(s) => Ok(s.clone()),
            Yaml::Bool(b) => Ok(b.to_string()),
            Yaml::Int(n) => Ok(n.to_string()),
            Yaml::UInt(n) => Ok(n.to_string()),
            Yaml::Float(f) if f.is_finite() => Ok(number_text(*f)),
            _ => Err("key must be a string".into()),
        }
    }

    fn from_json_scalar(v: Value) -> Yaml {
        match v {
            Value::Bool(b) => Yaml::Bool(b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Yaml::Int(i),
                (None, Some(u), _) => Yaml::UInt(u),
                (None, None, f) => Yaml::Float(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => Yaml::String(s),
            Value::Null | Value::Array(_) | Value::Object(_) => Yaml::Null,
        }
    }

    pub(super) fn is_null(&self) -> bool {
        matches!(self, Yaml::Null)
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::String(s) => Some(s),
            _ => None,
        }
    }

    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// `new` as YAML, its keys in the order of `original` (what the user wrote), new keys after
/// them (`name` first). List items are matched by `name`, else by position.
pub(super) fn in_order_of(original: Option<&Yaml>, new: Value) -> Yaml {
    match new {
        Value::Object(mut n) => {
            let mut out = Vec::new();
            if let Some(Yaml::Map(o)) = original {
                for (k, ov) in o {
                    if let Some(nv) = k.as_str().and_then(|k| n.remove(k)) {
                        out.push((k.clone(), in_order_of(Some(ov), nv)));
                    }
                }
            }
            if let Some(nv) = n.remove("name") {
                out.push((Yaml::String("name".into()), in_order_of(None, nv)));
            }
            for (k, nv) in n {
                out.push((Yaml::String(k), in_order_of(None, nv)));
            }
            Yaml::Map(out)
        }
        Value::Array(n) => {
            let o = match original {
                Some(Yaml::Seq(o)) => o.as_slice(),
                _ => &[],
            };
            let same_len = o.len() == n.len();
            let items = n.into_iter().enumerate().map(|(i, nv)| {
                let by_name = nv.get("name").and_then(Value::as_str).and_then(|name| {
                    o.iter()
                        .find(|ov| ov.get("name").and_then(Yaml::as_str) == Some(name))
                });
                let counterpart = by_name.or(if same_len { o.get(i) } else { None });
                in_order_of(counterpart, nv)
            });
            Yaml::Seq(items.collect())
        }
        scalar => Yaml::from_json_scalar(scalar),
    }
}

// === writing ===

/// One document, ending in a newline.
pub(super) fn to_string(v: &Yaml) -> Result<String, Unsupported> {
    let mut out = String::new();
    match v {
        Yaml::Map(m) if !m.is_empty() => mapping(m, 0, false, &mut out)?,
        Yaml::Seq(s) if !s.is_empty() => sequence(s, 0, &mut out)?,
        other => {
            out.push_str(&inline(other)?);
            out.push('\n');
        }
    }
    Ok(out)
}

fn mapping(
    m: &[(Yaml, Yaml)],
    indent: usize,
    first_inline: bool,
    out: &mut String,
) -> Result<(), Unsupported> {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !first_inline {
            pad(indent, out);
        }
        match k {
            Yaml::Map(_) | Yaml::Seq(_) => return Err(Unsupported("a list or a mapping as a key")),
            _ => out.push_str(&inline(k)?),
        }
        out.push(':');
        value_after(v, indent, indent + 2, out)?;
    }
    Ok(())
}

fn sequence(s: &[Yaml], indent: usize, out: &mut String) -> Result<(), Unsupported> {
    for v in s {
        pad(indent, out);
        out.push('-');
        match v {
            Yaml::Map(m) if !m.is_empty() => {
                out.push(' ');
                mapping(m, indent + 2, true, out)?;
            }
            _ => value_after(v, indent + 2, indent + 2, out)?,
        }
    }
    Ok(())
}

/// What follows `key:` or `-`: ` scalar`, a literal block, or a nested collection on the
/// next lines (a list under a key at the key's indentation, as kubectl writes it).
fn value_after(
    v: &Yaml,
    list_indent: usize,
    indent: usize,
    out: &mut String,
) -> Result<(), Unsupported> {
    match v {
        Yaml::Map(m) if !m.is_empty() => {
            out.push('\n');
            mapping(m, indent, false, out)
        }
        Yaml::Seq(s) if !s.is_empty() => {
            out.push('\n');
            sequence(s, list_indent, out)
        }
        Yaml::String(s) if literal_block(s) => {
            let body = s.trim_end_matches('\n');
            let chomp = match s.len() - body.len() {
                0 => "-",
                1 => "",
                _ => "+",
            };
            let _ = writeln!(out, " |{chomp}");
            for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
                if !line.is_empty() {
                    pad(indent, out);
                    out.push_str(line);
                }
                out.push('\n');
            }
            Ok(())
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other)?);
            out.push('\n');
            Ok(())
        }
    }
}

fn pad(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn inline(v: &Yaml) -> Result<String, Unsupported> {
    Ok(match v {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Int(n) => n.to_string(),
        Yaml::UInt(n) => n.to_string(),
        Yaml::Float(f) if f.is_nan() => ".nan".into(),
        Yaml::Float(f) if f.is_infinite() => if *f > 0.0 { ".inf" } else { "-.inf" }.into(),
        Yaml::Float(f) => number_text(*f),
        Yaml::String(s) if plain(s) => s.clone(),
        Yaml::String(s) => serde_json::to_string(s).expect("a string serializes"),
        Yaml::Map(m) if m.is_empty() => "{}".into(),
        Yaml::Seq(s) if s.is_empty() => "[]".into(),
        Yaml::Map(_) | Yaml::Seq(_) => return Err(Unsupported("a list or a mapping as a key")),
    })
}

/// A finite float as JSON writes it (`2.5`, `1.0`, `1e20`).
fn number_text(f: f64) -> String {
    Number::from_f64(f).map_or_else(|| f.to_string(), |n| n.to_string())
}

/// A multi-line string that reads back exactly from a literal block (`|`): printable, and
/// its first line does not start with a space (which would set the block's indentation).
fn literal_block(s: &str) -> bool {
    let first = s.split('\n').find(|l| !l.is_empty());
    s.contains('\n')
        && first.is_some_and(|l| !l.starts_with([' ', '\t']))
        && s.chars().all(|c| c == '\n' || printable(c))
        && s.lines().all(|l| !l.ends_with([' ', '\t']))
}

fn printable(c: char) -> bool {
    !c.is_control() && !matches!(c, '\u{feff}' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// `s` reads back as this same string, plain, in YAML 1.1 and 1.2 alike.
fn plain(s: &str) -> bool {
    const SPECIAL: [&str; 14] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "=", ".inf", "-.inf",
        "+.inf",
    ];
    let lower = s.to_ascii_lowercase();
    let safe_char = |c: char| c.is_ascii_alphanumeric() || "-._/:@=+%$() ".contains(c);
    let Some(first) = s.chars().next() else {
        return false;
    };
    // numbers of either version: ints (0o17, 0x1F, 1_000, 0755), floats (1e3, .5), 1.1's
    // sexagesimal (1:20) and timestamps (2024-01-01, 2001-12-14t21:59:43.10-05:00)
    let numeric = |c: char| c.is_ascii_hexdigit() || "xXoObB._:+- tTzZ".contains(c);
    let number_like = (first.is_ascii_digit()
        || (matches!(first, '-' | '+' | '.')
            && s[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.')))
        && s.chars().all(numeric);
    s.chars().all(safe_char)
        && !SPECIAL.contains(&lower.as_str())
        && !matches!(lower.as_str(), ".nan")
        && !number_like
        && !matches!(first, ' ' | ':' | '@' | '%' | '=' | '(' | ')' | '$')
        && !(first == '-' && (s.len() == 1 || s[1..].starts_with(' ')))
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Yaml {
        Yaml::String(s.into())
    }

    #[test]
    fn strings_yaml_1_1_or_1_2_would_misread_are_quoted() {
        for s in [
            "yes",
            "No",
            "ON",
            "off",
            "y",
            "N",
            "true",
            "null",
            "~",
            "",
            " x",
            "x ",
            "0755",
            "0o17",
            "0x1F",
            "1_000",
            "1e3",
            "-1",
            "+1",
            ".5",
            "-.5",
            ".inf",
            "-.Inf",
            ".NaN",
            "1:20",
            "2024-01-01",
            "2001-12-14t21:59:43.10-05:00",
            "2001-12-14 21:59:43.10 -5",
            "=",
            "-",
            "- x",
            "a: b",
            "a:",
            "x #y",
            "#x",
            "@x",
            "!x",
            "&x",
            "*x",
            "|",
            ">",
            "'x",
            "\"x",
            "[x]",
            "{x}",
            "x,y",
            "?x",
            "%x",
            "a\tb",
            "é",
        ] {
            assert!(!plain(s), "{s:?} must be quoted");
        }
        for s in [
            "web",
            "50m",
            "128Mi",
            "--flag",
            "ghcr.io/x/y:1.2.3",
            "a b",
            "detour.dev/sidecar",
            "v1.2.3",
        ] {
            assert!(plain(s), "{s:?} can be plain");
        }
    }

    #[test]
    fn what_is_written_reads_back_the_same() {
        let tricky = [
            "yes",
            "0755",
            "1_000",
            "multi\nline\n",
            "no newline\nat end",
            "two\n\n",
            "\n\nleading",
            "  indented\nblock",
            "trailing \nspace",
            "tab\there",
            "quote\"and\\backslash",
            "ünï",
            "\u{1}ctl",
            "a: b\nc: d\n",
        ];
        let mut doc: Vec<(Yaml, Yaml)> = tricky
            .iter()
            .enumerate()
            .map(|(i, s)| (string(&format!("k{i}")), string(s)))
            .collect();
        doc.push((string("yes"), Yaml::Bool(true)));
        doc.push((Yaml::Int(7), Yaml::Null));
        doc.push((string("big"), Yaml::UInt(u64::MAX)));
        doc.push((string("inf"), Yaml::Float(f64::NEG_INFINITY)));
        let nested = parse("[[1, [2.5, -3]], [], {}, {a: [x, {b: c}], d: {}}]").unwrap();
        doc.push((string("nested"), nested));
        let doc = Yaml::Map(doc);
        let text = to_string(&doc).unwrap();
        assert_eq!(parse(&text).unwrap(), doc, "{text}");
        assert!(text.contains("k3: |\n  multi\n  line\n"), "{text}");
        assert!(text.contains("k0: \"yes\"\n"), "{text}");
        assert!(text.contains("k2: \"1_000\"\n"), "{text}");
        let key = Yaml::Map(vec![(Yaml::Seq(vec![string("a")]), Yaml::Null)]);
        assert!(to_string(&key).is_err());
    }

    #[test]
    fn reading_keeps_yaml_1_2_scalars_order_and_refuses_tags() {
        let doc = parse("b: yes\na: 0755\nc: 1_000\nd: 12\ne: true\nf: ~\n").unwrap();
        assert_eq!(
            doc,
            Yaml::Map(vec![
                (string("b"), string("yes")),
                (string("a"), string("0755")),
                (string("c"), string("1_000")),
                (string("d"), Yaml::Int(12)),
                (string("e"), Yaml::Bool(true)),
                (string("f"), Yaml::Null),
            ])
        );
        assert!(parse("a: !Ref x").is_err());
        assert!(parse("a: 1\na: 2\n").is_err(), "duplicate keys");
        assert_eq!(
            parse("{7: x, true: y}").unwrap().to_json().unwrap(),
            serde_json::json!({"7": "x", "true": "y"})
        );
        assert!(parse("{[1]: x}").unwrap().to_json().is_err());
    }

    #[test]
    fn documents_are_numbered_as_a_reader_counts_them() {
        let docs = |input: &str| -> Vec<(usize, Yaml)> {
            documents(input).map(|(i, d)| (i, d.unwrap())).collect()
        };
        assert!(docs("").is_empty());
        assert!(docs("# only a comment\n").is_empty());
        let two = docs("a: 1\n---\n---\nb: 2\n");
        assert_eq!(two.len(), 3);
        assert_eq!(two[1], (2, Yaml::Null));
        assert_eq!(two[2].1.get("b"), Some(&Yaml::Int(2)));
        // Comments and directives before the first marker are no document of their own.
        let one = docs("# header\n%YAML 1.2\n---\na: 1\n");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].1.get("a"), Some(&Yaml::Int(1)));
        // A marker line inside a block scalar would need indentation: `--- x` at column 0 ends it.
        let block = docs("a: |\n  ---not a marker\n  x\n--- b\n");
        assert_eq!(block[0].1.get("a"), Some(&string("---not a marker\nx\n")));
        assert_eq!(block[1], (2, string("b")));
        let bad: Vec<bool> = documents("a: 1\n---\nkind: [unclosed\n")
            .map(|(_, d)| d.is_ok())
            .collect();
        assert_eq!(bad, [true, false]);
    }
}
