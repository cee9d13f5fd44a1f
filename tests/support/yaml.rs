//! YAML in the tests, read with YAML 1.2 scalars as detour reads its own documents: `yes`, `on`
//! and `y` stay strings (kubectl reads YAML 1.1 and would make booleans of them, so manifests
//! meant for it, like examples/upstreampolicy.yaml, quote them). One set of options for every test; `support` declares it, and the tests that do
//! not include `support` include it by path (`#[path = "support/yaml.rs"]`).
#![allow(dead_code)]

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// One YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options())
}

/// One YAML document, from bytes (a request body).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_slice_with_options(bytes, options())
}

/// Every document of a multi-document stream, empty ones left out; panics on invalid YAML.
pub fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple_with_options::<Value>(text, options())
        .expect("valid YAML documents")
}

/// `value` as one YAML document.
pub fn to_string<T: Serialize>(value: &T) -> String {
    serde_saphyr::to_string(value).expect("serializes to YAML")
}
