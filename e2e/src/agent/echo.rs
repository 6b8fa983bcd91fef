//! The built-in echo image, run in-process by the simulated kubelet.
//!
//! * TCP, HTTP: every request is answered with an [`HttpEcho`] JSON document (HTTP/1.1 with
//!   keep-alive; h2c prior knowledge comes for free from hyper's auto builder).
//! * TCP, anything else: one [`RawEcho`] JSON line, then every byte is echoed back until EOF.
//! * UDP: every datagram is answered with a [`UdpEcho`] JSON document.
//!
//! A connection may start with a PROXY protocol v2 header; it is stripped and its addresses
//! are reported as `proxy`, next to (never instead of) the real peer in `client`.

use std::{
    collections::BTreeMap, convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use portico_local_cloud::prefixed::Prefixed;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

use super::{
    net,
    proxy_protocol::{self, Parsed, ProxyAddresses},
};

/// How long a silent new connection is given to show it speaks HTTP (or PROXY) before it is
/// treated as raw TCP and greeted. Clients of a raw echo that wait for the greeting pay this
/// once per connection.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a header that has started (a PROXY header, an HTTP method) may take to complete.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies are read (so keep-alive works) but not echoed; bigger ones end the connection.
const MAX_BODY: usize = 1 << 20;

/// Who answers: the pod the echo container belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoIdentity {
    pub pod: String,
    pub namespace: String,
    pub node: String,
}

/// The addresses of a PROXY v2 header, as `ip:port` strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub source: String,
    pub destination: String,
}

/// The answer to an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpEcho {
    pub pod: String,
    pub namespace: String,
    pub node: String,
    /// The TCP peer, `ip:port`.
    pub client: String,
    pub method: String,
    pub host: String,
    pub path: String,
    /// The raw query string without `?`; empty when there is none.
    pub query: String,
    /// Lower-case header names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyInfo>,
}

/// The line a raw TCP connection is greeted with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEcho {
    pub pod: String,
    pub namespace: String,
    pub node: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyInfo>,
}

/// The answer to a UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpEcho {
    pub pod: String,
    pub namespace: String,
    pub node: String,
    pub client: String,
    /// The datagram, as lossy UTF-8.
    pub payload: String,
}

fn proxy_info(addresses: Option<ProxyAddresses>) -> Option<ProxyInfo> {
    addresses.map(|a| ProxyInfo {
        source: a.source.to_string(),
        destination: a.destination.to_string(),
    })
}

pub(crate) fn http_echo<B>(
    id: &EchoIdentity,
    client: SocketAddr,
    proxy: Option<ProxyAddresses>,
    req: &Request<B>,
) -> HttpEcho {
    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    HttpEcho {
        pod: id.pod.clone(),
        namespace: id.namespace.clone(),
        node: id.node.clone(),
        client: client.to_string(),
        method: req.method().to_string(),
        host,
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or_default().to_owned(),
        headers,
        proxy: proxy_info(proxy),
    }
}

pub(crate) fn raw_echo(
    id: &EchoIdentity,
    client: SocketAddr,
    proxy: Option<ProxyAddresses>,
) -> RawEcho {
    RawEcho {
        pod: id.pod.clone(),
        namespace: id.namespace.clone(),
        node: id.node.clone(),
        client: client.to_string(),
        proxy: proxy_info(proxy),
    }
}

pub(crate) fn udp_echo(id: &EchoIdentity, client: SocketAddr, payload: &[u8]) -> UdpEcho {
    UdpEcho {
        pod: id.pod.clone(),
        namespace: id.namespace.clone(),
        node: id.node.clone(),
        client: client.to_string(),
        payload: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// What the first bytes of a connection (after any PROXY header) say it is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Http,
    Raw,
    NeedMore,
}

/// Request lines of HTTP/1.x methods, and the HTTP/2 connection preface (h2c prior knowledge).
const HTTP_STARTS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2.0",
];

pub(crate) fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    if HTTP_STARTS.iter().any(|m| buf.starts_with(m)) {
        Sniffed::Http
    } else if HTTP_STARTS.iter().any(|m| m.starts_with(buf)) {
        Sniffed::NeedMore
    } else {
        Sniffed::Raw
    }
}

/// A running echo listener; dropping it stops the listener and closes its connections, as a
/// stopped container would.
pub(crate) struct EchoListener {
    _stop: DropGuard,
}

/// Starts an echo TCP listener on `addr` (binding synchronously, so `AddrInUse` surfaces here).
pub(crate) fn start_tcp(addr: SocketAddr, id: Arc<EchoIdentity>) -> io::Result<EchoListener> {
    let listener = net::bind_tcp(addr)?;
    let stop = CancellationToken::new();
    tokio::spawn(accept_loop(listener, id, stop.clone()));
    Ok(EchoListener {
        _stop: stop.drop_guard(),
    })
}

/// Starts an echo UDP socket on `addr`.
pub(crate) fn start_udp(addr: SocketAddr, id: Arc<EchoIdentity>) -> io::Result<EchoListener> {
    let socket = net::bind_udp(addr)?;
    let stop = CancellationToken::new();
    tokio::spawn(udp_loop(socket, id, stop.clone()));
    Ok(EchoListener {
        _stop: stop.drop_guard(),
    })
}

async fn accept_loop(listener: TcpListener, id: Arc<EchoIdentity>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    debug!(%error, "echo accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let id = id.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                result = serve_connection(stream, peer, id) => {
                    if let Err(error) = result {
                        debug!(%peer, %error, "echo connection ended with an error");
                    }
                }
            }
        });
    }
}

enum ReadMore {
    Data,
    Eof,
    TimedOut,
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> io::Result<ReadMore> {
    match tokio::time::timeout(wait, stream.read_buf(buf)).await {
        Err(_) => Ok(ReadMore::TimedOut),
        Ok(Ok(0)) => Ok(ReadMore::Eof),
        Ok(Ok(_)) => Ok(ReadMore::Data),
        Ok(Err(e)) => Err(e),
    }
}

/// Serves one accepted TCP connection (public to the crate so the proxy tests can use it).
pub(crate) async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    id: Arc<EchoIdentity>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut proxy = None;
    loop {
        match proxy_protocol::parse_v2(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            Parsed::NotProxy => break,
            Parsed::Header { length, addresses } => {
                buf.drain(..length);
                proxy = addresses;
                break;
            }
            Parsed::Incomplete { .. } => {
                let wait = if buf.is_empty() {
                    SNIFF_TIMEOUT
                } else {
                    HEADER_TIMEOUT
                };
                match read_more(&mut stream, &mut buf, wait).await? {
                    ReadMore::Data => {}
                    ReadMore::Eof if buf.is_empty() => return Ok(()),
                    // A silent client, or bytes that merely look like a header's start.
                    ReadMore::Eof | ReadMore::TimedOut => break,
                }
            }
        }
    }
    loop {
        match sniff(&buf) {
            Sniffed::Http => return serve_http(Prefixed::new(buf, stream), peer, proxy, id).await,
            Sniffed::Raw => break,
            Sniffed::NeedMore => {
                let wait = if buf.is_empty() {
                    SNIFF_TIMEOUT
                } else {
                    HEADER_TIMEOUT
                };
                match read_more(&mut stream, &mut buf, wait).await? {
                    ReadMore::Data => {}
                    ReadMore::Eof | ReadMore::TimedOut => break,
                }
            }
        }
    }
    serve_raw(stream, buf, peer, proxy, &id).await
}

async fn serve_raw(
    mut stream: TcpStream,
    already_read: Vec<u8>,
    peer: SocketAddr,
    proxy: Option<ProxyAddresses>,
    id: &EchoIdentity,
) -> io::Result<()> {
    let mut greeting = serde_json::to_vec(&raw_echo(id, peer, proxy)).map_err(io::Error::other)?;
    greeting.push(b'\n');
    greeting.extend_from_slice(&already_read);
    stream.write_all(&greeting).await?;
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}

async fn serve_http(
    io: Prefixed<TcpStream>,
    peer: SocketAddr,
    proxy: Option<ProxyAddresses>,
    id: Arc<EchoIdentity>,
) -> io::Result<()> {
    let service = service_fn(move |req: Request<Incoming>| {
        let id = id.clone();
        async move {
            let echo = http_echo(&id, peer, proxy, &req);
            // Read the body so the connection can be kept alive; its content isn't echoed.
            let complete = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .is_ok();
            let body = serde_json::to_vec(&echo).expect("echo JSON");
            let mut response =
                Response::builder().header(http::header::CONTENT_TYPE, "application/json");
            if !complete {
                response = response.header(http::header::CONNECTION, "close");
            }
            Ok::<_, Infallible>(
                response
                    .body(Full::new(Bytes::from(body)))
                    .expect("response"),
            )
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).timer(TokioTimer::new());
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
        .map_err(io::Error::other)
}

async fn udp_loop(socket: UdpSocket, id: Arc<EchoIdentity>, stop: CancellationToken) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    // E.g. ECONNREFUSED from an earlier reply's ICMP error: keep serving.
                    debug!(%error, "echo recv failed");
                    continue;
                }
            },
        };
        let reply = serde_json::to_vec(&udp_echo(&id, peer, &buf[..n])).expect("echo JSON");
        if let Err(error) = socket.send_to(&reply, peer).await {
            debug!(%peer, %error, "echo reply failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    fn id() -> Arc<EchoIdentity> {
        Arc::new(EchoIdentity {
            pod: "web-1".into(),
            namespace: "shop".into(),
            node: "node-2".into(),
        })
    }

    fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[test]
    fn http_echo_reports_the_request_and_both_peers() {
        let req = Request::builder()
            .method("POST")
            .uri("/orders?id=7&x=1")
            .header("host", "shop.example")
            .header("x-trace", "a")
            .header("x-trace", "b")
            .body(())
            .unwrap();
        let proxy = ProxyAddresses {
            source: "198.51.100.4:5000".parse().unwrap(),
            destination: "127.22.1.1:80".parse().unwrap(),
        };
        let echo = http_echo(
            &id(),
            "127.20.1.1:40000".parse().unwrap(),
            Some(proxy),
            &req,
        );
        let json = serde_json::to_value(&echo).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pod": "web-1", "namespace": "shop", "node": "node-2",
                "client": "127.20.1.1:40000",
                "method": "POST", "host": "shop.example", "path": "/orders", "query": "id=7&x=1",
                "headers": {"host": "shop.example", "x-trace": "a, b"},
                "proxy": {"source": "198.51.100.4:5000", "destination": "127.22.1.1:80"},
            })
        );
    }

    #[test]
    fn without_a_proxy_header_there_is_no_proxy_field() {
        let req = Request::builder().uri("/").body(()).unwrap();
        let json =
            serde_json::to_value(http_echo(&id(), "127.0.0.1:1".parse().unwrap(), None, &req))
                .unwrap();
        assert!(json.get("proxy").is_none());
        assert_eq!(json["query"], "");
        let raw =
            serde_json::to_value(raw_echo(&id(), "127.0.0.1:1".parse().unwrap(), None)).unwrap();
        assert_eq!(
            raw,
            serde_json::json!({"pod": "web-1", "namespace": "shop", "node": "node-2", "client": "127.0.0.1:1"})
        );
    }

    #[test]
    fn udp_payloads_are_reported_as_lossy_utf8() {
        let echo = udp_echo(&id(), "127.0.0.1:9".parse().unwrap(), b"hi \xff");
        assert_eq!(echo.payload, "hi \u{fffd}");
    }

    #[test]
    fn sniffing_tells_http_from_raw_bytes() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"GE"), Sniffed::NeedMore);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"hello\n"), Sniffed::Raw);
        assert_eq!(sniff(b"GETX"), Sniffed::Raw);
    }

    #[tokio::test]
    async fn http_requests_are_answered_on_a_kept_alive_connection() {
        let addr = free_addr();
        let _listener = start_tcp(addr, id()).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        let mut reader = BufReader::new(&mut stream);
        for path in ["/a", "/b"] {
            let req = format!("GET {path}?q=1 HTTP/1.1\r\nHost: echo.test\r\n\r\n");
            reader.get_mut().write_all(req.as_bytes()).await.unwrap();
            let echo: HttpEcho = read_http_json(&mut reader).await;
            assert_eq!(echo.path, path);
            assert_eq!(echo.query, "q=1");
            assert_eq!(echo.host, "echo.test");
            assert_eq!(echo.client, local.to_string());
            assert_eq!(echo.pod, "web-1");
        }
    }

    #[tokio::test]
    async fn a_proxy_header_is_stripped_and_reported() {
        let addr = free_addr();
        let _listener = start_tcp(addr, id()).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let source: SocketAddr = "203.0.113.9:1234".parse().unwrap();
        let mut bytes = proxy_protocol::encode_v2(source, addr);
        bytes.extend_from_slice(b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(&bytes).await.unwrap();
        let echo: HttpEcho = read_http_json(&mut BufReader::new(&mut stream)).await;
        assert_eq!(echo.path, "/p");
        assert_eq!(echo.client, stream.local_addr().unwrap().to_string());
        assert_eq!(echo.proxy.unwrap().source, source.to_string());
    }

    #[tokio::test]
    async fn raw_connections_are_greeted_then_echoed_until_eof() {
        let addr = free_addr();
        let _listener = start_tcp(addr, id()).unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        let mut reader = BufReader::new(stream);
        // The client waits for the greeting before saying anything.
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let greeting: RawEcho = serde_json::from_str(&line).unwrap();
        assert_eq!(greeting.client, local.to_string());
        for round in 0..3 {
            let msg = format!("ping {round}\n");
            reader.get_mut().write_all(msg.as_bytes()).await.unwrap();
            let mut back = String::new();
            reader.read_line(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
        reader.get_mut().shutdown().await.unwrap();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn raw_bytes_sent_first_come_back_after_the_greeting() {
        let addr = free_addr();
        let _listener = start_tcp(addr, id()).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        let (greeting, rest) = all.split_once('\n').unwrap();
        assert!(serde_json::from_str::<RawEcho>(greeting).is_ok());
        assert_eq!(rest, "hello");
    }

    #[tokio::test]
    async fn udp_datagrams_are_answered_with_json() {
        let addr = free_addr();
        let _listener = start_udp(addr, id()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping", addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let echo: UdpEcho = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(echo.payload, "ping");
        assert_eq!(echo.client, client.local_addr().unwrap().to_string());
    }

    #[tokio::test]
    async fn dropping_the_listener_closes_the_port_and_its_connections() {
        let addr = free_addr();
        let listener = start_tcp(addr, id()).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut line = String::new();
        BufReader::new(&mut stream)
            .read_line(&mut line)
            .await
            .unwrap();
        drop(listener);
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "connection should be closed");
        // The port is free again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(net::bind_tcp(addr).is_ok());
    }

    /// Reads one HTTP/1.1 response with a Content-Length body and parses the body.
    async fn read_http_json<T: serde::de::DeserializeOwned, R: tokio::io::AsyncBufRead + Unpin>(
        reader: &mut R,
    ) -> T {
        let mut length = 0usize;
        let mut status = String::new();
        reader.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }
}
