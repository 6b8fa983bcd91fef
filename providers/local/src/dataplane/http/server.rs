//! HTTP(S) listeners: accept, admit by source range, terminate TLS, and serve each
//! connection: HTTP/1.1 on the fast path ([`h1`]) until a request needs hyper, then (and for
//! HTTP/2) hyper with [`proxy::handle`] per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::h1::{self, Outcome};
use super::proxy::{self, ClientConn, Shared};
use crate::dataplane::workers::{self, Placed};
use crate::dataplane::{ActiveGuard, Stats};
use crate::prefixed::Prefixed;

/// A client gets this long to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one listener's accept loop works with.
pub(super) struct Port {
    pub shared: Arc<Shared>,
    pub local: SocketAddr,
    /// Present on the HTTPS port.
    pub tls: Option<TlsAcceptor>,
    pub stats: Arc<Stats>,
    /// Stop accepting (the port was removed); open connections finish their requests.
    pub stop: CancellationToken,
}

/// One worker's accept loop; each connection is served by the least loaded worker.
pub(super) async fn serve(listener: TcpListener, port: Arc<Port>) {
    let workers = workers::get();
    let stopped = port.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(lb = %port.shared.lb, local = %port.local, error = %e, "accept failed");
                    // Out of descriptors accept fails at once every time; don't spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if !port.shared.config.load().source_ranges.allows(peer.ip()) {
            Stats::add(&port.stats.rejected_source, 1);
            tracing::debug!(lb = %port.shared.lb, client = %peer, "client outside the source ranges");
            let _ = stream.set_zero_linger();
            continue;
        }
        Stats::add(&port.stats.accepted, 1);
        let placed = workers.place();
        if Some(placed.worker()) == workers::current() {
            tokio::spawn(connection(port.clone(), stream, peer, placed));
            continue;
        }
        // Moved to its worker's poller: deregistered here, registered there.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(lb = %port.shared.lb, client = %peer, error = %e, "cannot hand the connection over");
                continue;
            }
        };
        let port = port.clone();
        workers.spawn_on(placed.worker(), async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => connection(port, stream, peer, placed).await,
                Err(e) => {
                    tracing::debug!(lb = %port.shared.lb, client = %peer, error = %e, "cannot take the connection over");
                }
            }
        });
    }
}

async fn connection(port: Arc<Port>, stream: TcpStream, peer: SocketAddr, _placed: Placed) {
    let _active = ActiveGuard::new(&port.stats);
    crate::dataplane::tcp::set_nodelay_unless_inherited(&stream);
    let client_ip = peer.ip().to_canonical();
    let conn = Arc::new(ClientConn {
        shared: port.shared.clone(),
        client_ip,
        client_ip_header: HeaderValue::try_from(client_ip.to_string())
            .expect("an IP address is a valid header value"),
        tls: port.tls.is_some(),
    });
    match &port.tls {
        None => serve_http1(&port, conn, stream).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                biased;
                _ = port.shared.connections.cancelled() => return,
                r = handshake => match r {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(lb = %port.shared.lb, client = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
            };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_http(&port, conn, stream).await;
            } else {
                serve_http1(&port, conn, stream).await;
            }
        }
    }
}

/// HTTP/1.1 on the fast path ([`h1`]) until a request needs hyper, then hyper.
async fn serve_http1<I>(port: &Port, conn: Arc<ClientConn>, mut io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match h1::serve(port, &conn, &mut io).await {
        Outcome::Done => {}
        Outcome::Handoff(read) => serve_http(port, conn, Prefixed::new(read.freeze(), io)).await,
    }
}

async fn serve_http<I>(port: &Port, conn: Arc<ClientConn>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The connection keeps the protocol settings (idle timeout) it started with.
    let snapshot = port.shared.config.load_full();
    let service = service_fn(move |req| proxy::handle(conn.clone(), req));
    let connection = snapshot
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let closing = port.shared.connections.cancelled();
    tokio::pin!(closing);
    tokio::select! {
        biased;
        // The load balancer is gone: drop the connection and whatever it carries.
        _ = &mut closing => return,
        _ = connection.as_mut() => return,
        // The port is gone: finish in-flight requests, then close (HTTP/2 sends GOAWAY).
        _ = port.stop.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        biased;
        _ = &mut closing => {}
        _ = connection.as_mut() => {}
    }
}
