//! Connections to targets: a pooled HTTP/1.1 client for ordinary requests (keep-alive
//! connections reused across requests and clients), and fresh connections for upgrades,
//! which end up owned by a tunnel and must never return to a pool.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// Idle pooled connections to targets are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A client that connects within `connect` and keeps connections for reuse.
pub fn client(connect: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // The client's own Host header is forwarded untouched; it is set for HTTP/2 clients.
        .set_host(false)
        .build(connector)
}

/// A fresh HTTP/1.1 connection to `target` able to switch protocols; its driver runs on its
/// own task and ends with the connection (or the tunnel taking it over).
pub async fn dial_for_upgrade(
    target: SocketAddr,
    connect: Duration,
) -> io::Result<http1::SendRequest<Incoming>> {
    let stream = tokio::time::timeout(connect, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(%target, error = %e, "upgrade connection to target failed");
        }
    });
    Ok(sender)
}

/// Sends `request` on a connection from [`dial_for_upgrade`].
pub async fn send_upgrade(
    mut sender: http1::SendRequest<Incoming>,
    request: Request<Incoming>,
) -> hyper::Result<http::Response<Incoming>> {
    sender.send_request(request).await
}
