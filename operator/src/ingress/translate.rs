//! Ingress (plus the Services and Secrets it names, and the cluster's nodes) → the
//! provider-agnostic application load balancer. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use portico_provider::routing::{HostMatch, HostRoutes, PathMatch, PathRoute, RouteTable};
use portico_provider::{
    ApplicationFrontend, Backend, Certificate, CertificateSource, Frontend, HealthCheck,
    HttpTimeouts, HttpsListener, LoadBalancerName, LoadBalancerSpec, Ownership, Probe,
    SessionAffinity, Target, TargetPool,
};

use crate::policy::{Attached, apply};
use crate::service::annotations::AnnotationReader;
use crate::service::nodes::EligibleNode;
use crate::service::translate::node_probe;

/// `"cookie"` pins each client to one target with a cookie the load balancer sets.
pub const AFFINITY: &str = "lb.portico.dev/affinity";
pub const AFFINITY_COOKIE_NAME: &str = "lb.portico.dev/affinity-cookie-name";
pub const AFFINITY_COOKIE_TTL: &str = "lb.portico.dev/affinity-cookie-ttl-seconds";
/// `"true"` answers plain HTTP with a redirect to HTTPS.
pub const SSL_REDIRECT: &str = "lb.portico.dev/ssl-redirect";
pub const BACKEND_TIMEOUT: &str = "lb.portico.dev/backend-timeout-seconds";
/// The name of an address the cloud holds (a GCP global address) to serve on.
pub const STATIC_ADDRESS: &str = "lb.portico.dev/static-address-name";
/// GKE's name for the same, honoured so Ingresses move over unchanged.
pub const GKE_STATIC_ADDRESS: &str = "kubernetes.io/ingress.global-static-ip-name";
/// Comma-separated ids of certificates the cloud holds (ACM ARNs on AWS), served with the TLS
/// Secrets (or instead of them, on a cloud that takes no PEM).
pub const CERTIFICATES: &str = "lb.portico.dev/certificates";

pub const DEFAULT_COOKIE: &str = "PORTICO_AFFINITY";
pub const DEFAULT_COOKIE_TTL: Duration = Duration::from_secs(3600);

/// What an Ingress refers to, as read from the API for this reconcile.
#[derive(Default)]
pub struct Referenced {
    /// Services of the Ingress's namespace, by name.
    pub services: BTreeMap<String, Service>,
    /// TLS Secrets of the Ingress's namespace, by name.
    pub secrets: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct InvalidIngress {
    pub problems: Vec<String>,
}

/// Names of the Services an Ingress routes to (for fetching and for watch mapping).
pub fn referenced_services(ingress: &Ingress) -> Vec<String> {
    let mut names: Vec<String> = backends(ingress)
        .filter_map(|b| b.service.as_ref().map(|s| s.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Names of the Secrets an Ingress takes certificates from.
pub fn referenced_secrets(ingress: &Ingress) -> Vec<String> {
    let mut names: Vec<String> = ingress
        .spec
        .iter()
        .flat_map(|s| s.tls.iter().flatten())
        .filter_map(|t| t.secret_name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn backends(ingress: &Ingress) -> impl Iterator<Item = &IngressBackend> {
    let spec = ingress.spec.as_ref();
    let default = spec.and_then(|s| s.default_backend.as_ref());
    let rules = spec
        .and_then(|s| s.rules.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|r| r.http.as_ref())
        .flat_map(|h| h.paths.iter().map(|p| &p.backend));
    default.into_iter().chain(rules)
}

pub fn ownership(cluster_id: &str, ingress: &Ingress) -> Ownership {
    crate::object::ownership(cluster_id, "Ingress", ingress)
}

pub fn load_balancer_name(ingress: &Ingress) -> LoadBalancerName {
    crate::object::load_balancer_name(ingress)
}

/// The application load balancer `ingress` should have.
pub fn desired_load_balancer(
    cluster_id: &str,
    ingress: &Ingress,
    referenced: &Referenced,
    nodes: &[EligibleNode],
    policies: &Attached,
) -> Result<LoadBalancerSpec, InvalidIngress> {
    let spec = ingress.spec.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let mut reader = AnnotationReader::new(ingress.metadata.annotations.as_ref());

    let affinity = match reader.raw(AFFINITY).map(str::trim) {
        None | Some("none") | Some("") => SessionAffinity::None,
        Some("cookie") => {
            let name = reader
                .raw(AFFINITY_COOKIE_NAME)
                .unwrap_or(DEFAULT_COOKIE)
                .trim()
                .to_string();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                problems.push(format!(
                    "annotation {AFFINITY_COOKIE_NAME}: {name:?} is not a valid cookie name"
                ));
            }
            let ttl = reader
                .parse::<u64>(AFFINITY_COOKIE_TTL, 1..=31_536_000)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_COOKIE_TTL);
            SessionAffinity::Cookie { name, ttl }
        }
        Some(other) => {
            problems.push(format!("annotation {AFFINITY}: {other:?} is not a valid value (want \"cookie\" or \"none\")"));
            SessionAffinity::None
        }
    };
    let frontend_policy = policies.frontend.as_ref();
    let redirect_to_https = frontend_policy
        .and_then(|p| p.redirect_to_https)
        .or_else(|| reader.flag(SSL_REDIRECT))
        .unwrap_or(false);
    let mut timeouts = HttpTimeouts::default();
    if let Some(s) = reader.parse::<u64>(BACKEND_TIMEOUT, 1..=3600) {
        timeouts.request = Duration::from_secs(s);
    }

    // One pool per (Service, port) the Ingress routes to.
    let mut pools: BTreeMap<String, Backend> = BTreeMap::new();
    let mut backend_name = |b: &IngressBackend, problems: &mut Vec<String>| -> Option<String> {
        let Some(svc_ref) = b.service.as_ref() else {
            problems.push("resource backends are not supported; use a Service backend".into());
            return None;
        };
        let Some(svc) = referenced.services.get(&svc_ref.name) else {
            problems.push(format!("Service {:?} does not exist", svc_ref.name));
            return None;
        };
        let svc_spec = svc.spec.clone().unwrap_or_default();
        let wanted = svc_ref.port.as_ref();
        let port = svc_spec.ports.iter().flatten().find(|p| match wanted {
            Some(w) => match (&w.name, w.number) {
                (Some(n), _) if !n.is_empty() => p.name.as_deref() == Some(n.as_str()),
                (_, Some(num)) => p.port == num,
                _ => false,
            },
            None => false,
        });
        let Some(port) = port else {
            problems.push(format!("Service {:?} has no port {wanted:?}", svc_ref.name));
            return None;
        };
        let Some(node_port) = port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            problems.push(format!(
                "Service {:?} port {} has no node port (Portico's load balancers reach Services \
                 through node ports: use type NodePort or LoadBalancer)",
                svc_ref.name, port.port
            ));
            return None;
        };
        // A NodePort Service with `externalTrafficPolicy: Local` has no health check node
        // port (only type LoadBalancer gets one); then the node port itself is probed, as GKE
        // does for Ingress backends: nodes without a local endpoint do not answer it.
        let probe = node_probe(&svc_spec).unwrap_or(Probe::Http {
            port: node_port,
            path: "/".into(),
        });
        let name = format!("{}-{}", svc_ref.name, port.port);
        let policy = policies.backend.get(&svc_ref.name);
        pools.entry(name.clone()).or_insert_with(|| {
            let mut backend = Backend {
                name: name.clone(),
                timeouts: policy.and_then(|p| apply::backend_timeouts(p, &timeouts)),
                pool: TargetPool {
                    targets: nodes
                        .iter()
                        .map(|n| Target {
                            node: n.name.clone(),
                            address: n.internal_ip,
                            port: node_port,
                            provider_id: n.provider_id.clone(),
                        })
                        .collect(),
                    health_check: HealthCheck::with_probe(probe),
                    affinity: affinity.clone(),
                    proxy_protocol: false,
                    preserve_client_ip: svc_spec.external_traffic_policy.as_deref()
                        == Some("Local"),
                    drain_timeout: None,
                },
            };
            if let Some(policy) = policy {
                apply::backend_pool(&mut backend.pool, policy, node_port, true);
            }
            backend
        });
        Some(name)
    };

    let default_backend = spec
        .default_backend
        .as_ref()
        .and_then(|b| backend_name(b, &mut problems));
    let mut hosts = Vec::new();
    for rule in spec.rules.iter().flatten() {
        let mut paths = Vec::new();
        for p in rule.http.iter().flat_map(|h| h.paths.iter()) {
            let path = p.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                problems.push(format!("path {path:?} must start with '/'"));
                continue;
            }
            let matcher = match p.path_type.as_str() {
                "Exact" => PathMatch::Exact(path),
                // ImplementationSpecific is documented as Prefix.
                "Prefix" | "ImplementationSpecific" => PathMatch::prefix(&path),
                other => {
                    problems.push(format!("path {path:?}: unknown pathType {other:?}"));
                    continue;
                }
            };
            if let Some(backend) = backend_name(&p.backend, &mut problems) {
                paths.push(PathRoute {
                    path: matcher,
                    backend,
                });
            }
        }
        hosts.push(HostRoutes {
            host: HostMatch::parse(rule.host.as_deref()),
            paths,
        });
    }

    let mut certificates = Vec::new();
    for tls in spec.tls.iter().flatten() {
        // No secret: the entry only asks for SNI routing, which needs nothing from us.
        let Some(secret_name) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        match certificate(referenced.secrets.get(secret_name), secret_name) {
            Ok((chain, key)) => certificates.push(Certificate {
                name: format!(
                    "{}/{secret_name}",
                    ingress.metadata.namespace.as_deref().unwrap_or_default()
                ),
                hosts: tls.hosts.clone().unwrap_or_default(),
                source: CertificateSource::Pem { chain, key },
            }),
            Err(problem) => problems.push(problem),
        }
    }
    // Held by the cloud: the policy's, then the annotation's, each once.
    let held = frontend_policy
        .and_then(|p| p.tls.as_ref())
        .and_then(|t| t.certificates.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(
            reader
                .raw(CERTIFICATES)
                .unwrap_or_default()
                .split(',')
                .map(|id| id.trim().to_string()),
        )
        .filter(|id| !id.is_empty());
    for id in held {
        if !certificates.iter().any(|c| c.name == id) {
            certificates.push(Certificate {
                name: id.clone(),
                hosts: Vec::new(),
                source: CertificateSource::Reference { id },
            });
        }
    }
    if redirect_to_https && certificates.is_empty() {
        problems.push(
            "an HTTPS redirect is asked for, but there is no TLS certificate to redirect to"
                .to_string(),
        );
    }
    let source_ranges = match frontend_policy.map(apply::source_ranges) {
        None | Some(Ok(None)) => Vec::new(),
        Some(Ok(Some(ranges))) => ranges,
        Some(Err(mut bad)) => {
            problems.append(&mut bad);
            Vec::new()
        }
    };
    if default_backend.is_none() && hosts.iter().all(|h| h.paths.is_empty()) && problems.is_empty()
    {
        problems.push("the Ingress has neither rules nor a default backend".into());
    }

    let requested_address_name = reader
        .raw(STATIC_ADDRESS)
        .or_else(|| reader.raw(GKE_STATIC_ADDRESS))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from);

    problems.append(&mut reader.problems);
    if !problems.is_empty() {
        return Err(InvalidIngress { problems });
    }
    Ok(LoadBalancerSpec {
        name: load_balancer_name(ingress),
        owner: ownership(cluster_id, ingress),
        requested_address: None,
        requested_address_name,
        source_ranges,
        frontend: Frontend::Application(ApplicationFrontend {
            http_port: 80,
            https: (!certificates.is_empty()).then_some(HttpsListener {
                port: 443,
                certificates,
                min_tls_version: frontend_policy
                    .and_then(apply::min_tls_version)
                    .unwrap_or_default(),
            }),
            redirect_to_https,
            routes: RouteTable {
                hosts,
                default_backend,
            }
            .normalized(),
            backends: pools.into_values().collect(),
            timeouts,
        }),
    })
}

/// The PEM chain and key of a `kubernetes.io/tls` Secret, or why it cannot be used.
fn certificate(secret: Option<&Secret>, name: &str) -> Result<(String, String), String> {
    let secret = secret.ok_or_else(|| format!("TLS Secret {name:?} does not exist"))?;
    let data = secret.data.as_ref();
    let field = |key: &str| -> Result<String, String> {
        let bytes = data
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("TLS Secret {name:?} has no {key}"))?;
        let text = String::from_utf8(bytes.0.clone())
            .map_err(|_| format!("TLS Secret {name:?}: {key} is not PEM text"))?;
        if !text.contains("-----BEGIN ") {
            return Err(format!("TLS Secret {name:?}: {key} is not PEM"));
        }
        Ok(text)
    };
    Ok((field("tls.crt")?, field("tls.key")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use portico_provider::routing::Decision;
    use serde_json::json;

    fn nodes() -> Vec<EligibleNode> {
        vec![EligibleNode {
            name: "node-1".into(),
            internal_ip: "127.20.1.1".parse().unwrap(),
            provider_id: None,
        }]
    }

    fn svc(name: &str, node_port: Option<i32>) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    node_port,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn tls_secret(name: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    (
                        "tls.crt".to_string(),
                        ByteString(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(b"-----BEGIN PRIVATE KEY-----\n".to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn referenced() -> Referenced {
        Referenced {
            services: [
                ("web".to_string(), svc("web", Some(30080))),
                ("api".to_string(), svc("api", Some(30081))),
            ]
            .into(),
            secrets: [("web-tls".to_string(), tls_secret("web-tls"))].into(),
        }
    }

    fn ingress(spec: serde_json::Value) -> Ingress {
        serde_json::from_value(json!({
            "metadata": {"name": "shop", "namespace": "ns", "uid": "11111111-2222-3333-4444-555555555555"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn app(lb: &LoadBalancerSpec) -> &ApplicationFrontend {
        match &lb.frontend {
            Frontend::Application(a) => a,
            other => panic!("expected an application frontend, got {other:?}"),
        }
    }

    fn two_hosts() -> Ingress {
        ingress(json!({
            "rules": [
                {"host": "web.example", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                ]}},
                {"host": "api.example", "http": {"paths": [
                    {"path": "/v1", "pathType": "Exact", "backend": {"service": {"name": "api", "port": {"name": "http"}}}},
                    {"path": "/v1/", "pathType": "ImplementationSpecific", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                ]}},
            ],
            "tls": [{"hosts": ["web.example"], "secretName": "web-tls"}],
        }))
    }

    #[test]
    fn rules_become_routes_to_one_pool_per_service_port() {
        let lb = desired_load_balancer(
            "c",
            &two_hosts(),
            &referenced(),
            &nodes(),
            &Attached::default(),
        )
        .unwrap();
        let a = app(&lb);
        let names: Vec<&str> = a.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["api-80", "web-80"]);
        assert_eq!(a.backends[1].pool.targets[0].port, 30080);
        assert_eq!(
            a.routes.resolve("web.example", "/x"),
            Decision::Backend("web-80")
        );
        assert_eq!(
            a.routes.resolve("api.example", "/v1"),
            Decision::Backend("api-80")
        );
        assert_eq!(
            a.routes.resolve("api.example", "/v1/x"),
            Decision::Backend("web-80"),
            "ImplementationSpecific is Prefix"
        );
        assert_eq!(a.routes.resolve("other.example", "/"), Decision::NotFound);
        assert_eq!(lb.owner.object_ref, "Ingress/ns/shop");
    }

    #[test]
    fn tls_secrets_become_certificates_served_on_443() {
        let lb = desired_load_balancer(
            "c",
            &two_hosts(),
            &referenced(),
            &nodes(),
            &Attached::default(),
        )
        .unwrap();
        let https = app(&lb).https.as_ref().expect("https listener");
        assert_eq!(https.port, 443);
        assert_eq!(https.certificates[0].name, "ns/web-tls");
        assert_eq!(https.certificates[0].hosts, ["web.example"]);
    }

    #[test]
    fn certificates_the_cloud_holds_come_from_the_annotation_and_the_policy_each_once() {
        let arn = |n: &str| format!("arn:aws:acm:eu-west-1:123456789012:certificate/{n}");
        let mut ing = ingress(json!({
            "rules": [{"host": "web.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
            ]}}],
            // Hosts only: SNI routing, with the certificate held by the cloud.
            "tls": [{"hosts": ["web.example"]}],
        }));
        ing.metadata.annotations = Some(
            [(
                CERTIFICATES.to_string(),
                format!("{}, {}", arn("a"), arn("b")),
            )]
            .into(),
        );
        let policy: portico_crds::FrontendPolicySpec = serde_json::from_value(json!({
            "targetRef": {"kind": "Ingress", "name": "shop"},
            "tls": {"certificates": [arn("b"), arn("c")]},
        }))
        .unwrap();
        let attached = Attached {
            frontend: Some(policy),
            ..Attached::default()
        };
        let lb = desired_load_balancer("c", &ing, &referenced(), &nodes(), &attached).unwrap();
        let https = app(&lb)
            .https
            .as_ref()
            .expect("https from held certificates alone");
        let ids: Vec<&str> = https
            .certificates
            .iter()
            .map(|c| match &c.source {
                CertificateSource::Reference { id } => id.as_str(),
                CertificateSource::Pem { .. } => panic!("no Secret was named"),
            })
            .collect();
        assert_eq!(ids, [arn("b"), arn("c"), arn("a")]);
        assert_eq!(https.min_tls_version, portico_provider::TlsVersion::Tls12);
    }

    #[test]
    fn a_static_address_is_asked_for_by_name_with_portico_or_gke_annotations() {
        for key in [STATIC_ADDRESS, GKE_STATIC_ADDRESS] {
            let mut ing = two_hosts();
            ing.metadata.annotations = Some([(key.to_string(), " shop-ip ".to_string())].into());
            let lb =
                desired_load_balancer("c", &ing, &referenced(), &nodes(), &Attached::default())
                    .unwrap();
            assert_eq!(
                lb.requested_address_name.as_deref(),
                Some("shop-ip"),
                "{key}"
            );
        }
        let lb = desired_load_balancer(
            "c",
            &two_hosts(),
            &referenced(),
            &nodes(),
            &Attached::default(),
        )
        .unwrap();
        assert_eq!(lb.requested_address_name, None);
    }

    #[test]
    fn missing_services_secrets_and_node_ports_are_all_reported() {
        let mut refs = referenced();
        refs.secrets.clear();
        refs.services.insert("api".into(), svc("api", None));
        let mut ing = two_hosts();
        ing.spec.as_mut().unwrap().default_backend =
            serde_json::from_value(json!({"service": {"name": "gone", "port": {"number": 80}}}))
                .unwrap();
        let err =
            desired_load_balancer("c", &ing, &refs, &nodes(), &Attached::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"gone\" does not exist"), "{text}");
        assert!(text.contains("no node port"), "{text}");
        assert!(
            text.contains("TLS Secret \"web-tls\" does not exist"),
            "{text}"
        );
    }

    #[test]
    fn cookie_affinity_and_redirect_come_from_annotations() {
        let mut ing = two_hosts();
        ing.metadata.annotations = Some(
            [
                (AFFINITY.to_string(), "cookie".to_string()),
                (AFFINITY_COOKIE_TTL.to_string(), "60".to_string()),
                (SSL_REDIRECT.to_string(), "true".to_string()),
            ]
            .into(),
        );
        let lb = desired_load_balancer("c", &ing, &referenced(), &nodes(), &Attached::default())
            .unwrap();
        let a = app(&lb);
        assert!(a.redirect_to_https);
        assert_eq!(
            a.backends[0].pool.affinity,
            SessionAffinity::Cookie {
                name: DEFAULT_COOKIE.into(),
                ttl: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn a_default_backend_alone_serves_everything() {
        let ing = ingress(
            json!({"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}),
        );
        let lb = desired_load_balancer("c", &ing, &referenced(), &nodes(), &Attached::default())
            .unwrap();
        assert_eq!(
            app(&lb).routes.resolve("any", "/any"),
            Decision::Backend("web-80")
        );
        assert!(app(&lb).https.is_none());
    }

    #[test]
    fn a_local_node_port_service_is_probed_on_its_node_port() {
        let mut refs = referenced();
        let web = refs.services.get_mut("web").unwrap().spec.as_mut().unwrap();
        web.external_traffic_policy = Some("Local".into());
        let lb = desired_load_balancer("c", &two_hosts(), &refs, &nodes(), &Attached::default())
            .unwrap();
        let web = app(&lb)
            .backends
            .iter()
            .find(|b| b.name == "web-80")
            .unwrap();
        assert_eq!(
            web.pool.health_check.probe,
            Probe::Http {
                port: 30080,
                path: "/".into()
            }
        );
        let api = app(&lb)
            .backends
            .iter()
            .find(|b| b.name == "api-80")
            .unwrap();
        assert_eq!(
            api.pool.health_check.probe,
            Probe::Http {
                port: 10256,
                path: "/healthz".into()
            }
        );
    }

    #[test]
    fn references_are_listed_for_watches() {
        assert_eq!(referenced_services(&two_hosts()), ["api", "web"]);
        assert_eq!(referenced_secrets(&two_hosts()), ["web-tls"]);
    }
}
