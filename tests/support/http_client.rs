//! A plain HTTP/1.1 GET on a fresh connection to 127.0.0.1: admin endpoints, a test upstream,
//! Prometheus's API. One definition for every test.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one GET may take on a loaded 2-core machine.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// GET `path`: (status, body). Panics on any transport error or after [`IO_TIMEOUT`].
pub async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    tokio::time::timeout(IO_TIMEOUT, get(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path}: no answer in {IO_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// GET that reports any failure, or a status other than 200, as `None` (a server still starting).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match tokio::time::timeout(IO_TIMEOUT, get(addr, path)).await {
        Ok(Ok((StatusCode::OK, body))) => Some(body),
        _ => None,
    }
}

/// GET without a time limit, transport errors as values.
pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
