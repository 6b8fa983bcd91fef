//! One request that hyper serves (HTTP/2, HTTP/1.0, a request with a body or an upgrade, or
//! anything after one on the same connection; the rest takes [`super::h1`]'s fast path):
//! redirect or route, pick a target, rewrite headers, send it upstream on a pooled connection
//! (or a fresh one to switch protocols), and stream the answer back within the request
//! timeout.
//!
//! A target that cannot be connected to answers 502 at once; the request is not retried on
//! another target (its body may already be partly consumed, and keeping a copy of every
//! request for the rare retry would cost each request an allocation). Health checks take the
//! target out of rotation within their interval.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HOST, LOCATION, SET_COOKIE, UPGRADE};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use portico_provider::HttpTimeouts;
use portico_provider::routing::Decision;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::body::ProxyBody;
use super::config::{HttpTarget, Snapshot};
use super::headers::{add_forwarded, connection_has, remove_hop_by_hop, strip_port};
use super::stats::RequestCounters;
use super::upstream::{self, Pooled};
use super::{direct, pool};

/// What every connection of one L7 load balancer shares.
pub(super) struct Shared {
    pub lb: Arc<str>,
    pub config: ArcSwap<Snapshot>,
    /// Requests answered without a backend (404, redirects, bad requests).
    pub unrouted: RequestCounters,
    /// Cancelled when the load balancer goes away: ends connections and upgraded tunnels.
    pub connections: CancellationToken,
}

/// One client connection, shared by its requests.
pub(super) struct ClientConn {
    pub shared: Arc<Shared>,
    pub client_ip: IpAddr,
    /// `client_ip` rendered once for `X-Forwarded-For`.
    pub client_ip_header: HeaderValue,
    pub tls: bool,
}

/// A target's answer: from hyper's client (with its pooled connection, none for upgrades), or
/// read directly off a pooled connection.
enum Answer {
    Hyper(Response<Incoming>, Option<Pooled>),
    Direct(Response<direct::Body>),
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect to the target: {0}")]
    Connect(String),
    #[error("the target did not answer within the request timeout")]
    Timeout,
    #[error("the exchange with the target failed: {0}")]
    Failed(String),
}

impl<E: std::fmt::Display> From<pool::SendError<E>> for UpstreamError {
    fn from(e: pool::SendError<E>) -> Self {
        match e {
            pool::SendError::Connect(e) => UpstreamError::Connect(e.to_string()),
            pool::SendError::Failed(e) => UpstreamError::Failed(e.to_string()),
        }
    }
}

impl UpstreamError {
    fn response(&self) -> Response<ProxyBody> {
        match self {
            UpstreamError::Connect(_) => {
                local(StatusCode::BAD_GATEWAY, "cannot reach the target\n")
            }
            UpstreamError::Failed(_) => local(StatusCode::BAD_GATEWAY, "the target failed\n"),
            UpstreamError::Timeout => local(StatusCode::GATEWAY_TIMEOUT, "the target timed out\n"),
        }
    }
}

pub(super) async fn handle(
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // One atomic increment: the snapshot stays alive for this request even if an update
    // replaces it meanwhile.
    let snapshot = conn.shared.config.load_full();
    Ok(proxy(&conn, &snapshot, req).await)
}

async fn proxy(
    conn: &ClientConn,
    snapshot: &Snapshot,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let host = request_host(&req);
    let host_str = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");

    if !conn.tls
        && let Some(https_port) = snapshot.redirect_to
    {
        let response = redirect(host_str, https_port, req.uri());
        conn.shared.unrouted.count(response.status());
        return response;
    }
    let backend = match snapshot.routes.resolve(host_str, req.uri().path()) {
        Decision::Backend(name) => snapshot.backends.get(name),
        Decision::NotFound => None,
    };
    let Some(backend) = backend else {
        conn.shared.unrouted.count(StatusCode::NOT_FOUND);
        return local(StatusCode::NOT_FOUND, "no route for this host and path\n");
    };
    let counters = &backend.state.requests;
    let Some(pick) = backend.pick(req.headers(), conn.client_ip) else {
        counters.count(StatusCode::SERVICE_UNAVAILABLE);
        return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy target\n");
    };
    let target = &backend.targets[pick.index];

    let upgrading = req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_has(req.headers(), "upgrade");
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    remove_hop_by_hop(&mut parts.headers, upgrading);
    if parts.version == Version::HTTP_2
        && let Some(host) = &host
    {
        // HTTP/2 carries the host as :authority; targets speak HTTP/1.1 and want Host.
        parts.headers.insert(HOST, host.clone());
    }
    let proto = if conn.tls { "https" } else { "http" };
    add_forwarded(&mut parts.headers, &conn.client_ip_header, proto, host);
    parts.version = Version::HTTP_11;

    // One timer for the whole exchange: waiting for the head here, then the body's stream.
    let mut deadline = Box::pin(tokio::time::sleep(snapshot.timeouts.request));
    parts.uri = Uri::from(origin_form(&parts.uri));
    let result = match client_upgrade {
        // Most requests: no body to stream, so the task itself writes and reads the target.
        None if body.is_end_stream() => {
            drop(body);
            tokio::select! {
                biased;
                r = direct::send(target.addr, snapshot.timeouts.connect, &parts) => r.map(Answer::Direct).map_err(UpstreamError::from),
                _ = &mut deadline => Err(UpstreamError::Timeout),
            }
        }
        None => {
            let request = Request::from_parts(parts, body);
            tokio::select! {
                biased;
                r = upstream::send(target.addr, snapshot.timeouts.connect, request) => r.map(|(response, pooled)| Answer::Hyper(response, Some(pooled))).map_err(UpstreamError::from),
                _ = &mut deadline => Err(UpstreamError::Timeout),
            }
        }
        Some(client_upgrade) => {
            let request = Request::from_parts(parts, body);
            upgrade(
                conn,
                target,
                &snapshot.timeouts,
                &mut deadline,
                request,
                client_upgrade,
            )
            .await
            .map(|response| Answer::Hyper(response, None))
        }
    };
    let answer = match result {
        Ok(answer) => answer,
        Err(e) => {
            tracing::debug!(lb = %conn.shared.lb, target = %target.addr, error = %e, "upstream failed");
            let response = e.response();
            counters.count(response.status());
            return response;
        }
    };
    let (mut parts, body) = match answer {
        Answer::Hyper(response, pooled) => {
            let (parts, body) = response.into_parts();
            (parts, ProxyBody::upstream(body, deadline, pooled))
        }
        Answer::Direct(response) => {
            let (parts, body) = response.into_parts();
            (parts, ProxyBody::direct(body, deadline))
        }
    };
    remove_hop_by_hop(
        &mut parts.headers,
        parts.status == StatusCode::SWITCHING_PROTOCOLS,
    );
    if pick.set_cookie
        && let Some(cookie) = &target.set_cookie
    {
        parts.headers.append(SET_COOKIE, cookie.clone());
    }
    counters.count(parts.status);
    Response::from_parts(parts, body)
}

/// Forwards an upgrade request on a fresh connection; on `101 Switching Protocols` both
/// connections are handed to a tunnel copying bytes both ways until either side ends.
async fn upgrade(
    conn: &ClientConn,
    target: &HttpTarget,
    timeouts: &HttpTimeouts,
    deadline: &mut Pin<Box<Sleep>>,
    request: Request<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Result<Response<Incoming>, UpstreamError> {
    let sender = upstream::dial_for_upgrade(target.addr, timeouts.connect)
        .await
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let mut response = tokio::select! {
        biased;
        r = upstream::send_upgrade(sender, request) => r.map_err(|e| UpstreamError::Failed(e.to_string()))?,
        _ = deadline.as_mut() => return Err(UpstreamError::Timeout),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let closing = conn.shared.connections.clone();
        let lb = conn.shared.lb.clone();
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(%lb, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            tokio::select! {
                _ = closing.cancelled() => {}
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = r {
                        tracing::trace!(%lb, error = %e, "upgraded connection ended");
                    }
                }
            }
        });
    }
    Ok(response)
}

/// The host the client asked for: `:authority` for HTTP/2, else `Host`, else an absolute URI's.
fn request_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    let from_uri = || {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    };
    if req.version() == Version::HTTP_2 {
        from_uri().or_else(|| req.headers().get(HOST).cloned())
    } else {
        req.headers().get(HOST).cloned().or_else(from_uri)
    }
}

fn origin_form(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// `308` to the same host and path over HTTPS (`308` keeps the method and body).
fn redirect(host: &str, https_port: u16, uri: &Uri) -> Response<ProxyBody> {
    let host = strip_port(host);
    if host.is_empty() {
        return local(StatusCode::BAD_REQUEST, "the request names no host\n");
    }
    let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let Ok(location) = HeaderValue::try_from(location) else {
        return local(StatusCode::BAD_REQUEST, "the host is not valid\n");
    };
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(LOCATION, location);
    response
}

fn local(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::text(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
