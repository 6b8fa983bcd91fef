//! Requests without a body (nearly every GET, HEAD, DELETE…) go to targets over raw pooled
//! HTTP/1.1 connections that the request's own task writes and reads: the head is written
//! in one call, the response head parsed in place, and the body framed (`Content-Length`,
//! chunked, or until close) as the client's connection asks for it. No connection task, no
//! channel between tasks, no copy of header values; requests with a body, and upgrades,
//! stay on hyper's client ([`super::upstream`]), which streams both directions at once.
//!
//! Like the hyper pool, the pool here is the worker's own (thread-local), and a connection
//! goes back only after its response ended cleanly, with nothing left over.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::headers;
use super::pool::{self, IdlePool, Reusable};

/// A response head (status line and headers) larger than this is refused, as hyper does.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// One HTTP/1.1 connection to a target, idle between exchanges.
pub struct Conn {
    stream: TcpStream,
    target: SocketAddr,
    /// Reused for each response read; its memory is reclaimed once the previous response's
    /// pieces are gone.
    read: BytesMut,
}

thread_local! {
    static IDLE: RefCell<IdlePool<Conn>> = RefCell::new(IdlePool::default());
    /// Reused for each request head [`send`] writes.
    static HEAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Reusable for Conn {
    /// The target neither closed the connection nor sent anything unasked. Costs no system
    /// call unless the poller saw the socket become readable.
    fn usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Closes this worker's idle connections that expired or that their target closed.
pub fn sweep_idle() {
    pool::with(&IDLE, IdlePool::sweep);
}

pub type SendError = pool::SendError<io::Error>;

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Sends the bodiless request `parts` (origin-form URI, hop-by-hop headers removed) to
/// `target` and reads the response head.
pub async fn send(
    target: SocketAddr,
    connect: Duration,
    parts: &Parts,
) -> Result<Response<Body>, SendError> {
    let mut head = HEAD.with(|h| std::mem::take(&mut *h.borrow_mut()));
    head.clear();
    encode_head(&mut head, parts);
    let sent = send_head(target, connect, &head, &parts.method, |head| {
        Ok((head.status, spans(head)))
    })
    .await;
    HEAD.with(|h| *h.borrow_mut() = head);
    let ((status, (spans, count)), answer) = sent?;
    let (bytes, body) = answer.split_head();
    let chunked = matches!(body.framing, Framing::Chunked(_));
    let mut headers = HeaderMap::with_capacity(count);
    for &(name, value) in &spans[..count] {
        let name = HeaderName::from_bytes(&bytes[name.0..name.1])
            .map_err(|_| SendError::Failed(invalid("invalid header name")))?;
        // Content-Length means nothing beside chunked framing (RFC 9112 6.3).
        if chunked && name == CONTENT_LENGTH {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice(value.0..value.1))
            .map_err(|_| SendError::Failed(invalid("invalid header value")))?;
        headers.append(name, value);
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Where a header's name and value lie in the head's bytes.
type Span = ((usize, usize), (usize, usize));

/// Names and values as offsets into the head, so they can point into its bytes (no copy per
/// value) once the head is split off the buffer.
fn spans(head: &ResponseHead<'_>) -> ([Span; MAX_HEADERS], usize) {
    let base = head.bytes.as_ptr() as usize;
    let mut spans = [((0, 0), (0, 0)); MAX_HEADERS];
    for (span, h) in spans.iter_mut().zip(head.headers) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = ((name, name + h.name.len()), (value, value + h.value.len()));
    }
    (spans, head.headers.len())
}

/// A target's answer: its head's bytes, then whatever of the body was read with them.
pub struct Answer {
    /// Starts with the head's `len` bytes.
    buf: BytesMut,
    len: usize,
    /// Reads the rest; its own buffer is empty until the bytes after the head are handed on.
    body: Body,
}

impl Answer {
    /// The body, the head's bytes dropped.
    pub fn into_body(self) -> Body {
        let Answer {
            mut buf,
            len,
            mut body,
        } = self;
        buf.advance(len);
        body.buf = buf;
        body
    }

    /// The head's bytes, kept (header values can point into them), and the body.
    fn split_head(self) -> (Bytes, Body) {
        let Answer {
            mut buf,
            len,
            mut body,
        } = self;
        let head = buf.split_to(len).freeze();
        body.buf = buf;
        (head, body)
    }
}

/// Sends the request head `head` (a bodiless request, written as the target should see it)
/// to `target` and reads the response head, which `on_head` sees in place. A reused
/// connection that fails before the first byte of an answer (the target closed it meanwhile)
/// is retried once on a new connection when the method is idempotent.
pub async fn send_head<T>(
    target: SocketAddr,
    connect: Duration,
    head: &[u8],
    method: &Method,
    mut on_head: impl FnMut(&ResponseHead<'_>) -> io::Result<T>,
) -> Result<(T, Answer), SendError> {
    if let Some(conn) = pool::with(&IDLE, |idle| idle.take(target)).flatten() {
        match exchange(conn, head, method, &mut on_head).await {
            Ok(answer) => return Ok(answer),
            Err(Failure { error, answered }) => {
                if answered || !method.is_idempotent() {
                    return Err(SendError::Failed(error));
                }
            }
        }
    }
    let conn = dial(target, connect).await.map_err(SendError::Connect)?;
    exchange(conn, head, method, &mut on_head)
        .await
        .map_err(|f| SendError::Failed(f.error))
}

async fn dial(target: SocketAddr, connect: Duration) -> io::Result<Conn> {
    let stream = tokio::time::timeout(connect, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        target,
        read: BytesMut::new(),
    })
}

struct Failure {
    error: io::Error,
    /// Some of an answer arrived: the target saw the request.
    answered: bool,
}

async fn exchange<T>(
    mut conn: Conn,
    head: &[u8],
    method: &Method,
    on_head: &mut impl FnMut(&ResponseHead<'_>) -> io::Result<T>,
) -> Result<(T, Answer), Failure> {
    let unanswered = |error| Failure {
        error,
        answered: false,
    };
    conn.stream.write_all(head).await.map_err(unanswered)?;
    let mut buf = std::mem::take(&mut conn.read);
    // Once any of an answer has arrived, the target has seen the request.
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            let answered_error = |error| Failure {
                error,
                answered: true,
            };
            match parse_head(&buf, method, &mut *on_head) {
                Ok(Some(Parsed::Final {
                    len,
                    head,
                    framing,
                    keep_alive,
                })) => {
                    let body = Body {
                        conn: Some(conn),
                        buf: BytesMut::new(),
                        framing,
                        keep_alive,
                    };
                    return Ok((head, Answer { buf, len, body }));
                }
                // An interim answer (103 Early Hints…): the final one follows.
                Ok(Some(Parsed::Interim(len))) => {
                    buf.advance(len);
                    continue;
                }
                Ok(None) if buf.len() < MAX_HEAD => {}
                Ok(None) => return Err(answered_error(invalid("the response head is too large"))),
                Err(error) => return Err(answered_error(error)),
            }
        }
        buf.reserve(READ_SIZE);
        let n = conn
            .stream
            .read_buf(&mut buf)
            .await
            .map_err(|error| Failure { error, answered })?;
        if n == 0 {
            return Err(Failure {
                error: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the target closed the connection before answering",
                ),
                answered,
            });
        }
        answered = true;
    }
}

/// `METHOD target HTTP/1.1`, the headers as they are, an empty line.
fn encode_head(out: &mut Vec<u8>, parts: &Parts) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A final response head as parsed, borrowed from the read buffer.
pub struct ResponseHead<'a> {
    /// The whole head, status line to the empty line.
    pub bytes: &'a [u8],
    pub status: StatusCode,
    pub reason: &'a [u8],
    pub headers: &'a [httparse::Header<'a>],
    pub framing: Framing,
    /// A `Connection` header is present (it may name more hop-by-hop headers).
    connection: bool,
}

impl ResponseHead<'_> {
    /// Whether the header `name` concerns only the hop from the target to the proxy.
    pub fn is_hop_by_hop(&self, name: &str) -> bool {
        if headers::is_hop_by_hop_name(name.as_bytes()) {
            return true;
        }
        self.connection
            && self
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    }
}

enum Parsed<T> {
    /// What `on_head` made of the head, how many bytes the head took, how its body is
    /// framed, and whether the connection may carry another exchange after it.
    Final {
        len: usize,
        head: T,
        framing: Framing,
        keep_alive: bool,
    },
    /// An interim (1xx) head of this many bytes.
    Interim(usize),
}

/// How a response body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes remain.
    Length(u64),
    Chunked(Chunked),
    /// Until the target closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left, then its CRLF.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// Parses a complete response head at the front of `buf` and lets `on_head` read it in
/// place. `Ok(None)`: the head is not complete yet.
fn parse_head<T>(
    buf: &[u8],
    method: &Method,
    on_head: &mut impl FnMut(&ResponseHead<'_>) -> io::Result<T>,
) -> io::Result<Option<Parsed<T>>> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("malformed response head: {e}"))),
    };
    let code = parsed.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid status code"))?;
    let http10 = parsed.version == Some(0);
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid("the target switched protocols unasked"));
        }
        return Ok(Some(Parsed::Interim(len)));
    }
    let headers: &[httparse::Header<'_>] = parsed.headers;
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };

    let mut connection = false;
    let mut keep_alive = !http10;
    for value in named("connection") {
        connection = true;
        for token in value.value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if http10 && token.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if named("transfer-encoding").next().is_some() {
        // Chunked only when it is the final coding; otherwise the body runs to the close.
        let last = named("transfer-encoding")
            .flat_map(|h| h.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        if last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
            Framing::Chunked(Chunked::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if named("content-length").next().is_some() {
        Framing::Length(content_length(named("content-length").map(|h| h.value))?)
    } else {
        keep_alive = false;
        Framing::Close
    };
    let head = on_head(&ResponseHead {
        bytes: &buf[..len],
        status,
        reason: parsed.reason.unwrap_or_default().as_bytes(),
        headers,
        framing,
        connection,
    })?;
    Ok(Some(Parsed::Final {
        len,
        head,
        framing,
        keep_alive,
    }))
}

/// Parses `raw` as a complete final response head to a GET and shows it to `f`.
#[cfg(test)]
pub fn with_response_head<T>(raw: &[u8], f: impl FnOnce(&ResponseHead<'_>) -> T) -> T {
    let mut f = Some(f);
    let mut out = None;
    let parsed = parse_head(raw, &Method::GET, &mut |head| {
        out = f.take().map(|f| f(head));
        Ok(())
    });
    assert!(
        matches!(parsed, Ok(Some(Parsed::Final { .. }))),
        "not a final head"
    );
    out.expect("seen once")
}

/// One length, however often repeated; differing lengths are an error (RFC 9112 6.3).
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> io::Result<u64> {
    let mut length = None;
    for value in values {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(invalid("invalid Content-Length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    length.ok_or_else(|| invalid("invalid Content-Length"))
}

/// A target's response body, read off its connection as the client takes it. The connection
/// returns to the worker's pool when the body has ended cleanly with nothing left over.
pub struct Body {
    conn: Option<Conn>,
    /// Read but not yet handed on.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
}

/// What the body's buffer holds next ([`Body::next_piece`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The buffer's first `n` bytes are body data; [`Body::consume`] them once used.
    Data(usize),
    End,
    /// More has to be read ([`Body::fill`]).
    More,
}

impl Body {
    fn ended(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunked::Done)
        )
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// At the clean end: back to the pool if the connection may carry another exchange.
    fn finish(&mut self) {
        if let Some(mut conn) = self.conn.take()
            && self.keep_alive
            && self.ended()
            && self.buf.is_empty()
        {
            conn.read = std::mem::take(&mut self.buf);
            pool::with(&IDLE, |idle| idle.put(conn.target, conn));
        }
    }

    /// What was read and not yet handed on.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Decodes what is buffered, without reading: the next data, the end, or a need for more.
    pub fn next_piece(&mut self) -> io::Result<Piece> {
        loop {
            match self.framing {
                Framing::Length(0) | Framing::Chunked(Chunked::Done) => {
                    self.finish();
                    return Ok(Piece::End);
                }
                Framing::Length(left) => {
                    if self.buf.is_empty() {
                        return Ok(Piece::More);
                    }
                    return Ok(Piece::Data((self.buf.len() as u64).min(left) as usize));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(Piece::More);
                    }
                    return Ok(Piece::Data(self.buf.len()));
                }
                Framing::Chunked(state) => match chunk_step(&mut self.buf, state)? {
                    Step::Data(n) => return Ok(Piece::Data(n)),
                    Step::Next(next) => self.framing = Framing::Chunked(next),
                    Step::More => return Ok(Piece::More),
                },
            }
        }
    }

    /// Marks the first `n` buffered bytes (from [`Piece::Data`]) as handed on.
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.advanced(n);
    }

    /// Accounts for `n` bytes of data taken off the buffer.
    fn advanced(&mut self, n: usize) {
        let n = n as u64;
        self.framing = match self.framing {
            Framing::Length(left) => Framing::Length(left - n),
            Framing::Chunked(Chunked::Data(left)) if left == n => {
                Framing::Chunked(Chunked::DataEnd)
            }
            Framing::Chunked(Chunked::Data(left)) => Framing::Chunked(Chunked::Data(left - n)),
            other => other,
        };
        if self.ended() {
            self.finish();
        }
    }

    /// Reads more into the buffer. The target closing the connection ends a body framed by
    /// the close; any other body it cuts short.
    pub async fn fill(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(cut_short()));
        };
        self.buf.reserve(READ_SIZE);
        if ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.stream),
            cx,
            &mut self.buf
        ))? > 0
        {
            return Poll::Ready(Ok(()));
        }
        self.conn = None;
        if self.framing == Framing::Close {
            self.framing = Framing::Length(0);
            self.keep_alive = false;
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(Err(cut_short()))
    }

    /// The next piece of body data, or `None` at its end.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match self.next_piece()? {
                Piece::Data(n) => {
                    let data = self.buf.split_to(n).freeze();
                    self.advanced(n);
                    return Poll::Ready(Some(Ok(data)));
                }
                Piece::End => return Poll::Ready(None),
                Piece::More => ready!(self.poll_fill(cx))?,
            }
        }
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the target closed the connection mid-body",
    )
}

impl Drop for Body {
    /// A body at its end whose last read left nothing to poll still gives its connection back.
    fn drop(&mut self) {
        self.finish();
    }
}

/// What one step of chunked decoding found in the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The buffer's first `n` bytes are chunk data (the state still counts them as left).
    Data(usize),
    Next(Chunked),
    /// Needs more bytes.
    More,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

/// Decodes what `buf` holds in state `state` (RFC 9112 7.1): sizes, data, trailers (dropped:
/// the proxy forwards no trailers).
fn chunk_step(buf: &mut BytesMut, state: Chunked) -> io::Result<Step> {
    match state {
        Chunked::Size => {
            let Some(at) = line_len(buf)? else {
                return Ok(Step::More);
            };
            let line = &buf[..at];
            let digits = line.split(|b| *b == b';').next().unwrap_or_default();
            let digits = digits.trim_ascii();
            if digits.is_empty() || digits.len() > 16 {
                return Err(invalid("invalid chunk size"));
            }
            let size = std::str::from_utf8(digits)
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| invalid("invalid chunk size"))?;
            buf.advance(at + 2);
            Ok(Step::Next(if size == 0 {
                Chunked::Trailers
            } else {
                Chunked::Data(size)
            }))
        }
        Chunked::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            Ok(Step::Data((buf.len() as u64).min(left) as usize))
        }
        Chunked::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err(invalid("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::Next(Chunked::Size))
        }
        Chunked::Trailers => match line_len(buf)? {
            None => Ok(Step::More),
            Some(at) => {
                buf.advance(at + 2);
                Ok(Step::Next(if at == 0 {
                    Chunked::Done
                } else {
                    Chunked::Trailers
                }))
            }
        },
        Chunked::Done => Ok(Step::Next(Chunked::Done)),
    }
}

/// The length of the CRLF-terminated line at the front of `buf`, without its CRLF.
fn line_len(buf: &[u8]) -> io::Result<Option<usize>> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => Ok(Some(at)),
        None if buf.len() > MAX_LINE => Err(invalid("chunked framing line too long")),
        None => Ok(None),
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.get_mut()
            .poll_data(cx)
            .map(|d| d.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    fn get(path: &str) -> Parts {
        let (mut parts, ()) = http::Request::get(path)
            .header("host", "app.example")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = Version::HTTP_11;
        parts
    }

    /// Status, headers (name: value lines, as the target sent them), framing, keep-alive,
    /// and what follows the head.
    fn parse(raw: &str, method: &Method) -> (u16, Vec<String>, Framing, bool, Vec<u8>) {
        let buf = raw.as_bytes();
        let seen = |head: &ResponseHead<'_>| {
            Ok((
                head.status.as_u16(),
                head.headers
                    .iter()
                    .map(|h| format!("{}: {}", h.name, String::from_utf8_lossy(h.value)))
                    .collect::<Vec<_>>(),
            ))
        };
        match parse_head(buf, method, &mut { seen }).unwrap() {
            Some(Parsed::Final {
                len,
                head: (status, headers),
                framing,
                keep_alive,
            }) => (status, headers, framing, keep_alive, buf[len..].to_vec()),
            _ => panic!("no final head in {raw:?}"),
        }
    }

    fn parses(raw: &[u8]) -> io::Result<Option<Parsed<()>>> {
        parse_head(raw, &Method::GET, &mut |_| Ok(()))
    }

    #[tokio::test]
    async fn hypers_path_drops_content_length_beside_chunked_framing() {
        let (addr, target) = target(vec![
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nX-A: b\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        let response = send(addr, Duration::from_secs(1), &get("/")).await.unwrap();
        assert!(!response.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(response.headers()["x-a"], "b");
        assert_eq!(body_text(response.into_body()).await, "ok");
        IDLE.with(|idle| *idle.borrow_mut() = IdlePool::default());
        target.await.unwrap();
    }

    #[test]
    fn the_request_head_is_written_as_given() {
        let mut out = Vec::new();
        encode_head(&mut out, &get("/a/b?c=d"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: app.example\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (status, headers, f, keep, rest) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nok\n",
            &Method::GET,
        );
        assert_eq!(status, 200);
        assert_eq!(headers, ["Content-Length: 3", "X-A: b"]);
        assert_eq!(
            (f, keep, &rest[..]),
            (Framing::Length(3), true, &b"ok\n"[..])
        );

        let (_, _, f, _, _) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(f, Framing::Length(0), "HEAD answers carry no body");
        let (_, _, f, _, _) = parse("HTTP/1.1 304 Not Modified\r\n\r\n", &Method::GET);
        assert_eq!(f, Framing::Length(0));

        let (_, _, f, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((f, keep), (Framing::Chunked(Chunked::Size), true));

        let (_, _, f, keep, _) = parse("HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert_eq!((f, keep), (Framing::Close, false), "no length: until close");
        let (_, _, f, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((f, keep), (Framing::Close, false));

        let (_, _, _, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(!keep);
        let (_, _, _, keep, _) =
            parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &Method::GET);
        assert!(!keep, "HTTP/1.0 closes unless it says keep-alive");
        let (_, _, _, keep, _) = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(keep);
    }

    #[test]
    fn headers_named_by_connection_are_hop_by_hop() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: x-trace, Close\r\nX-Trace: 1\r\nKeep-Alive: 5\r\nContent-Length: 0\r\n\r\n";
        let mut hop = Vec::new();
        parse_head(raw, &Method::GET, &mut |head| {
            hop = head
                .headers
                .iter()
                .filter(|h| head.is_hop_by_hop(h.name))
                .map(|h| h.name.to_string())
                .collect();
            Ok(())
        })
        .unwrap();
        assert_eq!(hop, ["Connection", "X-Trace", "Keep-Alive"]);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_heads_wait() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parses(raw.as_bytes()).is_err(), "{raw:?}");
        }
        assert!(matches!(parses(b"HTTP/1.1 200 OK\r\nContent-"), Ok(None)));
        let interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1";
        assert!(matches!(
            parses(interim),
            Ok(Some(Parsed::Interim(len))) if &interim[len..] == b"HTTP/1.1"
        ));
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 1..wire.len() {
            let mut body = Body {
                conn: None,
                buf: BytesMut::new(),
                framing: Framing::Chunked(Chunked::Size),
                keep_alive: false,
            };
            let mut out = Vec::new();
            let mut fed = 0;
            loop {
                match body.next_piece().unwrap() {
                    Piece::Data(n) => {
                        out.extend_from_slice(&body.buffered()[..n]);
                        body.consume(n);
                    }
                    Piece::End => break,
                    Piece::More => {
                        let end = (fed + split).min(wire.len());
                        assert!(fed < end, "ran out of input at split {split}");
                        body.buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
            }
            assert_eq!(out, b"Wikipedia", "split {split}");
            assert!(body.buffered().is_empty());
        }
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert!(chunk_step(&mut buf, Chunked::Size).is_err());
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert!(chunk_step(&mut buf, Chunked::DataEnd).is_err());
    }

    /// A target that answers each request on one connection with the next canned response,
    /// recording the request heads it got; it counts its connections.
    async fn target(
        responses: Vec<&'static str>,
    ) -> (SocketAddr, tokio::task::JoinHandle<(usize, Vec<String>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut heads = Vec::new();
            let mut connections = 0;
            let mut responses = responses.into_iter().peekable();
            'accept: while let Ok((mut stream, _)) = listener.accept().await {
                connections += 1;
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 && responses.peek().is_none() {
                        break 'accept;
                    }
                    if n == 0 {
                        continue 'accept;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        heads.push(String::from_utf8(buf.drain(..at + 4).collect()).unwrap());
                        match responses.next() {
                            Some("CLOSE") => continue 'accept,
                            Some(r) => stream.write_all(r.as_bytes()).await.unwrap(),
                            None => panic!("more requests than answers"),
                        }
                    }
                }
            }
            (connections, heads)
        });
        (addr, task)
    }

    async fn body_text(body: Body) -> String {
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused_after_a_clean_end() {
        let (addr, target) = target(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthree",
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfour",
        ])
        .await;
        let connect = Duration::from_secs(1);
        for expected in ["one", "two", "three", "four"] {
            let response = send(addr, connect, &get("/")).await.unwrap();
            assert_eq!(body_text(response.into_body()).await, expected);
        }
        IDLE.with(|idle| *idle.borrow_mut() = IdlePool::default());
        let (connections, heads) = target.await.unwrap();
        assert_eq!(
            connections, 2,
            "a new connection only after `Connection: close`"
        );
        assert_eq!(heads.len(), 4);
        assert!(heads.iter().all(|h| h.starts_with("GET / HTTP/1.1\r\n")));
    }

    #[tokio::test]
    async fn a_body_cut_short_closes_its_connection() {
        let (addr, target) = target(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let connect = Duration::from_secs(1);
        let response = send(addr, connect, &get("/")).await.unwrap();
        let mut body = response.into_body();
        let first = std::future::poll_fn(|cx| body.poll_data(cx)).await;
        assert_eq!(&first.unwrap().unwrap()[..], b"part");
        drop(body);
        let response = send(addr, connect, &get("/")).await.unwrap();
        assert_eq!(body_text(response.into_body()).await, "ok");
        IDLE.with(|idle| *idle.borrow_mut() = IdlePool::default());
        let (connections, _) = target.await.unwrap();
        assert_eq!(connections, 2);
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections_their_target_closed() {
        let (addr, target) = target(vec!["HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"]).await;
        let response = send(addr, Duration::from_secs(1), &get("/")).await.unwrap();
        assert_eq!(body_text(response.into_body()).await, "a");
        let idle = || IDLE.with(|idle| idle.borrow().idle(addr));
        assert_eq!(idle(), 1);
        sweep_idle();
        assert_eq!(idle(), 1, "an open idle connection stays");
        // The target hangs up: its end of the kept-alive connection closes.
        target.abort();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while idle() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the closed connection stayed pooled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            sweep_idle();
        }
        IDLE.with(|idle| assert_eq!(idle.borrow().targets(), 0, "empty queues go too"));
    }

    #[tokio::test]
    async fn an_idempotent_request_on_a_connection_the_target_closed_is_retried() {
        let (addr, target) = target(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            // The target drops the kept-alive connection without answering the next request.
            "CLOSE",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
        ])
        .await;
        let connect = Duration::from_secs(1);
        let response = send(addr, connect, &get("/")).await.unwrap();
        assert_eq!(body_text(response.into_body()).await, "a");
        let response = send(addr, connect, &get("/")).await.unwrap();
        assert_eq!(body_text(response.into_body()).await, "b");
        IDLE.with(|idle| *idle.borrow_mut() = IdlePool::default());
        let (connections, heads) = target.await.unwrap();
        assert_eq!((connections, heads.len()), (2, 3));
    }
}
