//! The HTTP/1.1 server behind the admin ports of the sidecar and of the operator: an accept loop
//! that pauses after a failed accept (out of file descriptors, say) instead of spinning, one task
//! per connection, and a graceful stop. It imports nothing else of the crate, so both parts may
//! use it without depending on each other.

use std::{error::Error as StdError, future::Future, io, time::Duration};

use http::{Request, Response};
use hyper::{body::Incoming, server::conn::http1, service::Service};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};

/// How long the accept loop waits after a failed accept. An error such as `EMFILE` comes back
/// at once on every call until a descriptor is freed: without a pause the loop would spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Where connections come from: a TCP listener, or a stand-in in the tests.
pub trait Accept {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    fn accept(&mut self) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let listener = &*self;
        async move {
            TcpListener::accept(listener)
                .await
                .map(|(stream, _)| stream)
        }
    }
}

/// Serves `service` on every connection `listener` accepts, until `stop` resolves or the task is
/// aborted. Then nothing more is accepted, and each open connection finishes the request in
/// flight and closes (an idle keep-alive connection closes at once); they are not waited for.
pub async fn serve<L, S, B>(mut listener: L, service: S, stop: impl Future<Output = ()> + Send)
where
    L: Accept + Send,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // Dropped when the loop ends (or the task is aborted), which tells every connection it
    // watches to shut down gracefully.
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let io = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "admin server: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let conn = http1::Builder::new().serve_connection(TokioIo::new(io), service.clone());
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::oneshot,
        time::Instant,
    };

    use super::*;

    async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = format!("hello from {}\n", req.uri().path());
        Ok(Response::new(Full::new(Bytes::from(body))))
    }

    /// A listener out of file descriptors: `fails` errors, then nothing. Records when it was
    /// asked.
    struct OutOfFiles {
        fails: usize,
        asked: Arc<Mutex<Vec<Instant>>>,
    }

    impl Accept for OutOfFiles {
        type Io = tokio::io::DuplexStream;

        fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send {
            let mut asked = self.asked.lock().unwrap();
            asked.push(Instant::now());
            let fail = asked.len() <= self.fails;
            async move {
                if !fail {
                    std::future::pending::<()>().await;
                }
                Err(io::Error::other("too many open files"))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_accept_error_is_followed_by_a_pause_not_a_spin() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let listener = OutOfFiles {
            fails: 4,
            asked: asked.clone(),
        };
        let server = tokio::spawn(serve(listener, service_fn(hello), std::future::pending()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.abort();
        let asked = asked.lock().unwrap().clone();
        // Four failures, then the call that waits.
        assert_eq!(asked.len(), 5, "{asked:?}");
        for pair in asked.windows(2) {
            assert!(
                pair[1] - pair[0] >= ACCEPT_ERROR_PAUSE,
                "asked again after {:?}",
                pair[1] - pair[0]
            );
        }
    }

    async fn get(stream: &mut TcpStream, path: &str) -> String {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let mut text = String::new();
        while !text.ends_with('\n') || !text.contains("hello") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {text:?}");
            text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        text
    }

    #[tokio::test]
    async fn requests_are_served_until_a_graceful_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, service_fn(hello), async move {
            let _ = stopped.await;
        }));
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let answer = get(&mut kept, "/live").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("hello from /live\n"), "{answer}");
        // The same connection serves the next request: keep-alive.
        assert!(get(&mut kept, "/ready")
            .await
            .ends_with("hello from /ready\n"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns once stopped")
            .unwrap();
        // The idle keep-alive connection is closed, and no new one is taken.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), kept.read_to_end(&mut rest));
        assert_eq!(read.await.expect("closed").unwrap(), 0);
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
