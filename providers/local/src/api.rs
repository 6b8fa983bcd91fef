//! The HTTP/JSON API: routes, bodies and status codes over [`Cloud`].
//!
//! | route | success | errors |
//! |---|---|---|
//! | `PUT /v1/loadbalancers/{name}[?pool=first-last]` (`LoadBalancerSpec`) | 200 `LoadBalancerStatus` | 400, 409, 422, 507 |
//! | `GET /v1/loadbalancers/{name}` | 200 `ObservedLoadBalancer` | 404 |
//! | `GET /v1/loadbalancers[?clusterId=]` | 200 `[ObservedLoadBalancer]` | |
//! | `DELETE /v1/loadbalancers/{name}?clusterId=&objectUid=` | 204 | 404, 409, 422 |
//! | `GET /healthz`, `GET /metrics` | 200 | |
//!
//! Errors carry `{"error": "<reason>", "message": "..."}` (and `owner` on 409).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use portico_provider::{LoadBalancerName, LoadBalancerSpec, Ownership};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cloud::{Cloud, CloudError, describe};
use crate::pool::{AddressPool, PoolError};
use crate::query;

const MAX_BODY: usize = 1 << 20;
/// How long open API connections get to finish their request on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The error body of every non-2xx answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    /// Who owns the load balancer, on 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Serves the API on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, cloud: Arc<Cloud>, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let cloud = cloud.clone();
        let service = service_fn(move |req| {
            let cloud = cloud.clone();
            async move { Ok::<_, Infallible>(route(&cloud, req).await) }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "API connection failed");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API connections still open after {DRAIN_TIMEOUT:?}; dropping them");
    }
}

async fn route(cloud: &Cloud, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            cloud.metrics().await,
        ),
        (&Method::GET, ["v1", "loadbalancers"]) => {
            let cluster = query::get(query.as_deref(), "clusterId");
            json(StatusCode::OK, &cloud.list(cluster.as_deref()).await)
        }
        (_, ["v1", "loadbalancers", name]) => match name.parse::<LoadBalancerName>() {
            Err(e) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                e.to_string(),
                None,
            ),
            Ok(name) => match method {
                Method::GET => match cloud.get(&name).await {
                    Some(lb) => json(StatusCode::OK, &lb),
                    None => from_cloud_error(CloudError::NotFound(name)),
                },
                Method::PUT => put(cloud, &name, query.as_deref(), req).await,
                Method::DELETE => delete(cloud, &name, query.as_deref()).await,
                _ => error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{method} is not served on {path}"),
                    None,
                ),
            },
        },
        _ => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {method} {path}"),
            None,
        ),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "API request");
    response
}

async fn put(
    cloud: &Cloud,
    name: &LoadBalancerName,
    query: Option<&str>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    // The part of the pool a new load balancer's address comes from (a ProviderConfig's).
    let within = match query::get(query, "pool").map(|p| p.parse::<AddressPool>()) {
        None => None,
        Some(Ok(pool)) => Some(pool),
        Some(Err(e)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("pool: {e}"),
                None,
            );
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Invalid",
                format!("reading the body: {e}"),
                None,
            );
        }
    };
    let spec: LoadBalancerSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => {
            // Malformed JSON is the client's bug; well-formed JSON that is not a valid spec is
            // a spec the cloud cannot serve.
            let status = if e.is_syntax() || e.is_eof() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            return error(
                status,
                "Invalid",
                format!("not a load balancer spec: {e}"),
                None,
            );
        }
    };
    match cloud.ensure(name, spec, within).await {
        Ok(status) => json(StatusCode::OK, &status),
        Err(e) => from_cloud_error(e),
    }
}

async fn delete(
    cloud: &Cloud,
    name: &LoadBalancerName,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    let (Some(cluster_id), Some(object_uid)) = (
        query::get(query, "clusterId"),
        query::get(query, "objectUid"),
    ) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "DELETE needs clusterId and objectUid query parameters".into(),
            None,
        );
    };
    let owner = Ownership {
        cluster_id,
        object_uid,
        object_ref: String::new(),
    };
    match cloud.delete(name, &owner).await {
        Ok(()) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Err(e) => from_cloud_error(e),
    }
}

fn from_cloud_error(e: CloudError) -> Response<Full<Bytes>> {
    let message = e.to_string();
    match e {
        CloudError::Invalid(_) => error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message, None),
        CloudError::NotOwned { owner, .. } => error(
            StatusCode::CONFLICT,
            "NotOwned",
            message,
            Some(describe(&owner)),
        ),
        CloudError::Address(PoolError::Exhausted(_)) => {
            error(StatusCode::INSUFFICIENT_STORAGE, "Exhausted", message, None)
        }
        CloudError::Address(_) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "AddressUnavailable",
            message,
            None,
        ),
        CloudError::NotFound(_) => error(StatusCode::NOT_FOUND, "NotFound", message, None),
        CloudError::Store(_) => {
            tracing::error!(error = %message, "cannot save state");
            error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", message, None)
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("API types always serialize");
    text_bytes(status, "application/json", body.into())
}

fn error(
    status: StatusCode,
    reason: &str,
    message: String,
    owner: Option<String>,
) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: reason.to_string(),
            message,
            owner,
        },
    )
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    text_bytes(status, content_type, body.into())
}

fn text_bytes(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
