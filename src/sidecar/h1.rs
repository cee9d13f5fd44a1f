//! The upstream side of the proxy: a small HTTP/1.1 client driven by the request's own task.
//!
//! hyper's client runs each connection as a task of its own and talks to it over channels, so
//! every proxied request crossed two tasks and three channels and woke the other task twice.
//! Here the task that serves the client request writes the upstream request, reads the response
//! head and streams the response body straight from the socket. A connection goes back to its
//! pool once its response body has been read to the end, with nothing left over.
//!
//! Scope is what a reverse proxy needs from an upstream (RFC 9112): responses framed by
//! `Content-Length`, `chunked` or the connection's close; interim 1xx responses skipped; `101
//! Switching Protocols` handed over as a raw connection. Trailers are read and dropped (response
//! trailers, and those of a streamed request body). No pipelining and no HTTP/1.0 keep-alive:
//! such connections are used once. A response head may be up to 64 KiB (Envoy's default limit
//! is 60 KiB, NGINX's `proxy_buffer_size` 4-8 KiB; hyper's client allowed about 400 KiB).
//!
//! The codec knows nothing else of the sidecar (`tests/layering.rs` holds it to that): it sends
//! any body that says how much of it is held ([`SendBody`]), and the per-try timer that travels
//! with a pooled connection is its own [`Timer`].

use std::{
    error::Error as StdError,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Sleep};

/// A response head larger than this is refused (real upstreams send a few hundred bytes).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// How much room a read asks for: a typical response fits in one.
const READ_SIZE: usize = 8 * 1024;
/// A replayable body up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;
/// How much of an early 2xx answer is held while the request body still goes out.
const EARLY_ANSWER_LIMIT: usize = 1 << 20;
/// A chunk-size line or trailer field longer than this is a protocol error.
const MAX_LINE: usize = 4096;

/// A per-try timer that travels with its connection. Moving a timer's deadline later is one
/// atomic store while it is still armed (tokio extends it in place), where a new timer per
/// request costs a timer-wheel insertion and removal.
pub type Timer = Pin<Box<Sleep>>;

/// A request body as the codec sends it: a body held whole in memory goes out with a
/// `Content-Length` (a small one in the same write as the head), a streamed one as it comes.
pub trait SendBody: Body<Data = Bytes, Error: StdError + 'static> + Unpin {
    fn held(&self) -> Held<'_>;
}

/// How much of a request body is in memory before it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held<'a> {
    /// No body bytes: the head's own `Content-Length`, if any, is kept (`POST` with
    /// `Content-Length: 0`).
    Nothing,
    /// The whole body.
    Whole(&'a Bytes),
    /// Some or none of it: the rest comes from the client.
    Streamed,
}

impl SendBody for http_body_util::Empty<Bytes> {
    fn held(&self) -> Held<'_> {
        Held::Nothing
    }
}

/// One upstream connection, idle or serving one request.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read from the upstream and not yet used.
    buf: BytesMut,
    /// The request head being written; kept to save an allocation per request.
    head_buf: Vec<u8>,
    /// Bytes of interim (1xx) heads consumed in the current exchange: a connection that
    /// answered anything at all did not just close under us (not a keep-alive race).
    consumed: usize,
    /// The per-try timer that travels with the connection.
    pub timer: Option<Timer>,
    /// The upstream's `Keep-Alive: timeout=N` on its last response: how long it keeps this
    /// connection open while idle.
    keep_alive_timeout: Option<std::time::Duration>,
}

/// Why an exchange failed before a usable response head.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request: {source}")]
    Write {
        source: io::Error,
        /// Some request bytes were written before the failure.
        sent: bool,
    },
    #[error("connection closed after {received} bytes of the response head")]
    Closed { received: usize },
    #[error("reading the response head: {source}")]
    Read { source: io::Error, received: usize },
    #[error("invalid response: {0}")]
    Parse(String),
    /// The client's own request body failed while it was being forwarded.
    #[error("{0}")]
    ClientBody(String),
}

impl Error {
    /// The error with its sources, `outer: inner`, for logs and `Proxy-Status` details.
    pub fn detail(&self) -> String {
        error_chain(self)
    }
}

/// A failed exchange, with the request body when none of it was sent (it can go elsewhere).
#[derive(Debug)]
pub struct Failed<B> {
    pub error: Error,
    pub unsent: Option<B>,
}

/// Why a response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream closed the connection with the response body incomplete")]
    Incomplete,
    #[error("reading the response body: {0}")]
    Io(#[from] io::Error),
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
}

/// A response head and what follows it.
pub struct Received {
    pub head: http::response::Parts,
    pub body: ResponseBody,
}

/// The response body as the exchange left it (not hyper's `Incoming`: this one may be whole
/// already, or an upgraded connection).
pub enum ResponseBody {
    /// The whole body came with the head (the common small response). `idle` is the connection,
    /// ready for its next request, unless it must close.
    Done {
        data: Option<Bytes>,
        idle: Option<Conn>,
    },
    /// More to read from the connection.
    Streaming(BodyStream),
    /// `101 Switching Protocols`: the connection now carries the upgraded protocol; `early`
    /// holds bytes of it that came with the head.
    Upgraded { io: TcpStream, early: Bytes },
}

/// A response body being read from its connection.
#[derive(Debug)]
pub struct BodyStream {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
}

/// How the end of a message body is found (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

enum Step {
    Data(Bytes),
    More,
    End,
}

// === impl Conn ===

impl Conn {
    pub async fn connect(addr: std::net::SocketAddr) -> io::Result<Conn> {
        let io = TcpStream::connect(addr).await?;
        let _ = io.set_nodelay(true);
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            head_buf: Vec::new(),
            consumed: 0,
            timer: None,
            keep_alive_timeout: None,
        })
    }

    /// Can an idle connection take a request? Costs no system call unless the reactor has seen
    /// the socket turn readable, which an idle HTTP/1 connection only does when the upstream
    /// closed it (or sent bytes nobody asked for: either way it is not used again). No waker
    /// and no task budget are involved, so any thread may ask, any number of times.
    pub fn is_idle_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Is an idle connection still open, by the kernel's word rather than the reactor's? One
    /// `recv(MSG_PEEK)` on the non-blocking socket: `EAGAIN` (nothing to read) means open; the
    /// upstream's FIN (0 bytes), a reset, or bytes nobody asked for mean it is not usable. The
    /// reactor's cached readiness (`is_idle_usable`) lags the kernel until the worker next polls
    /// for events, which on a busy worker is after the request was written; this does not.
    pub fn is_open_now(&self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(&self.io).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// The upstream's `Keep-Alive: timeout` on its last response, if it sent one.
    pub fn keep_alive_timeout(&self) -> Option<std::time::Duration> {
        self.keep_alive_timeout
    }

    /// Ready to wait in a pool: a read buffer grown by a large head or body is let go.
    pub fn make_idle(&mut self) {
        if self.buf.capacity() > 2 * READ_SIZE {
            self.buf = BytesMut::new();
        }
    }

    /// Sends one request and reads the response head. `parts` is the head as it goes upstream
    /// (origin-form target, hop-by-hop headers removed); `host` is used when it has no `Host`.
    /// With `upgrade`, a `101` response hands over the connection.
    pub async fn send<B: SendBody>(
        mut self,
        parts: &Parts,
        host: &HeaderValue,
        body: B,
        upgrade: bool,
    ) -> Result<Received, Failed<B>> {
        self.consumed = 0;
        let mut head = std::mem::take(&mut self.head_buf);
        let held = body.held();
        let framing = encode_head(parts, host, held, &mut head);
        let coalesce = match held {
            Held::Nothing => true,
            Held::Whole(b) if b.len() <= COALESCE => {
                head.extend_from_slice(b);
                true
            }
            _ => false,
        };
        let written = self.write_head(&head).await;
        self.keep_head_buf(head);
        match written {
            Ok(()) => {}
            Err(error @ Error::Write { sent: false, .. }) => {
                return Err(Failed {
                    unsent: Some(body),
                    error,
                })
            }
            Err(error) => return self.answer_after(error, parts, upgrade).await,
        }
        let complete = if coalesce {
            true
        } else {
            match self.send_body(body, framing).await {
                Ok(all) => all,
                Err(error @ Error::Write { .. }) => {
                    return self.answer_after(error, parts, upgrade).await
                }
                Err(error) => {
                    return Err(Failed {
                        error,
                        unsent: None,
                    })
                }
            }
        };
        self.read_response(&parts.method, upgrade, complete)
            .await
            .map_err(|error| Failed {
                error,
                unsent: None,
            })
    }

    /// Writing failed after part of the request left. An upstream that refuses a request before
    /// reading all of it (a 413 to a large upload) answers and closes, and the close makes our
    /// next write fail: its answer is already in the socket, ahead of the reset, and is what the
    /// client should get. Without one, the write error stands. The connection is dead either way,
    /// so the read ends at once (and the attempt's timer bounds it regardless).
    async fn answer_after<B>(
        self,
        error: Error,
        parts: &Parts,
        upgrade: bool,
    ) -> Result<Received, Failed<B>> {
        match self.read_response(&parts.method, upgrade, false).await {
            Ok(received) => Ok(received),
            Err(parse @ Error::Parse(_)) => Err(Failed {
                error: parse,
                unsent: None,
            }),
            Err(_) => Err(Failed {
                error,
                unsent: None,
            }),
        }
    }

    /// An idle connection keeps a head-sized write buffer, not a large body's.
    fn keep_head_buf(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= 4096 {
            self.head_buf = buf;
        }
    }

    /// Writes the request head, telling whether any of it left when writing fails (a request
    /// none of whose bytes were written can go to another endpoint whatever its method).
    async fn write_head(&mut self, mut head: &[u8]) -> Result<(), Error> {
        let mut sent = false;
        while !head.is_empty() {
            match self.io.write(head).await {
                Ok(0) => {
                    return Err(Error::Write {
                        source: io::ErrorKind::WriteZero.into(),
                        sent,
                    })
                }
                Ok(n) => {
                    head = &head[n..];
                    sent = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(Error::Write { source, sent }),
            }
        }
        Ok(())
    }

    /// Streams a body after its head. An upstream that answers before it has the whole body
    /// (a 413, an early error) gets no more of it: the response is read, and the connection is
    /// not used again. Returns whether the whole body was sent.
    async fn send_body<B: SendBody>(&mut self, body: B, framing: BodyOut) -> Result<bool, Error> {
        let (mut rd, mut wr) = self.io.split();
        let mut probe = [0u8; 1];
        let mut sending = std::pin::pin!(write_body(&mut wr, body, framing));
        let (buf, consumed) = (&mut self.buf, &mut self.consumed);
        let mut early = EarlyAnswer::default();
        loop {
            tokio::select! {
                biased;
                r = &mut sending => return r.map(|()| true),
                // Bytes (or the close) before the body is done. A peek, not readiness:
                // readiness can be stale, a peek waits for real bytes.
                r = rd.peek(&mut probe) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return Ok(false);
                    }
                    buf.reserve(READ_SIZE);
                    match rd.try_read_buf(buf) {
                        Ok(0) => return Ok(false),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => return Ok(false),
                    }
                    if !early.body_goes_on(buf, consumed) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    async fn read_response(
        mut self,
        method: &Method,
        upgrade: bool,
        request_complete: bool,
    ) -> Result<Received, Error> {
        loop {
            let (mut head, keep_alive, head_len) = self.read_head().await?;
            let status = head.status;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                if !upgrade {
                    return Err(Error::Parse(
                        "101 Switching Protocols to a request that asked for no upgrade".into(),
                    ));
                }
                let early = self.buf.split().freeze();
                return Ok(Received {
                    head,
                    body: ResponseBody::Upgraded { io: self.io, early },
                });
            }
            if status.is_informational() {
                // 100 Continue, 103 Early Hints: the final response follows.
                self.consumed += head_len;
                continue;
            }
            let framing = body_framing(method, status, &head.headers)?;
            let mut keep_alive = keep_alive && request_complete && !upgrade;
            self.keep_alive_timeout = keep_alive_timeout(&head.headers);
            if head.headers.contains_key(header::TRANSFER_ENCODING)
                && head.headers.remove(header::CONTENT_LENGTH).is_some()
            {
                // RFC 9112 §6.3: Transfer-Encoding wins, the length must not travel on (the
                // client would frame the body by it), and such a connection is not trusted again.
                keep_alive = false;
            }
            // The common case: the whole body is already here.
            if let Framing::Length(n) = framing {
                if (self.buf.len() as u64) >= n {
                    let data = (n > 0).then(|| self.buf.split_to(n as usize).freeze());
                    let idle = (keep_alive && self.buf.is_empty()).then_some(self);
                    return Ok(Received {
                        head,
                        body: ResponseBody::Done { data, idle },
                    });
                }
            }
            return Ok(Received {
                head,
                body: ResponseBody::Streaming(BodyStream {
                    conn: Some(self),
                    framing,
                    keep_alive,
                }),
            });
        }
    }

    /// Reads until a complete response head is in the buffer and parses it; also says how many
    /// bytes the head took.
    async fn read_head(&mut self) -> Result<(http::response::Parts, bool, usize), Error> {
        use tokio::io::AsyncReadExt;
        loop {
            if !self.buf.is_empty() {
                let before = self.buf.len();
                if let Some((head, keep_alive)) = parse_head(&mut self.buf)? {
                    return Ok((head, keep_alive, before - self.buf.len()));
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(head_too_large());
                }
            }
            self.buf.reserve(READ_SIZE);
            let received = self.consumed + self.buf.len();
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => return Err(Error::Closed { received }),
                Ok(_) => {}
                Err(source) => return Err(Error::Read { source, received }),
            }
        }
    }
}

/// Writes a streamed request body, chunk-encoded when the head said so.
async fn write_body<B: SendBody>(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    mut body: B,
    framing: BodyOut,
) -> Result<(), Error> {
    let failed = |source| Error::Write { source, sent: true };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::ClientBody(error_chain(&e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let written = if framing == BodyOut::Chunked {
            let mut out = BytesMut::with_capacity(data.len() + 12);
            out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.put_slice(&data);
            out.put_slice(b"\r\n");
            wr.write_all(&out).await
        } else {
            wr.write_all(&data).await
        };
        written.map_err(failed)?;
    }
    if framing == BodyOut::Chunked {
        wr.write_all(b"0\r\n\r\n").await.map_err(failed)?;
    }
    Ok(())
}

/// What the upstream answered so far while the request body goes out.
#[derive(Default)]
struct EarlyAnswer {
    /// A final 2xx came (a full-duplex upstream answering as it reads): the body goes on, and
    /// what the upstream sends meanwhile is held in the buffer, so an upstream that streams its
    /// answer never blocks on us and stops reading.
    answered: bool,
}

impl EarlyAnswer {
    /// New bytes from the upstream are in `buf`: does the body go on? Interim heads (`100
    /// Continue`, asked for by the client's `Expect`) are taken off and counted in `consumed`;
    /// a refusal (413, 401, a redirect...) or garbage ends the body.
    fn body_goes_on(&mut self, buf: &mut BytesMut, consumed: &mut usize) -> bool {
        if self.answered {
            // Past the limit the body is cut short; the answer goes on.
            return buf.len() <= EARLY_ANSWER_LIMIT;
        }
        loop {
            match early_head(buf) {
                Early::Interim(len) => {
                    let _ = buf.split_to(len);
                    *consumed += len;
                }
                Early::Partial => return buf.len() < MAX_HEAD,
                Early::Final(status) if status.is_success() => {
                    self.answered = true;
                    return true;
                }
                Early::Final(_) => return false,
            }
        }
    }
}

/// What an upstream sent while the request body was still going out.
enum Early {
    Partial,
    /// An interim (1xx, not 101) head of this many bytes.
    Interim(usize),
    /// A final head (or 101, or bytes that are no head at all: status 0).
    Final(StatusCode),
}

fn early_head(buf: &[u8]) -> Early {
    // Left uninitialised (as hyper does): filling 100 empty headers cost more than parsing a
    // small head.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Partial) => Early::Partial,
        Ok(httparse::Status::Complete(len)) => match resp.code {
            Some(code @ 100..=199) if code != 101 => Early::Interim(len),
            code => Early::Final(
                code.and_then(|c| StatusCode::from_u16(c).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY),
            ),
        },
        Err(_) => Early::Final(StatusCode::BAD_GATEWAY),
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyOut {
    /// No body, or a body whose length the head states.
    Sized,
    Chunked,
}

/// Writes the request head in wire form into `out` (cleared first); says how its body follows.
fn encode_head(parts: &Parts, host: &HeaderValue, body: Held<'_>, out: &mut Vec<u8>) -> BodyOut {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.clear();
    out.reserve(256 + parts.headers.len() * 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::HOST) {
        put_header(out, b"host", host.as_bytes());
    }
    let declared = parts.headers.get(header::CONTENT_LENGTH);
    let framing = match body {
        Held::Whole(b) => {
            put_header(out, b"content-length", b.len().to_string().as_bytes());
            BodyOut::Sized
        }
        Held::Nothing => {
            // `POST` with `Content-Length: 0` keeps saying so.
            if let Some(v) = declared {
                put_header(out, b"content-length", v.as_bytes());
            }
            BodyOut::Sized
        }
        // hyper's server checked the client's framing: a declared length is exact.
        Held::Streamed => match declared {
            Some(v) => {
                put_header(out, b"content-length", v.as_bytes());
                BodyOut::Sized
            }
            None => {
                put_header(out, b"transfer-encoding", b"chunked");
                BodyOut::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    framing
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses a complete response head off the front of `buf`; `None` when more bytes are needed.
/// Header values share the head's bytes rather than being copied. Returns the head and whether
/// the connection may carry another request after this response.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(http::response::Parts, bool)>, Error> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        // However the bytes were split into reads, a head over the limit is refused.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Parse(format!(
                "more than {MAX_HEADERS} response headers"
            )))
        }
        Err(e) => return Err(Error::Parse(format!("response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| Error::Parse(format!("status code {code} out of range")))?;
    let http11 = resp.version == Some(1);
    let base = buf.as_ptr() as usize;
    let mut spans: smallvec::SmallVec<[(usize, usize, usize, usize); 16]> =
        smallvec::SmallVec::new();
    for h in resp.headers.iter() {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        spans.push((n, n + h.name.len(), v, v + h.value.len()));
    }
    let bytes = buf.split_to(len).freeze();
    // Room for what the proxy adds (`Via`, `Proxy-Status`) without growing the map.
    let mut map = HeaderMap::with_capacity(spans.len() + 2);
    let mut keep_alive = http11;
    for (ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&bytes[ns..ne])
            .map_err(|_| Error::Parse("invalid header name".into()))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs..ve))
            .map_err(|_| Error::Parse(format!("invalid value of response header {name}")))?;
        if name == header::CONNECTION && has_token(&value, "close") {
            keep_alive = false;
        }
        map.append(name, value);
    }
    let mut r = http::Response::new(());
    *r.status_mut() = status;
    *r.version_mut() = if http11 {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_10
    };
    *r.headers_mut() = map;
    Ok(Some((r.into_parts().0, keep_alive)))
}

fn head_too_large() -> Error {
    Error::Parse(format!("response head larger than {} KiB", MAX_HEAD / 1024))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Is the message's `Transfer-Encoding` (over all its field lines) exactly `chunked`?
pub fn is_chunked_only(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    matches!(
        (codings.next(), codings.next()),
        (Some(t), None) if t.eq_ignore_ascii_case(b"chunked")
    )
}

/// `outer: inner: innermost`, for logs and `Proxy-Status` details.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = e.source();
    }
    s
}

/// `Keep-Alive: timeout=5, max=100` → 5 s (RFC 2068 §19.7.1.1; Node.js and Apache send it).
fn keep_alive_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("keep-alive")?.to_str().ok()?;
    v.split(',').find_map(|p| {
        let (k, n) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        let secs: u64 = n.trim().trim_matches('"').parse().ok()?;
        Some(std::time::Duration::from_secs(secs))
    })
}

/// RFC 9112 §6.3, for a response to `method`.
fn body_framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, Error> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Only `chunked` alone: the proxy decodes no other coding, and passing a body on with
        // its coding dropped (`Transfer-Encoding` is hop-by-hop) would hand the client gzip
        // bytes labelled as plain content; a body "read until close" under an unknown coding
        // is no better.
        if is_chunked_only(headers) {
            return Ok(Framing::Chunked(Chunk::Size));
        }
        let codings: Vec<_> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        return Err(Error::Parse(format!(
            "response transfer coding {:?} is not supported (only chunked)",
            codings.join(", ")
        )));
    }
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let s = v
            .to_str()
            .map_err(|_| Error::Parse("invalid content-length".into()))?;
        for part in s.split(',') {
            let part = part.trim();
            let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Error::Parse(format!("invalid content-length {s:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Parse("conflicting content-length values".into()));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

// === impl Framing ===

impl Framing {
    /// Takes the next piece of body out of `buf`, or says more bytes are needed.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        loop {
            match self {
                Framing::Length(0) => return Ok(Step::End),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(chunk) => match *chunk {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        let size = chunk_size(&line)?;
                        *chunk = if size == 0 {
                            Chunk::Trailer
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::More);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *chunk = if left == n as u64 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n as u64)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        if !line.is_empty() {
                            return Err(BodyError::Chunked("chunk data longer than its size"));
                        }
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailer => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        if line.is_empty() {
                            *self = Framing::Length(0);
                            return Ok(Step::End);
                        }
                        // A trailer field: dropped.
                    }
                },
            }
        }
    }

    /// The upstream closed the connection: the end of a close-delimited body, else too early.
    fn at_eof(&self) -> Result<(), BodyError> {
        match self {
            Framing::Close | Framing::Length(0) => Ok(()),
            _ => Err(BodyError::Incomplete),
        }
    }
}

/// One line without its line ending (CRLF, or a bare LF as RFC 9112 §2.2 allows).
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line.freeze()))
        }
        None if buf.len() > MAX_LINE => Err(BodyError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// `1a;ext=1` → 26. Extensions are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    let rest = &line[digits..];
    if !rest.is_empty() && !matches!(rest[0], b';' | b' ' | b'\t') {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    let s = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(s, 16).map_err(|_| BodyError::Chunked("invalid chunk size"))
}

// === impl BodyStream ===

impl BodyStream {
    /// The next piece of the body; `None` at its end.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match self.framing.step(&mut conn.buf) {
                Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(b))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if conn.buf.capacity() - conn.buf.len() < READ_SIZE / 2 {
                conn.buf.reserve(READ_SIZE);
            }
            if let Err(e) = std::task::ready!(conn.io.poll_read_ready(cx)) {
                self.conn = None;
                return Poll::Ready(Some(Err(e.into())));
            }
            match conn.io.try_read_buf(&mut conn.buf) {
                Ok(0) => {
                    let end = self.framing.at_eof();
                    self.conn = None;
                    return Poll::Ready(match end {
                        Ok(()) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                Ok(_) => {}
                // Readiness was stale: poll_read_ready registers for the next event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// The per-try timer goes back to the pool with the connection.
    pub fn keep_timer(&mut self, timer: Timer) {
        if let Some(conn) = self.conn.as_mut() {
            conn.timer = Some(timer);
        }
    }

    /// After the end of the body: the connection, if it can carry another request.
    pub fn take_idle(&mut self) -> Option<Conn> {
        let conn = self.conn.take()?;
        let done = self.framing == Framing::Length(0);
        (done && self.keep_alive && conn.buf.is_empty()).then_some(conn)
    }

    pub fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing == Framing::Length(0)
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(framing: &mut Framing, wire: &[u8]) -> Result<(Vec<u8>, bool), BodyError> {
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        loop {
            match framing.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::More => return Ok((out, false)),
                Step::End => return Ok((out, true)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_trailers_and_bare_lf() {
        let mut f = Framing::Chunked(Chunk::Size);
        let (data, end) = chunks(
            &mut f,
            b"5;name=v\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(data, b"hello world");
        assert!(end);

        let mut f = Framing::Chunked(Chunk::Size);
        let (data, end) = chunks(&mut f, b"3\nabc\n0\n\n").unwrap();
        assert_eq!((data.as_slice(), end), (&b"abc"[..], true));
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"4\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
        for cut in 0..wire.len() {
            let mut f = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut end = false;
            for part in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(part);
                loop {
                    match f.step(&mut buf).unwrap() {
                        Step::Data(b) => out.extend_from_slice(&b),
                        Step::More => break,
                        Step::End => {
                            end = true;
                            break;
                        }
                    }
                }
            }
            assert_eq!(out, b"wikipedia in\r\n\r\nchunks.", "cut at {cut}");
            assert!(end, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX\r\n",
            b"11111111111111111\r\n",
            b"5x\r\n",
        ] {
            let mut f = Framing::Chunked(Chunk::Size);
            assert!(
                chunks(&mut f, wire).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut f = Framing::Chunked(Chunk::Size);
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(chunks(&mut f, &long).is_err());
    }

    #[test]
    fn length_and_close_framing() {
        let mut f = Framing::Length(5);
        let (data, end) = chunks(&mut f, b"hel").unwrap();
        assert_eq!((data.as_slice(), end), (&b"hel"[..], false));
        let (data, end) = chunks(&mut f, b"loEXTRA").unwrap();
        assert_eq!((data.as_slice(), end), (&b"lo"[..], true));
        assert!(Framing::Length(2).at_eof().is_err());
        assert!(Framing::Chunked(Chunk::Size).at_eof().is_err());
        let mut f = Framing::Close;
        let (data, end) = chunks(&mut f, b"abc").unwrap();
        assert_eq!((data.as_slice(), end), (&b"abc"[..], false));
        assert!(f.at_eof().is_ok());
    }

    fn head(wire: &str) -> Result<Option<(http::response::Parts, bool)>, Error> {
        parse_head(&mut BytesMut::from(wire.as_bytes()))
    }

    #[test]
    fn response_heads_parse_with_shared_values_and_keep_alive() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc"[..],
        );
        let (h, keep) = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::CREATED);
        assert!(keep);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"abc", "the body stays in the buffer");

        let (_, keep) = head("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!keep);
        let (h, keep) = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!keep);
        assert_eq!(h.version, http::Version::HTTP_10);
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    #[test]
    fn malformed_heads_are_protocol_errors() {
        for wire in [
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
        ] {
            assert!(matches!(head(wire), Err(Error::Parse(_))), "{wire:?}");
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        let err = head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).unwrap_err();
        assert!(err.to_string().contains("more than 100"), "{err}");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        let get = Method::GET;
        let cl = h(&[("content-length", "10")]);
        assert_eq!(body_framing(&get, ok, &cl).unwrap(), Framing::Length(10));
        assert_eq!(
            body_framing(&Method::HEAD, ok, &cl).unwrap(),
            Framing::Length(0)
        );
        assert_eq!(
            body_framing(&get, StatusCode::NOT_MODIFIED, &cl).unwrap(),
            Framing::Length(0)
        );
        assert_eq!(
            body_framing(&get, StatusCode::NO_CONTENT, &h(&[])).unwrap(),
            Framing::Length(0)
        );
        let te = h(&[("transfer-encoding", "Chunked"), ("content-length", "5")]);
        assert_eq!(
            body_framing(&get, ok, &te).unwrap(),
            Framing::Chunked(Chunk::Size)
        );
        // Anything but `chunked` alone is refused, never passed on with its coding dropped.
        for codings in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, gzip"],
            &["gzip"],
            &["chunked, chunked"],
            &[" , "],
        ] {
            let pairs: Vec<_> = codings.iter().map(|c| ("transfer-encoding", *c)).collect();
            assert!(
                matches!(body_framing(&get, ok, &h(&pairs)), Err(Error::Parse(_))),
                "{codings:?}"
            );
        }
        assert_eq!(body_framing(&get, ok, &h(&[])).unwrap(), Framing::Close);
        let same = h(&[("content-length", "4, 4"), ("content-length", "4")]);
        assert_eq!(body_framing(&get, ok, &same).unwrap(), Framing::Length(4));
        for bad in ["4, 5", "-1", "+4", "", "0x10", "99999999999999999999999"] {
            assert!(
                body_framing(&get, ok, &h(&[("content-length", bad)])).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keep_alive_timeouts_parse() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("keep-alive", HeaderValue::from_str(v).unwrap());
            keep_alive_timeout(&m)
        };
        let secs = |n| Some(std::time::Duration::from_secs(n));
        assert_eq!(h("timeout=5"), secs(5));
        assert_eq!(h("max=100, Timeout = 15"), secs(15));
        assert_eq!(h("max=100"), None);
        assert_eq!(h("timeout=soon"), None);
        assert_eq!(keep_alive_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn an_early_answer_decides_whether_the_request_body_goes_on() {
        let goes_on = |early: &mut EarlyAnswer, wire: &[u8]| {
            let mut buf = BytesMut::from(wire);
            let mut consumed = 0;
            let on = early.body_goes_on(&mut buf, &mut consumed);
            (on, consumed, buf.len())
        };
        let fresh = EarlyAnswer::default;
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert_eq!(goes_on(&mut fresh(), cont), (true, cont.len(), 0));
        assert_eq!(
            goes_on(&mut fresh(), b"HTTP/1.1 2"),
            (true, 0, 10),
            "partial"
        );
        let big_partial = vec![b'x'; MAX_HEAD];
        assert!(
            !goes_on(&mut fresh(), &big_partial).0,
            "no head within MAX_HEAD"
        );
        let refused = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too Large\r\n\r\n";
        assert_eq!(
            goes_on(&mut fresh(), refused),
            (false, cont.len(), refused.len() - cont.len())
        );
        assert!(!goes_on(&mut fresh(), b"garbage\r\n\r\n").0);

        // A 2xx while the body goes out: the body goes on, what follows is held, up to a limit.
        let mut early = fresh();
        let ok = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(goes_on(&mut early, ok), (true, 0, ok.len()));
        assert!(early.answered);
        assert!(goes_on(&mut early, &vec![b'x'; EARLY_ANSWER_LIMIT]).0);
        assert!(!goes_on(&mut early, &vec![b'x'; EARLY_ANSWER_LIMIT + 1]).0);
    }

    #[test]
    fn request_heads_carry_their_framing() {
        let req = |method: &str, headers: &[(&str, &str)]| {
            let mut b = http::Request::builder().method(method).uri("/p?q=1");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let host = HeaderValue::from_static("10.0.0.1:80");
        let enc = |parts: &Parts, body: Held<'_>| {
            let mut out = b"left over".to_vec();
            let f = encode_head(parts, &host, body, &mut out);
            (out, f)
        };
        let (wire, f) = enc(&req("GET", &[]), Held::Nothing);
        assert_eq!(wire, b"GET /p?q=1 HTTP/1.1\r\nhost: 10.0.0.1:80\r\n\r\n");
        assert!(f == BodyOut::Sized);

        let (wire, _) = enc(
            &req("POST", &[("host", "app"), ("content-length", "99")]),
            Held::Whole(&Bytes::from_static(b"abc")),
        );
        assert_eq!(
            wire,
            b"POST /p?q=1 HTTP/1.1\r\nhost: app\r\ncontent-length: 3\r\n\r\n"
        );
        let (wire, _) = enc(
            &req("POST", &[("host", "app"), ("content-length", "0")]),
            Held::Nothing,
        );
        assert_eq!(
            wire,
            b"POST /p?q=1 HTTP/1.1\r\nhost: app\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
