//! Portico's [`Provider`] for the local cloud: a thin HTTP client of its API.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portico_provider::error::error_chain;
use portico_provider::{
    LoadBalancerName, LoadBalancerSpec, LoadBalancerStatus, ObservedLoadBalancer, Ownership,
    Provider, ProviderError,
};
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;
use crate::pool::AddressPool;
use crate::query;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The local cloud as a [`Provider`].
#[derive(Clone, Debug)]
pub struct LocalCloudProvider {
    api: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    pool: Option<AddressPool>,
}

/// An answer of the API, read in full.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl LocalCloudProvider {
    /// A client of the daemon whose API listens on `api` (plain HTTP).
    pub fn new(api: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        LocalCloudProvider {
            api,
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: DEFAULT_TIMEOUT,
            pool: None,
        }
    }

    /// New load balancers take their addresses from `pool`, a part of the cloud's pool.
    pub fn with_pool(mut self, pool: AddressPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Bounds every call (connect, request and reading the answer) by `timeout` instead of 10 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn api(&self) -> SocketAddr {
        self.api
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ProviderError> {
        let uri = format!("http://{}{}", self.api, path_and_query);
        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.map(Bytes::from).unwrap_or_default()))
            .map_err(|e| ProviderError::Unavailable(format!("building {method} {uri}: {e}")))?;
        let work = async {
            let response = self.client.request(request).await.map_err(|e| {
                ProviderError::Unavailable(format!("{method} {uri}: {}", error_chain(&e)))
            })?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| {
                    ProviderError::Unavailable(format!("{method} {uri}: reading the answer: {e}"))
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(answer) => answer,
            Err(_) => Err(ProviderError::Unavailable(format!(
                "{method} {uri}: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

fn path(name: &LoadBalancerName) -> String {
    format!("/v1/loadbalancers/{name}")
}

fn parse<T: DeserializeOwned>(answer: &Answer) -> Result<T, ProviderError> {
    serde_json::from_slice(&answer.body).map_err(|e| {
        ProviderError::Unavailable(format!("unexpected answer from the local cloud: {e}"))
    })
}

/// Maps a non-success answer onto the reconciler's error kinds.
fn error(answer: &Answer, name: Option<&LoadBalancerName>) -> ProviderError {
    let body: Option<ErrorBody> = serde_json::from_slice(&answer.body).ok();
    let message = body.as_ref().map_or_else(
        || {
            format!(
                "HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )
        },
        |b| b.message.clone(),
    );
    match answer.status {
        StatusCode::CONFLICT => ProviderError::NotOwned {
            name: name.map_or_else(String::new, |n| n.to_string()),
            owner: body.and_then(|b| b.owner).unwrap_or(message),
        },
        StatusCode::BAD_REQUEST
        | StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::PAYLOAD_TOO_LARGE => ProviderError::Invalid(message),
        StatusCode::INSUFFICIENT_STORAGE => ProviderError::Exhausted(message),
        StatusCode::SERVICE_UNAVAILABLE => match retry_after(&answer.headers) {
            Some(after) => ProviderError::RetryAfter {
                after,
                reason: message,
            },
            None => ProviderError::Unavailable(message),
        },
        _ => ProviderError::Unavailable(message),
    }
}

/// `Retry-After` in delay-seconds (the daemon never sends an HTTP date).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[async_trait]
impl Provider for LocalCloudProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        let body = serde_json::to_vec(spec).expect("specs always serialize");
        let target = match self.pool {
            Some(pool) => format!(
                "{}?pool={}",
                path(&spec.name),
                query::encode(&pool.to_string())
            ),
            None => path(&spec.name),
        };
        let answer = self.call(Method::PUT, &target, Some(body)).await?;
        match answer.status {
            StatusCode::OK => parse(&answer),
            _ => Err(error(&answer, Some(&spec.name))),
        }
    }

    async fn get(
        &self,
        name: &LoadBalancerName,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let answer = self.call(Method::GET, &path(name), None).await?;
        match answer.status {
            StatusCode::OK => parse(&answer).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(error(&answer, Some(name))),
        }
    }

    async fn delete(
        &self,
        name: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<(), ProviderError> {
        let target = format!(
            "{}?clusterId={}&objectUid={}",
            path(name),
            query::encode(&owner.cluster_id),
            query::encode(&owner.object_uid)
        );
        let answer = self.call(Method::DELETE, &target, None).await?;
        match answer.status {
            StatusCode::OK | StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(error(&answer, Some(name))),
        }
    }

    async fn list_owned(
        &self,
        cluster_id: &str,
    ) -> Result<Vec<ObservedLoadBalancer>, ProviderError> {
        let target = format!("/v1/loadbalancers?clusterId={}", query::encode(cluster_id));
        let answer = self.call(Method::GET, &target, None).await?;
        match answer.status {
            StatusCode::OK => {
                let all: Vec<ObservedLoadBalancer> = parse(&answer)?;
                // The daemon filters already; filtering again keeps garbage collection safe
                // against a daemon that ignored the parameter.
                Ok(all
                    .into_iter()
                    .filter(|lb| lb.owner.cluster_id == cluster_id)
                    .collect())
            }
            _ => Err(error(&answer, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn status_codes_map_onto_provider_errors() {
        let name: LoadBalancerName = "web".parse().unwrap();
        let conflict = answer(
            409,
            &[],
            r#"{"error":"NotOwned","message":"m","owner":"Service/x/y"}"#,
        );
        assert!(matches!(
            error(&conflict, Some(&name)),
            ProviderError::NotOwned { name, owner } if name == "web" && owner == "Service/x/y"
        ));
        assert!(matches!(
            error(&answer(422, &[], "{}"), None),
            ProviderError::Invalid(_)
        ));
        assert!(matches!(
            error(&answer(507, &[], "{}"), None),
            ProviderError::Exhausted(_)
        ));
        assert!(matches!(
            error(&answer(503, &[("retry-after", "7")], "{}"), None),
            ProviderError::RetryAfter { after, .. } if after == Duration::from_secs(7)
        ));
        assert!(matches!(
            error(&answer(503, &[], "{}"), None),
            ProviderError::Unavailable(_)
        ));
        assert!(
            matches!(error(&answer(500, &[], "boom"), None), ProviderError::Unavailable(m) if m.contains("boom"))
        );
    }
}
