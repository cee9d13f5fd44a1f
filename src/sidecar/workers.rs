//! Thread-per-core workers: each worker thread runs its own single-threaded tokio runtime with
//! its own accept socket per listener (SO_REUSEPORT) and its own upstream connection pools, so a
//! request never crosses threads: no work stealing, no cross-thread wake-ups (the model of
//! NGINX workers and Envoy's worker threads).

use std::{cell::Cell, future::Future, io, net::SocketAddr, pin::Pin};

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running this code, if it runs on one.
pub fn current() -> Option<usize> {
    WORKER.with(|w| w.get())
}

pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut senders = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("detour-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(i)));
                    rt.block_on(async move {
                        // Runs until the sidecar drops its handle; then the runtime (and any
                        // connection left after the drain) is dropped with the thread.
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job());
                        }
                    });
                })?;
            senders.push(tx);
        }
        Ok(Workers { senders })
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Runs `make()`'s future on worker `i`.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        let _ = self.senders[i].send(job);
    }
}

/// Binds `n` listening sockets on `addr` with SO_REUSEPORT, so the kernel spreads new
/// connections over the workers. With port 0 the first socket picks the port and the others
/// join it.
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut target = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        // Only several sockets of ours share a port; a single one stays exclusive, so a port
        // that is taken is an error rather than silently shared.
        if n > 1 {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&target.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        if target.port() == 0 {
            target = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_their_worker() {
        let w = Workers::start(2).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..2 {
            let tx = tx.clone();
            w.spawn_on(i, move || async move {
                tx.send((i, current())).unwrap();
            });
        }
        let mut got = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        got.sort();
        assert_eq!(got, vec![(0, Some(0)), (1, Some(1))]);
        assert_eq!(current(), None);
    }

    #[test]
    fn reuseport_sockets_share_one_port() {
        let ls = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
