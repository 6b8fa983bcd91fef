//! Client HTTP/1.1 connections, served without hyper for what nearly every request is: an
//! HTTP/1.1 request in origin form with no body and no upgrade. Its head is parsed in place,
//! routed, and rewritten straight into the target's request head (hop-by-hop headers out,
//! `X-Forwarded-*` in); the target's answer is written back as it arrives, its head filtered
//! the same way. No header maps, no request or response objects, one timer per connection.
//!
//! Anything else (a body, an upgrade, `Expect`, HTTP/1.0, HTTP/2's preface, a head httparse
//! rejects or one too large) hands the connection, with what was read of it, to hyper for the
//! rest of its life ([`Outcome::Handoff`]): the fast path never has to cover everything.

use std::cell::RefCell;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use portico_provider::routing::Decision;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::balance::cookie_value;
use super::config::{BackendPool, HttpTarget, Snapshot};
use super::direct::{self, Framing, Piece, ResponseHead};
use super::headers::{is_hop_by_hop_name, strip_port};
use super::proxy::ClientConn;
use super::server::Port;

/// A request head larger than this goes to hyper, which has its own limit.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// `Connection` may name this many other headers; more go to hyper.
const MAX_NAMED: usize = 8;
const READ_SIZE: usize = 8 * 1024;
/// Response bytes gathered before they are written; a larger body streams in pieces.
const WRITE_AT: usize = 64 * 1024;
/// A closing connection gets this long to flush its last bytes.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) enum Outcome {
    /// The connection is finished with: closed, timed out, or its port or load balancer gone.
    Done,
    /// hyper serves the rest; these bytes were read and not yet used.
    Handoff(BytesMut),
}

/// Serves requests on `io` until it closes or needs hyper.
pub(super) async fn serve<I>(port: &Port, conn: &ClientConn, io: &mut I) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // The connection keeps the idle timeout it started with, as on hyper's path.
    let idle = port
        .shared
        .config
        .load()
        .timeouts
        .idle
        .max(Duration::from_millis(1));
    let mut watchdog = Watchdog::new(Instant::now() + idle);
    let closing = port.shared.connections.cancelled();
    tokio::pin!(closing);
    let stop = port.stop.cancelled();
    tokio::pin!(stop);
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    // The target's request head, then the client's response: reused for every request.
    let mut up = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    loop {
        if !buf.is_empty() {
            // Read per request, so a configuration update applies to the next one.
            let snapshot = conn.shared.config.load_full();
            let close = match prepare(&buf, conn, &snapshot, &mut up, &mut out) {
                Prepared::Partial if buf.len() < MAX_HEAD => None,
                Prepared::Partial | Prepared::Unsupported => return Outcome::Handoff(buf),
                Prepared::Local { len, close } => {
                    buf.advance(len);
                    watchdog.set(Instant::now() + snapshot.timeouts.request);
                    if !write_answer(io, &out, &mut watchdog, &mut closing).await {
                        return Outcome::Done;
                    }
                    Some(close)
                }
                Prepared::Forward(forward) => {
                    buf.advance(forward.len);
                    watchdog.set(Instant::now() + snapshot.timeouts.request);
                    let mut written = false;
                    let mut answered = None;
                    let result = tokio::select! {
                        biased;
                        _ = &mut closing => return Outcome::Done,
                        r = exchange(io, &snapshot, &forward, &up, &mut out, &mut answered, &mut written) => r,
                        _ = watchdog.expired() => Err(Failure::Timeout),
                    };
                    // Counted as the client saw it: the target's status once any of its
                    // answer went out, else the proxy's own.
                    let counters = &forward.backend.state.requests;
                    if let Some(status) = answered.filter(|_| written) {
                        counters.count(status);
                    }
                    match result {
                        Ok(close) => Some(close),
                        // Nothing reached the client yet: it gets an answer of ours.
                        Err(failure) if !written => {
                            let (status, text) = failure.answer();
                            tracing::debug!(lb = %conn.shared.lb, target = %forward.target.addr, error = %failure, "upstream failed");
                            counters.count(status);
                            local(&mut out, status, text, &[], forward.close);
                            // A fresh deadline: the old one may be what just expired.
                            watchdog.set(Instant::now() + snapshot.timeouts.request);
                            if !write_answer(io, &out, &mut watchdog, &mut closing).await {
                                return Outcome::Done;
                            }
                            Some(forward.close)
                        }
                        Err(failure) => {
                            tracing::debug!(lb = %conn.shared.lb, target = %forward.target.addr, error = %failure, "response cut short");
                            return Outcome::Done;
                        }
                    }
                }
            };
            if let Some(close) = close {
                if close || port.stop.is_cancelled() {
                    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, io.shutdown()).await;
                    return Outcome::Done;
                }
                // The idle timeout runs from the end of one exchange to the next head.
                watchdog.set(Instant::now() + idle);
                continue;
            }
        }
        buf.reserve(READ_SIZE);
        tokio::select! {
            biased;
            _ = &mut closing => return Outcome::Done,
            _ = &mut stop => return Outcome::Done,
            r = io.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return Outcome::Done,
                Ok(_) => {}
            },
            _ = watchdog.expired() => return Outcome::Done,
        }
    }
}

/// Writes one of the proxy's own answers by the watchdog's deadline, so a client that stops
/// reading cannot hold the connection once the socket buffers are full. False when the
/// connection must end (write failed, deadline passed, load balancer gone).
async fn write_answer<I, C>(
    io: &mut I,
    bytes: &[u8],
    watchdog: &mut Watchdog,
    closing: &mut C,
) -> bool
where
    I: AsyncWrite + Unpin,
    C: Future<Output = ()> + Unpin,
{
    tokio::select! {
        biased;
        _ = closing => false,
        r = write(io, bytes) => r.is_ok(),
        _ = watchdog.expired() => false,
    }
}

async fn write<I: AsyncWrite + Unpin>(io: &mut I, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    // A no-op on TCP; TLS may hold records back until flushed.
    io.flush().await
}

/// What one complete request head asks for.
enum Prepared<'s> {
    /// The head is not complete yet.
    Partial,
    /// Not for the fast path: hyper takes the connection.
    Unsupported,
    /// Answered by the proxy itself: `out` holds the whole response.
    Local { len: usize, close: bool },
    /// To `target`; `up` holds the request head to send it.
    Forward(Forward<'s>),
}

struct Forward<'s> {
    /// The request head's length in the client's buffer.
    len: usize,
    method: Method,
    backend: &'s BackendPool,
    target: &'s HttpTarget,
    set_cookie: bool,
    /// The client asked to close the connection after this exchange.
    close: bool,
}

/// How a request header is handled on its way to the target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    ContentLength,
    Connection,
    Upgrade,
    Cookie,
    XForwardedFor,
    /// Set by the proxy: what the client sent is dropped.
    XForwarded,
    /// Only for the hop from the client; not forwarded.
    HopByHop,
    /// A body or an interim answer: hyper's path.
    Unsupported,
    Other,
}

fn kind(name: &str) -> Kind {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        4 if is("host") => Kind::Host,
        6 if is("cookie") => Kind::Cookie,
        6 if is("expect") => Kind::Unsupported,
        7 if is("upgrade") => Kind::Upgrade,
        10 if is("connection") => Kind::Connection,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        16 if is("x-forwarded-host") => Kind::XForwarded,
        17 if is("x-forwarded-proto") => Kind::XForwarded,
        17 if is("transfer-encoding") => Kind::Unsupported,
        _ if is_hop_by_hop_name(name.as_bytes()) => Kind::HopByHop,
        _ => Kind::Other,
    }
}

/// Parses the request head at the front of `buf` and decides its fate, writing either the
/// target's request head into `up` or the whole local answer into `out`.
fn prepare<'s>(
    buf: &[u8],
    conn: &ClientConn,
    snapshot: &'s Snapshot,
    up: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Prepared<'s> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Prepared::Partial,
        Err(_) => return Prepared::Unsupported,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Prepared::Unsupported;
    };
    // Origin form only, and nothing http::Uri would read differently.
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Prepared::Unsupported;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Prepared::Unsupported;
    };
    let headers: &[httparse::Header<'_>] = request.headers;

    let mut host: Option<&[u8]> = None;
    let mut close = false;
    let mut upgrade = (false, false);
    let mut named: [&[u8]; MAX_NAMED] = [&[]; MAX_NAMED];
    let mut named_count = 0;
    // Each header's kind, found once for the passes below.
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, slot) in headers.iter().zip(kinds.iter_mut()) {
        *slot = kind(h.name);
        match *slot {
            Kind::Host if host.is_some() => return Prepared::Unsupported,
            Kind::Host => host = Some(h.value),
            Kind::ContentLength if h.value.trim_ascii() != b"0" => return Prepared::Unsupported,
            Kind::Unsupported => return Prepared::Unsupported,
            Kind::Upgrade => upgrade.0 = true,
            Kind::Connection => {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        upgrade.1 = true;
                    } else if token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive") {
                    } else if named_count < MAX_NAMED {
                        named[named_count] = token;
                        named_count += 1;
                    } else {
                        return Prepared::Unsupported;
                    }
                }
            }
            _ => {}
        }
    }
    if upgrade == (true, true) {
        return Prepared::Unsupported;
    }
    let named = &named[..named_count];
    let classified = || headers.iter().zip(kinds.iter().copied());
    // As `HeaderValue::to_str` reads it on hyper's path.
    let host_str = host
        .filter(|h| h.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or("");
    let path = target.split_once('?').map_or(target, |(path, _)| path);

    if !conn.tls
        && let Some(https_port) = snapshot.redirect_to
    {
        let status = redirect(out, host_str, https_port, target, close);
        conn.shared.unrouted.count(status);
        return Prepared::Local { len, close };
    }
    let backend = match snapshot.routes.resolve(host_str, path) {
        Decision::Backend(name) => snapshot.backends.get(name),
        Decision::NotFound => None,
    };
    let Some(backend) = backend else {
        conn.shared.unrouted.count(StatusCode::NOT_FOUND);
        let text = "no route for this host and path\n";
        local(out, StatusCode::NOT_FOUND, text, &[], close);
        return Prepared::Local { len, close };
    };
    let cookies = || {
        classified()
            .filter(|(_, kind)| *kind == Kind::Cookie)
            .map(|(h, _)| h.value)
    };
    let Some(pick) = backend.pick_with(|name| cookie_value(cookies(), name), conn.client_ip) else {
        backend
            .state
            .requests
            .count(StatusCode::SERVICE_UNAVAILABLE);
        let text = "no healthy target\n";
        local(out, StatusCode::SERVICE_UNAVAILABLE, text, &[], close);
        return Prepared::Local { len, close };
    };

    up.clear();
    for part in [method.as_str(), " ", target, " HTTP/1.1\r\n"] {
        up.extend_from_slice(part.as_bytes());
    }
    for (h, kind) in classified() {
        if !matches!(
            kind,
            Kind::Other | Kind::Host | Kind::ContentLength | Kind::Cookie
        ) {
            continue;
        }
        if named
            .iter()
            .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        header(up, h.name.as_bytes(), h.value);
    }
    // What earlier proxies recorded, then this client.
    up.extend_from_slice(b"x-forwarded-for: ");
    for (h, _) in classified().filter(|(_, kind)| *kind == Kind::XForwardedFor) {
        up.extend_from_slice(h.value);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(conn.client_ip_header.as_bytes());
    up.extend_from_slice(b"\r\n");
    let proto: &[u8] = if conn.tls { b"https" } else { b"http" };
    header(up, b"x-forwarded-proto", proto);
    if let Some(host) = host {
        header(up, b"x-forwarded-host", host);
    }
    up.extend_from_slice(b"\r\n");
    Prepared::Forward(Forward {
        len,
        method,
        backend,
        target: &backend.targets[pick.index],
        set_cookie: pick.set_cookie,
        close,
    })
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Upstream(direct::SendError),
    #[error("the target did not answer within the request timeout")]
    Timeout,
    #[error("reading the target's body failed: {0}")]
    Body(io::Error),
    #[error("writing to the client failed: {0}")]
    Client(io::Error),
}

impl Failure {
    /// What the client is told when nothing of the answer reached it yet.
    fn answer(&self) -> (StatusCode, &'static str) {
        match self {
            Failure::Upstream(direct::SendError::Connect(_)) => {
                (StatusCode::BAD_GATEWAY, "cannot reach the target\n")
            }
            Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "the target timed out\n"),
            _ => (StatusCode::BAD_GATEWAY, "the target failed\n"),
        }
    }
}

/// Sends `up` to the forward's target and relays the answer; `Ok(true)` when the client
/// connection must close after it. `answered` gets the target's status once its head
/// arrived; `written` says whether any of the answer reached the client.
async fn exchange<I>(
    io: &mut I,
    snapshot: &Snapshot,
    forward: &Forward<'_>,
    up: &[u8],
    out: &mut Vec<u8>,
    answered: &mut Option<StatusCode>,
    written: &mut bool,
) -> Result<bool, Failure>
where
    I: AsyncWrite + Unpin,
{
    let set_cookie = forward
        .set_cookie
        .then_some(forward.target.set_cookie.as_ref())
        .flatten();
    let mut close = forward.close;
    out.clear();
    let (status, answer) = direct::send_head(
        forward.target.addr,
        snapshot.timeouts.connect,
        up,
        &forward.method,
        |head| {
            close |= response_head(out, head, set_cookie, forward.close);
            Ok(head.status)
        },
    )
    .await
    .map_err(Failure::Upstream)?;
    *answered = Some(status);
    let mut body = answer.into_body();
    let chunked = matches!(body.framing(), Framing::Chunked(_));
    loop {
        match body.next_piece().map_err(Failure::Body)? {
            Piece::Data(n) => {
                if chunked {
                    let _ = write!(out, "{n:x}\r\n");
                }
                out.extend_from_slice(&body.buffered()[..n]);
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                body.consume(n);
                if out.len() >= WRITE_AT {
                    flush(io, out, written).await?;
                }
            }
            Piece::End => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                flush(io, out, written).await?;
                return Ok(close);
            }
            Piece::More => {
                // What arrived goes out now: a streamed answer is not held back.
                if !out.is_empty() {
                    flush(io, out, written).await?;
                }
                body.fill().await.map_err(Failure::Body)?;
            }
        }
    }
}

async fn flush<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    written: &mut bool,
) -> Result<(), Failure> {
    *written = true;
    write(io, out).await.map_err(Failure::Client)?;
    out.clear();
    Ok(())
}

/// Writes the client's response head from the target's; `true` when the client connection
/// must close after the body (it runs to the target's close).
fn response_head(
    out: &mut Vec<u8>,
    head: &ResponseHead<'_>,
    set_cookie: Option<&HeaderValue>,
    client_close: bool,
) -> bool {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.reason);
    out.extend_from_slice(b"\r\n");
    let chunked = matches!(head.framing, Framing::Chunked(_));
    let mut dated = false;
    for h in head.headers {
        if head.is_hop_by_hop(h.name)
            // Content-Length means nothing beside chunked framing (RFC 9112 6.3).
            || (chunked && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        dated |= h.name.eq_ignore_ascii_case("date");
        header(out, h.name.as_bytes(), h.value);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if let Some(cookie) = set_cookie {
        header(out, b"set-cookie", cookie.as_bytes());
    }
    if !dated {
        date(out);
    }
    let until_close = head.framing == Framing::Close;
    if until_close || client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    until_close
}

/// A whole response of the proxy's own into `out`.
fn local(out: &mut Vec<u8>, status: StatusCode, text: &str, extra: &[(&[u8], &[u8])], close: bool) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    if !text.is_empty() {
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
    }
    for (name, value) in extra {
        header(out, name, value);
    }
    header(out, b"content-length", text.len().to_string().as_bytes());
    date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
}

/// `308` to the same host and target over HTTPS (`308` keeps the method and body).
fn redirect(
    out: &mut Vec<u8>,
    host: &str,
    https_port: u16,
    target: &str,
    close: bool,
) -> StatusCode {
    let host = strip_port(host);
    if host.is_empty() {
        local(
            out,
            StatusCode::BAD_REQUEST,
            "the request names no host\n",
            &[],
            close,
        );
        return StatusCode::BAD_REQUEST;
    }
    let location = if https_port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{https_port}{target}")
    };
    let status = StatusCode::PERMANENT_REDIRECT;
    local(
        out,
        status,
        "",
        &[(b"location", location.as_bytes())],
        close,
    );
    status
}

thread_local! {
    /// The `Date` header's value, rendered once per second.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// A `date` header for a response that has none (RFC 9110 6.6.1).
fn date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            *date = (second, httpdate::fmt_http_date(now));
        }
        header(out, b"date", date.1.as_bytes());
    });
}

/// One timer per connection for both of its deadlines (idle, request): moving the deadline
/// later only records it, and the timer is re-armed when it fires early, so a request costs
/// no timer registration.
struct Watchdog {
    sleep: Pin<Box<Sleep>>,
    deadline: Instant,
}

impl Watchdog {
    fn new(deadline: Instant) -> Self {
        Watchdog {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
        }
    }

    fn set(&mut self, deadline: Instant) {
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
        }
        self.deadline = deadline;
    }

    /// Completes once the current deadline has passed.
    async fn expired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.deadline {
                return;
            }
            self.sleep.as_mut().reset(self.deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(raw: &str, set_cookie: Option<&str>, client_close: bool) -> (String, bool) {
        let cookie = set_cookie.map(HeaderValue::from_str).map(Result::unwrap);
        let mut out = Vec::new();
        let close = direct::with_response_head(raw.as_bytes(), |head| {
            response_head(&mut out, head, cookie.as_ref(), client_close)
        });
        (String::from_utf8(out).unwrap(), close)
    }

    #[test]
    fn the_targets_head_reaches_the_client_without_its_hop_by_hop_headers() {
        let (head, close) = rewritten(
            "HTTP/1.1 200 Fine\r\nConnection: X-Hop\r\nx-hop: 1\r\nKeep-Alive: 5\r\nX-Kept: 2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\n\r\n",
            None,
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 Fine\r\nX-Kept: 2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\n\r\n"
        );
        assert!(!close);
    }

    #[test]
    fn framing_and_affinity_are_the_proxys_to_say() {
        let (head, close) = rewritten(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            Some("route=abc; Path=/"),
            false,
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nset-cookie: route=abc; Path=/\r\ndate: "), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        assert!(!close);

        let (head, close) = rewritten("HTTP/1.0 200 OK\r\n\r\n", None, false);
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert!(
            close,
            "a body that runs to the target's close ends the client's connection"
        );

        let (head, close) = rewritten("HTTP/1.1 204 No Content\r\n\r\n", None, true);
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert!(!close, "the caller closes for the client's own reasons");
    }

    #[test]
    fn local_answers_are_complete_responses() {
        let mut out = Vec::new();
        local(&mut out, StatusCode::NOT_FOUND, "no route\n", &[], false);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 9\r\ndate: "), "{text}");
        assert!(text.ends_with("GMT\r\n\r\nno route\n"), "{text}");

        let status = redirect(&mut out, "app.example:80", 8443, "/a?b", true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
        assert!(
            text.contains("\r\nlocation: https://app.example:8443/a?b\r\ncontent-length: 0\r\n"),
            "{text}"
        );
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
    }

    #[tokio::test]
    async fn the_watchdog_fires_at_the_latest_deadline_set_and_not_before() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut watchdog = Watchdog::new(start + ms(50));
        // Later: only recorded; the armed timer fires early and is re-armed.
        watchdog.set(start + ms(200));
        watchdog.expired().await;
        assert!(Instant::now() >= start + ms(200));
        // Earlier than the armed timer: re-armed at once.
        let now = Instant::now();
        watchdog.set(now + ms(60_000));
        watchdog.set(now + ms(100));
        tokio::time::timeout(ms(30_000), watchdog.expired())
            .await
            .expect("the earlier deadline applies");
        assert!(Instant::now() >= now + ms(100));
    }
}
