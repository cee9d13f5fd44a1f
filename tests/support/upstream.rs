//! A real upstream HTTP/1.1 server on 127.0.0.1 that counts the request ids it sees, so a test
//! can prove that no request was sent twice (a replayed POST).

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::watch};

/// Header carrying a request's unique id.
pub const REQUEST_ID: &str = "x-request-id";

/// One upstream pod: answers every request `200 <name>` and counts ids by value.
pub struct IdServer {
    pub name: String,
    pub addr: SocketAddr,
    ids: Arc<Mutex<HashMap<String, u32>>>,
    stop: watch::Sender<bool>,
}

impl IdServer {
    pub async fn start(name: &str) -> IdServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ids: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let (stop, stopped) = watch::channel(false);
        let (name_, ids_) = (name.to_string(), ids.clone());
        tokio::spawn(async move {
            let mut stopped_accept = stopped.clone();
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                    _ = stopped_accept.changed() => return,
                };
                let (name, ids, mut stopped) = (name_.clone(), ids_.clone(), stopped.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (name, ids) = (name.clone(), ids.clone());
                            async move {
                                if let Some(id) =
                                    req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok())
                                {
                                    *ids.lock().entry(id.to_string()).or_default() += 1;
                                }
                                let _ = req.into_body().collect().await;
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                            }
                        });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        // The process exits: open connections close with it.
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        IdServer {
            name: name.to_string(),
            addr,
            ids,
            stop,
        }
    }

    /// The process exits: the listener and every connection close.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Ids seen more than once, with their counts.
    pub fn repeated(&self) -> Vec<(String, u32)> {
        self.ids
            .lock()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// Every id this server saw (with counts).
    pub fn ids(&self) -> HashMap<String, u32> {
        self.ids.lock().clone()
    }
}
