//! An Ingress's L7 load balancer as ELBv2 wants it, computed by pure code: an HTTP target
//! group per backend (the nodes on the backend's node port), an HTTP listener and, with TLS, an
//! HTTPS one, and listener rules in priority order that reproduce Ingress v1 precedence.
//!
//! - A rule's host is a `host-header` condition; its paths are `path-pattern` values:
//!   `Exact /x` is `/x`, `Prefix /x` is `/x` and `/x/*` (element-wise), `Prefix /` is `/*`.
//! - Exact hosts come first, then wildcards, then rules for any host; within a host, longer
//!   paths first and `Exact` before `Prefix` for the same path (see
//!   [`RouteTable::normalized`]).
//! - After a host's paths, a rule for that host alone sends whatever they missed to the
//!   default backend (or 404): in Ingress a request whose host matched never falls through to
//!   a less specific host's rules, while ALB would try the next rule.
//!
//! Not expressible on ALB, and refused: a path containing `*` or `?` (ALB's wildcards).
//! ALB's `*` in a host also matches several labels, where Ingress's matches exactly one.
//!
//! ALB holds certificates in ACM, so the HTTPS listener serves the certificates the frontend
//! names by reference (ARNs); PEM certificates from Secrets are for clouds that take them.
//! ALB has no client-IP affinity (only its own cookie, `AWSALB`, whatever name is asked for),
//! and no per-request or connect timeout: the frontend's idle timeout is what it takes.

use std::collections::BTreeMap;

use portico_provider::routing::{HostMatch, PathMatch, RouteTable};
use portico_provider::{
    ApplicationFrontend, Backend, CertificateSource, LoadBalancerName, Probe, SessionAffinity,
    TlsVersion,
};

use crate::network::{self, TargetGroupPlan};

/// ALB's limits on an ALB's idle timeout and an `lb_cookie`'s lifetime.
const IDLE_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=4000;
const COOKIE_SECONDS: std::ops::RangeInclusive<u64> = 1..=604_800;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplicationPlan {
    /// By backend name.
    pub target_groups: BTreeMap<String, TargetGroupPlan>,
    pub http_port: u16,
    /// Plain HTTP answers with a permanent redirect to this HTTPS port instead of routing.
    pub redirect_to: Option<u16>,
    pub https: Option<HttpsPlan>,
    /// On every listener that routes.
    pub rules: Vec<RulePlan>,
    pub default: RuleAction,
    /// Load balancer attributes.
    pub attributes: BTreeMap<&'static str, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsPlan {
    pub port: u16,
    /// ACM ARNs; the first is the listener's default, the others are chosen by SNI.
    pub certificates: Vec<String>,
    pub ssl_policy: &'static str,
}

/// The target group name for `backend` of load balancer `lb`: `<first 24 of lb>-<7 hex>`,
/// 32 characters, a hash of the backend's name so that it stays put while other backends come
/// and go.
pub fn target_group_name(lb: &LoadBalancerName, backend: &str) -> String {
    let prefix: String = lb.as_str().chars().take(24).collect();
    format!("{prefix}-{}", portico_provider::naming::short_hash(backend))
}

pub fn plan(
    lb: &LoadBalancerName,
    frontend: &ApplicationFrontend,
) -> Result<ApplicationPlan, String> {
    let mut problems = Vec::new();
    let mut target_groups = BTreeMap::new();
    for backend in &frontend.backends {
        match target_group(lb, backend) {
            Ok(tg) => {
                target_groups.insert(backend.name.clone(), tg);
            }
            Err(p) => problems.push(p),
        }
    }
    let https = match &frontend.https {
        None => None,
        Some(https) => {
            let mut references: Vec<(&[String], &str)> = https
                .certificates
                .iter()
                .filter_map(|c| match &c.source {
                    CertificateSource::Reference { id } => Some((c.hosts.as_slice(), id.as_str())),
                    CertificateSource::Pem { .. } => None,
                })
                .collect();
            // The default is the first certificate for no host in particular, else the first.
            if let Some(i) = references.iter().position(|(hosts, _)| hosts.is_empty()) {
                let default = references.remove(i);
                references.insert(0, default);
            }
            let mut certificates: Vec<String> = Vec::new();
            for (_, id) in references {
                if !certificates.iter().any(|c| c == id) {
                    certificates.push(id.to_string());
                }
            }
            if certificates.is_empty() {
                problems.push(
                    "an ALB serves certificates from ACM: name them by ARN (annotation \
                     lb.portico.dev/certificates or the FrontendPolicy's tls.certificates), or \
                     let the provider import the TLS Secrets (it needs ACM access)"
                        .into(),
                );
            }
            Some(HttpsPlan {
                port: https.port,
                certificates,
                ssl_policy: match https.min_tls_version {
                    TlsVersion::Tls12 => "ELBSecurityPolicy-TLS13-1-2-2021-06",
                    TlsVersion::Tls13 => "ELBSecurityPolicy-TLS13-1-3-2021-06",
                },
            })
        }
    };
    let (rules, default) = match rules(&frontend.routes) {
        Ok(r) => r,
        Err(p) => {
            problems.push(p);
            (Vec::new(), RuleAction::NotFound)
        }
    };
    for action in rules.iter().map(|r| &r.action).chain([&default]) {
        if let RuleAction::Forward(b) = action
            && !frontend.backends.iter().any(|x| &x.name == b)
        {
            problems.push(format!("a route names backend {b:?}, which is not defined"));
        }
    }
    if !problems.is_empty() {
        problems.dedup();
        return Err(problems.join("; "));
    }
    let idle = frontend
        .timeouts
        .idle
        .as_secs()
        .clamp(*IDLE_TIMEOUT_SECONDS.start(), *IDLE_TIMEOUT_SECONDS.end());
    Ok(ApplicationPlan {
        target_groups,
        http_port: frontend.http_port,
        redirect_to: frontend
            .redirect_to_https
            .then(|| https.as_ref().map(|h| h.port))
            .flatten(),
        https,
        rules,
        default,
        attributes: [("idle_timeout.timeout_seconds", idle.to_string())].into(),
    })
}

fn target_group(lb: &LoadBalancerName, backend: &Backend) -> Result<TargetGroupPlan, String> {
    let pool = &backend.pool;
    if matches!(pool.health_check.probe, Probe::Tcp { .. }) {
        return Err(format!(
            "backend {:?}: ALB health checks are HTTP; a TCP health check cannot be kept",
            backend.name
        ));
    }
    let mut attributes = BTreeMap::new();
    attributes.insert(
        "deregistration_delay.timeout_seconds",
        network::drain_seconds(pool),
    );
    match &pool.affinity {
        SessionAffinity::None => {
            attributes.insert("stickiness.enabled", "false".into());
        }
        SessionAffinity::Cookie { ttl, .. } => {
            attributes.insert("stickiness.enabled", "true".into());
            attributes.insert("stickiness.type", "lb_cookie".into());
            attributes.insert(
                "stickiness.lb_cookie.duration_seconds",
                ttl.as_secs()
                    .clamp(*COOKIE_SECONDS.start(), *COOKIE_SECONDS.end())
                    .to_string(),
            );
        }
        SessionAffinity::ClientIp { .. } => {
            return Err(format!(
                "backend {:?}: an ALB has no client-IP affinity; use cookie affinity",
                backend.name
            ));
        }
    }
    let (target_type, targets) = network::targets(pool);
    Ok(TargetGroupPlan {
        name: target_group_name(lb, &backend.name),
        protocol: "HTTP",
        target_type,
        targets,
        health_check: network::health_check(pool),
        attributes,
    })
}

/// What a rule (or the listener's default) does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Forward to the target group of this backend.
    Forward(String),
    /// A fixed `404`: no rule and no default backend.
    NotFound,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePlan {
    /// 1 is tried first.
    pub priority: i32,
    /// The `host-header` value; `None` for any host.
    pub host: Option<String>,
    /// `path-pattern` values (one rule holds at most the five ALB allows); empty for any path.
    pub paths: Vec<String>,
    pub action: RuleAction,
}

/// The rules and default action for `routes`.
pub fn rules(routes: &RouteTable) -> Result<(Vec<RulePlan>, RuleAction), String> {
    let routes = routes.clone().normalized();
    let default = match &routes.default_backend {
        Some(b) => RuleAction::Forward(b.clone()),
        None => RuleAction::NotFound,
    };
    let mut rules = Vec::new();
    let mut next = 1;
    let mut push = |host: Option<String>, paths: Vec<String>, action: RuleAction| {
        rules.push(RulePlan {
            priority: next,
            host,
            paths,
            action,
        });
        next += 1;
    };
    for group in &routes.hosts {
        let host = match &group.host {
            HostMatch::Any => None,
            HostMatch::Exact(h) => Some(h.clone()),
            HostMatch::Wildcard(suffix) => Some(format!("*.{suffix}")),
        };
        for route in &group.paths {
            push(
                host.clone(),
                patterns(&route.path)?,
                RuleAction::Forward(route.backend.clone()),
            );
        }
        // What this host's paths miss goes to the default, not to a less specific host.
        if host.is_some() {
            push(host.clone(), Vec::new(), default.clone());
        }
    }
    Ok((rules, default))
}

fn patterns(path: &PathMatch) -> Result<Vec<String>, String> {
    let (PathMatch::Exact(p) | PathMatch::Prefix(p)) = path;
    if p.contains(['*', '?']) {
        return Err(format!(
            "path {p:?} contains * or ?, which ALB path patterns treat as wildcards"
        ));
    }
    Ok(match path {
        PathMatch::Exact(p) => vec![p.clone()],
        PathMatch::Prefix(p) if p == "/" => vec!["/*".into()],
        PathMatch::Prefix(p) => vec![p.clone(), format!("{p}/*")],
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portico_provider::routing::{Decision, HostRoutes, PathRoute};
    use portico_provider::{
        Certificate, HealthCheck, HttpTimeouts, HttpsListener, Target, TargetPool,
    };

    use super::*;

    fn lb() -> LoadBalancerName {
        LoadBalancerName::for_object_uid("4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10")
    }

    fn backend(name: &str, node_port: u16) -> Backend {
        Backend {
            name: name.into(),
            pool: TargetPool {
                targets: vec![Target {
                    node: "node-1".into(),
                    address: "10.0.0.1".parse().unwrap(),
                    port: node_port,
                    provider_id: Some("aws:///eu-west-1a/i-0aaa".into()),
                }],
                health_check: HealthCheck::with_probe(Probe::Http {
                    port: node_port,
                    path: "/".into(),
                }),
                affinity: SessionAffinity::None,
                proxy_protocol: false,
                preserve_client_ip: false,
                drain_timeout: None,
            },
            timeouts: None,
        }
    }

    fn certificate(hosts: &[&str], source: CertificateSource) -> Certificate {
        Certificate {
            name: "c".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            source,
        }
    }

    fn arn(id: &str) -> CertificateSource {
        CertificateSource::Reference {
            id: format!("arn:aws:acm:eu-west-1:123456789012:certificate/{id}"),
        }
    }

    fn frontend() -> ApplicationFrontend {
        ApplicationFrontend {
            http_port: 80,
            https: None,
            redirect_to_https: false,
            routes: RouteTable {
                hosts: vec![HostRoutes {
                    host: HostMatch::parse(Some("shop.example.com")),
                    paths: vec![route(PathMatch::prefix("/"), "shop-80")],
                }],
                default_backend: Some("web-80".into()),
            },
            backends: vec![backend("shop-80", 30081), backend("web-80", 30080)],
            timeouts: HttpTimeouts::default(),
        }
    }

    fn route(path: PathMatch, backend: &str) -> PathRoute {
        PathRoute {
            path,
            backend: backend.into(),
        }
    }

    fn table(default: Option<&str>) -> RouteTable {
        RouteTable {
            hosts: vec![
                HostRoutes {
                    host: HostMatch::Any,
                    paths: vec![route(PathMatch::prefix("/"), "any-root")],
                },
                HostRoutes {
                    host: HostMatch::parse(Some("*.example.com")),
                    paths: vec![route(PathMatch::prefix("/"), "wild")],
                },
                HostRoutes {
                    host: HostMatch::parse(Some("shop.example.com")),
                    paths: vec![
                        route(PathMatch::prefix("/api"), "api"),
                        route(PathMatch::Exact("/api".into()), "api-exact"),
                        route(PathMatch::prefix("/api/v2/"), "api-v2"),
                    ],
                },
            ],
            default_backend: default.map(String::from),
        }
    }

    /// ALB's glob: `*` any run of characters, `?` one character.
    fn glob(pattern: &str, text: &str) -> bool {
        match pattern.chars().next() {
            None => text.is_empty(),
            Some('*') => (0..=text.len())
                .filter(|i| text.is_char_boundary(*i))
                .any(|i| glob(&pattern[1..], &text[i..])),
            Some('?') => {
                let mut chars = text.chars();
                chars.next().is_some() && glob(&pattern[1..], chars.as_str())
            }
            Some(c) => text.starts_with(c) && glob(&pattern[c.len_utf8()..], &text[c.len_utf8()..]),
        }
    }

    /// What an ALB does with these rules: the first by priority whose conditions all match.
    fn alb(rules: &[RulePlan], default: &RuleAction, host: &str, path: &str) -> Option<String> {
        let matched = rules.iter().find(|r| {
            r.host.as_ref().is_none_or(|h| glob(h, host))
                && (r.paths.is_empty() || r.paths.iter().any(|p| glob(p, path)))
        });
        match matched.map_or(default, |r| &r.action) {
            RuleAction::Forward(b) => Some(b.clone()),
            RuleAction::NotFound => None,
        }
    }

    #[test]
    fn the_rules_route_every_request_as_the_ingress_does() {
        for default in [None, Some("fallback")] {
            let routes = table(default);
            let (rules, default_action) = rules(&routes).unwrap();
            let normalized = routes.clone().normalized();
            for host in ["shop.example.com", "blog.example.com", "other.test"] {
                for path in [
                    "/",
                    "/api",
                    "/api/",
                    "/api/x",
                    "/apix",
                    "/api/v2",
                    "/api/v2/y",
                    "/api/v22",
                    "/static/a.css",
                ] {
                    let ingress = match normalized.resolve(host, path) {
                        Decision::Backend(b) => Some(b.to_string()),
                        Decision::NotFound => None,
                    };
                    assert_eq!(
                        alb(&rules, &default_action, host, path),
                        ingress,
                        "{host}{path} with default {default:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn priorities_follow_ingress_precedence_and_prefixes_are_element_wise() {
        let (rules, default) = rules(&table(None)).unwrap();
        let summary: Vec<(i32, Option<&str>, Vec<&str>)> = rules
            .iter()
            .map(|r| {
                (
                    r.priority,
                    r.host.as_deref(),
                    r.paths.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let shop = Some("shop.example.com");
        let wild = Some("*.example.com");
        assert_eq!(
            summary,
            vec![
                (1, shop, vec!["/api/v2", "/api/v2/*"]),
                (2, shop, vec!["/api"]),
                (3, shop, vec!["/api", "/api/*"]),
                (4, shop, vec![]),
                (5, wild, vec!["/*"]),
                (6, wild, vec![]),
                (7, None, vec!["/*"]),
            ]
        );
        assert_eq!(rules[1].action, RuleAction::Forward("api-exact".into()));
        assert_eq!(
            rules[3].action,
            RuleAction::NotFound,
            "shop's misses get 404"
        );
        assert_eq!(default, RuleAction::NotFound);
    }

    #[test]
    fn paths_with_alb_wildcards_are_refused() {
        let routes = RouteTable {
            hosts: vec![HostRoutes {
                host: HostMatch::Any,
                paths: vec![route(PathMatch::Exact("/a*b".into()), "x")],
            }],
            default_backend: None,
        };
        assert!(rules(&routes).unwrap_err().contains("wildcards"));
    }

    #[test]
    fn every_backend_is_an_http_target_group_of_nodes_on_its_node_port() {
        let plan = plan(&lb(), &frontend()).unwrap();
        let shop = &plan.target_groups["shop-80"];
        assert_eq!(shop.protocol, "HTTP");
        assert_eq!(shop.targets, [("i-0aaa".into(), 30081)].into());
        assert_eq!(shop.health_check.port, "30081");
        assert_eq!(shop.health_check.matcher, Some("200-299"));
        assert_eq!(shop.attributes["stickiness.enabled"], "false");
        assert_eq!(plan.default, RuleAction::Forward("web-80".into()));
        assert_eq!(plan.redirect_to, None);
        assert_eq!(plan.https, None);
        assert_eq!(plan.attributes["idle_timeout.timeout_seconds"], "60");
    }

    #[test]
    fn target_group_names_fit_elbv2_and_stay_with_their_backend() {
        let a = target_group_name(&lb(), "shop-80");
        let b = target_group_name(&lb(), "a-very-long-service-name-that-goes-on-8080");
        assert_eq!(a.len(), 32);
        assert_eq!(b.len(), 32);
        assert!(a.starts_with("a4a1c6f0e8d8e4f599b551b2-"));
        assert_ne!(a, b);
        assert_eq!(a, target_group_name(&lb(), "shop-80"));
    }

    #[test]
    fn cookie_affinity_is_the_alb_cookie_for_the_asked_lifetime() {
        let mut f = frontend();
        f.backends[0].pool.affinity = SessionAffinity::Cookie {
            name: "PORTICO_AFFINITY".into(),
            ttl: Duration::from_secs(3600),
        };
        let plan = plan(&lb(), &f).unwrap();
        let a = &plan.target_groups["shop-80"].attributes;
        assert_eq!(a["stickiness.enabled"], "true");
        assert_eq!(a["stickiness.type"], "lb_cookie");
        assert_eq!(a["stickiness.lb_cookie.duration_seconds"], "3600");
    }

    #[test]
    fn what_an_alb_cannot_do_is_refused_with_the_reason() {
        let mut f = frontend();
        f.backends[0].pool.affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10),
        };
        f.backends[1].pool.health_check = HealthCheck::with_probe(Probe::Tcp { port: 30080 });
        let e = plan(&lb(), &f).unwrap_err();
        assert!(e.contains("client-IP affinity"), "{e}");
        assert!(e.contains("TCP health check"), "{e}");
    }

    #[test]
    fn https_serves_the_referenced_certificates_with_the_hostless_one_as_default() {
        let mut f = frontend();
        f.redirect_to_https = true;
        f.https = Some(HttpsListener {
            port: 443,
            certificates: vec![
                certificate(&["shop.example.com"], arn("shop")),
                certificate(
                    &["shop.example.com"],
                    CertificateSource::Pem {
                        chain: "-----BEGIN CERTIFICATE-----".into(),
                        key: "-----BEGIN PRIVATE KEY-----".into(),
                    },
                ),
                certificate(&[], arn("wildcard")),
            ],
            min_tls_version: TlsVersion::Tls13,
        });
        let plan = plan(&lb(), &f).unwrap();
        let https = plan.https.unwrap();
        assert_eq!(plan.redirect_to, Some(443));
        assert_eq!(https.certificates.len(), 2, "the PEM one is not uploaded");
        assert!(https.certificates[0].ends_with("/wildcard"));
        assert!(https.certificates[1].ends_with("/shop"));
        assert_eq!(https.ssl_policy, "ELBSecurityPolicy-TLS13-1-3-2021-06");
    }

    #[test]
    fn tls_with_only_secrets_is_refused_naming_where_alb_takes_certificates() {
        let mut f = frontend();
        f.https = Some(HttpsListener {
            port: 443,
            certificates: vec![certificate(
                &["shop.example.com"],
                CertificateSource::Pem {
                    chain: String::new(),
                    key: String::new(),
                },
            )],
            min_tls_version: TlsVersion::Tls12,
        });
        let e = plan(&lb(), &f).unwrap_err();
        assert!(e.contains("lb.portico.dev/certificates"), "{e}");
    }
}
