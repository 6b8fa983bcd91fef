//! kube-proxy's two HTTP health endpoints: `nodeIP:10256/healthz` for the node as a whole and
//! the health check node port of each `externalTrafficPolicy: Local` service.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// kube-proxy's own health port.
pub(crate) const NODE_HEALTH_PORT: u16 = 10256;
/// The taint the cluster autoscaler puts on nodes it is about to delete (KEP-3836).
pub(crate) const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What `nodeIP:10256/healthz` reports.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NodeHealth {
    /// False while the node is being deleted, marked for deletion or removed from the cluster:
    /// load balancers should stop sending new connections (KEP-3836).
    pub eligible: bool,
    /// When the proxy rules were last synced.
    pub last_updated: jiff::Timestamp,
}

/// The answer to a `/healthz` request on port 10256.
pub(crate) fn node_health_response(
    path: &str,
    health: &NodeHealth,
    now: jiff::Timestamp,
) -> (StatusCode, Value) {
    if path != "/healthz" && path != "/livez" {
        return (StatusCode::NOT_FOUND, json!({"error": "not found"}));
    }
    let status = if health.eligible || path == "/livez" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        json!({
            "lastUpdated": health.last_updated.to_string(),
            "currentTime": now.to_string(),
            "nodeEligible": health.eligible,
        }),
    )
}

/// What a service's health check node port reports for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The answer on a health check node port (any path, as kube-proxy does).
pub(crate) fn service_health_response(health: &ServiceHealth) -> (StatusCode, Value) {
    let status = if health.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        json!({
            "service": {"namespace": health.namespace, "name": health.name},
            "localEndpoints": health.local_endpoints,
        }),
    )
}

/// Serves `respond(path)` as JSON to every request on `listener` until `stop`.
pub(crate) async fn serve<F>(listener: TcpListener, stop: CancellationToken, respond: F)
where
    F: Fn(&str) -> (StatusCode, Value) + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "health accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let respond = respond.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (status, body) = respond(req.uri().path());
                let response = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("X-Content-Type-Options", "nosniff")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("response");
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                result = connection => if let Err(error) = result {
                    debug!(%peer, %error, "health connection failed");
                },
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_health_is_unavailable_while_the_node_is_going_away() {
        let t = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let healthy = NodeHealth {
            eligible: true,
            last_updated: t,
        };
        let (status, body) = node_health_response("/healthz", &healthy, t);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["lastUpdated"], "2023-11-14T22:13:20Z");
        assert!(body["currentTime"].is_string());
        let leaving = NodeHealth {
            eligible: false,
            last_updated: t,
        };
        assert_eq!(
            node_health_response("/healthz", &leaving, t).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            node_health_response("/livez", &leaving, t).0,
            StatusCode::OK
        );
        assert_eq!(
            node_health_response("/other", &healthy, t).0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn service_health_needs_a_local_endpoint() {
        let mut health = ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 0,
        };
        let (status, body) = service_health_response(&health);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 0})
        );
        health.local_endpoints = 2;
        assert_eq!(service_health_response(&health).0, StatusCode::OK);
    }
}
