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
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    /// Reused for each request head written on this connection.
    head: Vec<u8>,
    /// Reused for each response read; its memory is reclaimed once the previous response's
    /// pieces are gone.
    read: BytesMut,
}

thread_local! {
    static IDLE: RefCell<IdlePool<Conn>> = RefCell::new(IdlePool::default());
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
/// `target` and reads the response head. A reused connection that fails before the first
/// byte of an answer (the target closed it meanwhile) is retried once on a new connection
/// when the method is idempotent.
pub async fn send(
    target: SocketAddr,
    connect: Duration,
    parts: &Parts,
) -> Result<Response<Body>, SendError> {
    if let Some(conn) = pool::with(&IDLE, |idle| idle.take(target)).flatten() {
        match exchange(conn, parts).await {
            Ok(response) => return Ok(response),
            Err(Failure { error, answered }) => {
                if answered || !parts.method.is_idempotent() {
                    return Err(SendError::Failed(error));
                }
            }
        }
    }
    let conn = dial(target, connect).await.map_err(SendError::Connect)?;
    exchange(conn, parts)
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
        head: Vec::with_capacity(512),
        read: BytesMut::new(),
    })
}

struct Failure {
    error: io::Error,
    /// Some of an answer arrived: the target saw the request.
    answered: bool,
}

async fn exchange(mut conn: Conn, parts: &Parts) -> Result<Response<Body>, Failure> {
    let unanswered = |error| Failure {
        error,
        answered: false,
    };
    conn.head.clear();
    encode_head(&mut conn.head, parts);
    conn.stream
        .write_all(&conn.head)
        .await
        .map_err(unanswered)?;
    let mut buf = std::mem::take(&mut conn.read);
    // Once any of an answer has arrived, the target has seen the request.
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            match parse_head(&mut buf, &parts.method) {
                Ok(Some(Parsed::Final(response, framing, keep_alive))) => {
                    let body = Body {
                        conn: Some(conn),
                        buf,
                        framing,
                        keep_alive,
                    };
                    let (head, ()) = response.into_parts();
                    return Ok(Response::from_parts(head, body));
                }
                // An interim answer (103 Early Hints…): the final one follows.
                Ok(Some(Parsed::Interim)) => continue,
                Ok(None) if buf.len() < MAX_HEAD => {}
                Ok(None) => {
                    return Err(Failure {
                        error: invalid("the response head is too large"),
                        answered: true,
                    });
                }
                Err(error) => {
                    return Err(Failure {
                        error,
                        answered: true,
                    });
                }
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

enum Parsed {
    /// The response head, how its body is framed, and whether the connection may carry
    /// another exchange after it.
    Final(Response<()>, Framing, bool),
    Interim,
}

/// How a response body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes remain.
    Length(u64),
    Chunked(Chunked),
    /// Until the target closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
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

/// Parses a complete response head off the front of `buf`, leaving the body's first bytes.
/// `Ok(None)`: the head is not complete yet.
fn parse_head(buf: &mut BytesMut, method: &Method) -> io::Result<Option<Parsed>> {
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
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    // Names and values point into the head's bytes: no copy per value, and no allocation
    // for the list of where they are.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (name, name + h.name.len(), value, value + h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[name_start..name_end])
            .map_err(|_| invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| invalid("invalid header value"))?;
        headers.append(name, value);
    }

    let mut keep_alive = !http10;
    for value in headers.get_all(http::header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if http10 && token.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if headers.contains_key(TRANSFER_ENCODING) {
        // Chunked only when it is the final coding; otherwise the body runs to the close.
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        if last.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            // Content-Length means nothing beside Transfer-Encoding (RFC 9112 6.3).
            headers.remove(CONTENT_LENGTH);
            Framing::Chunked(Chunked::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if headers.contains_key(CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        keep_alive = false;
        Framing::Close
    };

    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    Ok(Some(Parsed::Final(response, framing, keep_alive)))
}

/// One length, however often repeated; differing lengths are an error (RFC 9112 6.3).
fn content_length(headers: &HeaderMap) -> io::Result<u64> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.to_str().unwrap_or("").split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid("invalid Content-Length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| invalid("invalid Content-Length"))?;
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

impl Body {
    fn ended(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunked::Done)
        )
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

    /// Reads more into `buf`; `Ok(0)` is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut self.buf)
    }

    /// The next piece of body data, or `None` at its end.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match self.framing {
                Framing::Length(0) | Framing::Chunked(Chunked::Done) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (self.buf.len() as u64).min(left) as usize;
                        self.framing = Framing::Length(left - n as u64);
                        let data = self.buf.split_to(n).freeze();
                        if self.ended() {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(cut_short())));
                    }
                }
                Framing::Close => {
                    if !self.buf.is_empty() {
                        return Poll::Ready(Some(Ok(self.buf.split().freeze())));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                }
                Framing::Chunked(state) => match chunk_step(&mut self.buf, state)? {
                    Step::Data(data, next) => {
                        self.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Step::Next(next) => self.framing = Framing::Chunked(next),
                    Step::More => {
                        if ready!(self.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(cut_short())));
                        }
                    }
                },
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
    Data(Bytes, Chunked),
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
            let Some(line) = take_line(buf)? else {
                return Ok(Step::More);
            };
            let digits = line.split(|b| *b == b';').next().unwrap_or_default();
            let digits = digits.trim_ascii();
            if digits.is_empty() || digits.len() > 16 {
                return Err(invalid("invalid chunk size"));
            }
            let size = std::str::from_utf8(digits)
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| invalid("invalid chunk size"))?;
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
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            let next = match left - n as u64 {
                0 => Chunked::DataEnd,
                rest => Chunked::Data(rest),
            };
            Ok(Step::Data(data, next))
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
        Chunked::Trailers => match take_line(buf)? {
            None => Ok(Step::More),
            Some(line) if line.is_empty() => Ok(Step::Next(Chunked::Done)),
            Some(_) => Ok(Step::Next(Chunked::Trailers)),
        },
        Chunked::Done => Ok(Step::Next(Chunked::Done)),
    }
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = buf.split_to(at).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
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

    fn parse(raw: &str, method: &Method) -> (Response<()>, Framing, bool, BytesMut) {
        let mut buf = BytesMut::from(raw.as_bytes());
        match parse_head(&mut buf, method).unwrap() {
            Some(Parsed::Final(r, f, k)) => (r, f, k, buf),
            _ => panic!("no final head in {raw:?}"),
        }
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
        let (r, f, keep, rest) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nok\n",
            &Method::GET,
        );
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-a"], "b");
        assert_eq!(
            (f, keep, &rest[..]),
            (Framing::Length(3), true, &b"ok\n"[..])
        );

        let (_, f, _, _) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(f, Framing::Length(0), "HEAD answers carry no body");
        let (_, f, _, _) = parse("HTTP/1.1 304 Not Modified\r\n\r\n", &Method::GET);
        assert_eq!(f, Framing::Length(0));

        let (r, f, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((f, keep), (Framing::Chunked(Chunked::Size), true));
        assert!(!r.headers().contains_key(CONTENT_LENGTH));

        let (_, f, keep, _) = parse("HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert_eq!((f, keep), (Framing::Close, false), "no length: until close");
        let (_, f, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((f, keep), (Framing::Close, false));

        let (_, _, keep, _) = parse(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(!keep);
        let (_, _, keep, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &Method::GET);
        assert!(!keep, "HTTP/1.0 closes unless it says keep-alive");
        let (_, _, keep, _) = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        );
        assert!(keep);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_heads_wait() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw.as_bytes());
            assert!(parse_head(&mut buf, &Method::GET).is_err(), "{raw:?}");
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(matches!(parse_head(&mut buf, &Method::GET), Ok(None)));
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1"[..]);
        assert!(matches!(
            parse_head(&mut buf, &Method::GET),
            Ok(Some(Parsed::Interim))
        ));
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 1..wire.len() {
            let mut buf = BytesMut::new();
            let mut state = Chunked::Size;
            let mut out = Vec::new();
            let mut fed = 0;
            while state != Chunked::Done {
                match chunk_step(&mut buf, state).unwrap() {
                    Step::Data(d, next) => {
                        out.extend_from_slice(&d);
                        state = next;
                    }
                    Step::Next(next) => state = next,
                    Step::More => {
                        let end = (fed + split).min(wire.len());
                        assert!(fed < end, "ran out of input at split {split}");
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
            }
            assert_eq!(out, b"Wikipedia", "split {split}");
            assert!(buf.is_empty());
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
