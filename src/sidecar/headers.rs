//! Header handling of a reverse proxy (RFC 9110 §7.6): hop-by-hop headers are removed, `Via` and
//! `X-Forwarded-*` are added, `Host` is what the client asked for.

use http::{header, HeaderMap, HeaderName, HeaderValue};

use super::h1::is_chunked_only;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1 plus the legacy ones).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const VIA_VALUE: &str = "1.1 detour";

/// Is this an HTTP/1.1 upgrade (WebSocket...) request or response?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Removes hop-by-hop headers, including those the `Connection` header names. For an upgrade,
/// `Connection: upgrade` and `Upgrade` are kept: they must reach the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names is cheaper than a hashed
    // removal per hop-by-hop name.
    if !keep_upgrade
        && !headers
            .keys()
            .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Adds `Via` and appends the client to `X-Forwarded-For`; sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` when no earlier proxy did. Allocates only when a list must be extended.
pub fn add_forwarded(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    use http::header::Entry;
    // Entries: one lookup per header whether it is there or not.
    match headers.entry(HeaderName::from_static("x-forwarded-for")) {
        Entry::Occupied(mut e) => {
            let joined = match e.get().to_str() {
                Ok(prev) if !prev.is_empty() => {
                    format!("{prev}, {}", client_ip.to_str().unwrap_or_default())
                }
                _ => client_ip.to_str().unwrap_or_default().to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&joined) {
                e.insert(v);
            }
        }
        Entry::Vacant(e) => {
            e.insert(client_ip.clone());
        }
    }
    add_via(headers);
    if let Entry::Vacant(e) = headers.entry(HeaderName::from_static("x-forwarded-proto")) {
        e.insert(HeaderValue::from_static("http"));
    }
    if let Some(h) = headers.get(header::HOST).cloned() {
        if let Entry::Vacant(e) = headers.entry(HeaderName::from_static("x-forwarded-host")) {
            e.insert(h);
        }
    }
}

/// Adds this hop to `Via` (a second field line when one exists: same meaning, no allocation).
pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA_VALUE));
}

/// A request this proxy must refuse before anything else (RFC 9112): more than one `Host`
/// field line is a 400 (§3.2); a transfer coding other than `chunked` alone is a 501 (§6.1):
/// hyper's server has de-chunked the body, and forwarding it with `Transfer-Encoding` dropped
/// (it is hop-by-hop) would label gzip bytes as plain content. Codings hyper cannot frame at all
/// (`chunked` not last, unknown ones alone) it answers with 400 itself, before this is asked.
pub fn refuse_request(headers: &HeaderMap) -> Option<(http::StatusCode, &'static str)> {
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Some((
            http::StatusCode::BAD_REQUEST,
            "more than one Host header field (RFC 9112 section 3.2)",
        ));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) && !is_chunked_only(headers) {
        return Some((
            http::StatusCode::NOT_IMPLEMENTED,
            "request transfer codings other than chunked are not supported (RFC 9112 section 6.1)",
        ));
    }
    None
}

/// Methods that are safe to send twice (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &http::Method, headers: &HeaderMap) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || headers.contains_key("idempotency-key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.9"),
            ("via", "1.1 edge"),
            ("host", "shop.example"),
        ]);
        add_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, vec!["1.1 edge", "1.1 detour"]);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        let mut fresh = HeaderMap::new();
        add_forwarded(&mut fresh, &HeaderValue::from_static("::1"));
        assert_eq!(fresh["x-forwarded-for"], "::1");
        assert_eq!(fresh["via"], "1.1 detour");
        assert!(!fresh.contains_key("x-forwarded-host"));
    }

    #[test]
    fn requests_with_two_hosts_or_unknown_codings_are_refused() {
        assert_eq!(refuse_request(&map(&[("host", "a")])), None);
        assert_eq!(
            refuse_request(&map(&[("host", "a"), ("host", "b")])).map(|r| r.0),
            Some(http::StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            refuse_request(&map(&[("transfer-encoding", "Chunked")])),
            None
        );
        for codings in [&["gzip, chunked"][..], &["gzip", "chunked"]] {
            let pairs: Vec<_> = codings.iter().map(|c| ("transfer-encoding", *c)).collect();
            assert_eq!(
                refuse_request(&map(&pairs)).map(|r| r.0),
                Some(http::StatusCode::NOT_IMPLEMENTED),
                "{codings:?}"
            );
        }
    }

    #[test]
    fn idempotency() {
        let h = HeaderMap::new();
        assert!(is_idempotent(&http::Method::GET, &h));
        assert!(is_idempotent(&http::Method::PUT, &h));
        assert!(!is_idempotent(&http::Method::POST, &h));
        assert!(!is_idempotent(&http::Method::PATCH, &h));
        let k = map(&[("idempotency-key", "abc")]);
        assert!(is_idempotent(&http::Method::POST, &k));
    }
}
