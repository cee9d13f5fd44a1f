//! What each way of making sure a pooled connection is open costs, on loopback:
//! (a) trusting cached readiness: no system call (not measured: ~0);
//! (b) asking the kernel: one recv(MSG_PEEK) on the non-blocking socket (EAGAIN = open);
//! (c) a fresh connection instead: connect + accept, and the request's round trip on it,
//!     against the same round trip on a reused connection.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(b"k").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_nonblocking(true).unwrap();
    let n = 1_000_000;
    let mut probe = [0u8; 1];
    let t = Instant::now();
    for _ in 0..n {
        let r = c.peek(&mut probe);
        assert!(matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock));
    }
    let peek_ns = t.elapsed().as_nanos() as f64 / n as f64;
    c.set_nonblocking(false).unwrap();
    let mut c = c;
    let rounds = 20_000;
    let rt = |s: &mut TcpStream| {
        s.write_all(b"q").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
    };
    let t = Instant::now();
    for _ in 0..rounds {
        rt(&mut c);
    }
    let reuse_us = t.elapsed().as_nanos() as f64 / rounds as f64 / 1000.0;
    let fresh_rounds = 5_000;
    let t = Instant::now();
    for _ in 0..fresh_rounds {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        rt(&mut s);
    }
    let fresh_us = t.elapsed().as_nanos() as f64 / fresh_rounds as f64 / 1000.0;
    println!("peek (kernel check, connection open): {peek_ns:.0} ns per call ({n} calls)");
    println!("request round trip on a reused connection: {reuse_us:.1} us ({rounds} rounds)");
    println!("connect + request round trip on a fresh connection: {fresh_us:.1} us ({fresh_rounds} rounds, server thread per connection)");
}
