//! An Ingress's L7 load balancer as Compute Engine's global external Application load
//! balancer wants it, computed by pure code: per backend a health check, a backend service
//! and a zonal network endpoint group per zone (the nodes, as `instance, IP, node port`); a
//! URL map that reproduces Ingress v1 routing; certificates from the Secrets, named by their
//! content so a rotation is a new certificate swapped in, and an SSL policy for the lowest TLS
//! version; a firewall rule that lets Google's
//! front ends and health checkers reach the node ports.
//!
//! Routing: a host is a host rule (`*.example.com` as is; GCE's wildcard also matches deeper
//! names, where Ingress's matches one label), rules for any host are host `*`. In a path
//! matcher GCE takes the longest matching path; `Exact /x` is `/x`, `Prefix /x` is `/x` and
//! `/x/*`, `Prefix /` is `/*`, and where an `Exact` and a `Prefix` share a path the `Exact`
//! one keeps it. What a host's paths miss goes to the default backend, or answers 404 by a
//! fault-injection abort (URL maps have no fixed response).

use std::collections::{BTreeMap, BTreeSet};

use portico_provider::routing::{HostMatch, PathMatch, RouteTable};
use portico_provider::{
    ApplicationFrontend, Backend, CertificateSource, LoadBalancerName, Probe, SessionAffinity,
};

use crate::names;

/// Where Google's front ends and health checkers come from.
pub const FRONT_END_RANGES: [&str; 2] = ["130.211.0.0/22", "35.191.0.0/16"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplicationPlan {
    /// By backend name.
    pub backends: BTreeMap<String, BackendPlan>,
    pub url_map: UrlMapPlan,
    pub http_port: u16,
    /// Plain HTTP answers with a redirect to HTTPS instead of routing.
    pub redirect_to_https: bool,
    pub https: Option<HttpsPlan>,
    pub firewall: crate::network::FirewallPlan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsPlan {
    pub port: u16,
    /// Certificates Portico creates from PEM; the first is offered to clients without SNI.
    pub certificates: Vec<CertificatePlan>,
    /// Certificates the project already holds, by name (never created or deleted here).
    pub pre_shared: Vec<String>,
    /// The SSL policy's `minTlsVersion` (`TLS_1_2` or `TLS_1_3`) and `profile` (GCE takes
    /// TLS 1.3 as the minimum only with `RESTRICTED`).
    pub min_tls_version: &'static str,
    pub ssl_profile: &'static str,
}

#[derive(Clone, PartialEq, Eq)]
pub struct CertificatePlan {
    /// `<lb>-<hash of the PEM>`: a new certificate is a new name.
    pub name: String,
    pub chain: String,
    pub key: String,
}

impl std::fmt::Debug for CertificatePlan {
    // Keys never end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificatePlan")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    /// Of the backend service and its health check.
    pub name: String,
    pub health_check: HealthCheckPlan,
    /// `NONE`, `GENERATED_COOKIE` or `CLIENT_IP`.
    pub session_affinity: &'static str,
    pub affinity_cookie_ttl_sec: Option<i32>,
    pub timeout_sec: i32,
    pub draining_timeout_sec: i32,
    /// By zone.
    pub endpoint_groups: BTreeMap<String, EndpointGroupPlan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPlan {
    pub port: i32,
    pub request_path: String,
    pub check_interval_sec: i32,
    pub timeout_sec: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointGroupPlan {
    pub name: String,
    /// `(instance name, IP, port)`.
    pub endpoints: BTreeSet<(String, String, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Backend(String),
    NotFound,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlMapPlan {
    pub name: String,
    /// For hosts no host rule names.
    pub default: Route,
    pub host_rules: Vec<HostRulePlan>,
    pub path_matchers: Vec<PathMatcherPlan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRulePlan {
    pub hosts: Vec<String>,
    pub path_matcher: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMatcherPlan {
    pub name: String,
    pub default: Route,
    /// `(paths, backend)`; GCE picks the longest matching path.
    pub path_rules: Vec<(Vec<String>, String)>,
}

/// A name within `lb` for `what`: `<lb>-<7 hex>` (40 characters), stable while `what` is.
pub fn hashed_name(lb: &LoadBalancerName, what: &str) -> String {
    format!("{lb}-{}", portico_provider::naming::short_hash(what))
}

pub fn plan(
    lb: &LoadBalancerName,
    frontend: &ApplicationFrontend,
    source_ranges: &[ipnet::IpNet],
) -> Result<ApplicationPlan, String> {
    let mut problems = Vec::new();
    if !source_ranges.is_empty() {
        problems.push(
            "source ranges on an Application load balancer need a Cloud Armor policy, which the \
             gcp provider does not manage"
                .to_string(),
        );
    }
    let mut backends = BTreeMap::new();
    for b in &frontend.backends {
        match backend(lb, b, frontend) {
            Ok(plan) => {
                backends.insert(b.name.clone(), plan);
            }
            Err(p) => problems.push(p),
        }
    }
    let url_map = match url_map(lb, &frontend.routes) {
        Ok(m) => m,
        Err(p) => {
            problems.push(p);
            return Err(problems.join("; "));
        }
    };
    let https = frontend.https.as_ref().map(|https| {
        let mut certificates = Vec::new();
        let mut pre_shared = Vec::new();
        // The hostless certificate first: it is the one clients without SNI get.
        let mut ordered: Vec<_> = https.certificates.iter().collect();
        ordered.sort_by_key(|c| !c.hosts.is_empty());
        for c in ordered {
            match &c.source {
                CertificateSource::Pem { chain, key } => certificates.push(CertificatePlan {
                    name: hashed_name(lb, &format!("{chain}{key}")),
                    chain: chain.clone(),
                    key: key.clone(),
                }),
                CertificateSource::Reference { id } => pre_shared.push(id.clone()),
            }
        }
        certificates.dedup_by(|a, b| a.name == b.name);
        HttpsPlan {
            port: https.port,
            certificates,
            pre_shared,
            min_tls_version: match https.min_tls_version {
                portico_provider::TlsVersion::Tls12 => "TLS_1_2",
                portico_provider::TlsVersion::Tls13 => "TLS_1_3",
            },
            ssl_profile: match https.min_tls_version {
                portico_provider::TlsVersion::Tls12 => "MODERN",
                portico_provider::TlsVersion::Tls13 => "RESTRICTED",
            },
        }
    });
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let mut node_ports: Vec<String> = backends
        .values()
        .flat_map(|b| {
            b.endpoint_groups
                .values()
                .flat_map(|g| g.endpoints.iter().map(|e| e.2.to_string()))
                .chain([b.health_check.port.to_string()])
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    node_ports.sort();
    Ok(ApplicationPlan {
        url_map,
        http_port: frontend.http_port,
        redirect_to_https: frontend.redirect_to_https && https.is_some(),
        https,
        firewall: crate::network::FirewallPlan {
            name: names::health_check(lb),
            source_ranges: FRONT_END_RANGES.iter().map(|r| r.to_string()).collect(),
            allowed: [("tcp", node_ports)].into(),
        },
        backends,
    })
}

fn backend(
    lb: &LoadBalancerName,
    backend: &Backend,
    frontend: &ApplicationFrontend,
) -> Result<BackendPlan, String> {
    let pool = &backend.pool;
    let Probe::Http { port, path } = &pool.health_check.probe else {
        return Err(format!(
            "backend {:?}: TCP health checks are not kept on GCP's Application load balancer",
            backend.name
        ));
    };
    let (session_affinity, affinity_cookie_ttl_sec) = match &pool.affinity {
        SessionAffinity::None => ("NONE", None),
        SessionAffinity::ClientIp { .. } => ("CLIENT_IP", None),
        SessionAffinity::Cookie { ttl, .. } => (
            "GENERATED_COOKIE",
            Some(
                i32::try_from(ttl.as_secs())
                    .unwrap_or(i32::MAX)
                    .clamp(1, 1_209_600),
            ),
        ),
    };
    let secs =
        |d: std::time::Duration, max: i32| i32::try_from(d.as_secs()).unwrap_or(max).clamp(1, max);
    let hc = &pool.health_check;
    let interval = secs(hc.interval, 300);
    let threshold = |n: u32| i32::try_from(n).unwrap_or(10).clamp(1, 10);
    let name = hashed_name(lb, &backend.name);
    let mut endpoint_groups: BTreeMap<String, EndpointGroupPlan> = BTreeMap::new();
    for t in &pool.targets {
        // Nodes without a GCE instance cannot be endpoints; the Service controller's rule
        // (every node is a target) cannot hold here, and they are left out.
        let Some((zone, instance)) = t.provider_id.as_deref().and_then(zone_and_instance) else {
            continue;
        };
        endpoint_groups
            .entry(zone.clone())
            .or_insert_with(|| EndpointGroupPlan {
                name: format!("{name}-{zone}"),
                endpoints: BTreeSet::new(),
            })
            .endpoints
            .insert((instance, t.address.to_string(), t.port));
    }
    if endpoint_groups.is_empty() && !pool.targets.is_empty() {
        return Err(format!(
            "backend {:?}: no node has a Compute Engine instance (spec.providerID gce://project/zone/name)",
            backend.name
        ));
    }
    let timeouts = backend.timeouts.as_ref().unwrap_or(&frontend.timeouts);
    Ok(BackendPlan {
        name,
        health_check: HealthCheckPlan {
            port: i32::from(*port),
            request_path: path.clone(),
            check_interval_sec: interval,
            timeout_sec: secs(hc.timeout, 300).min(interval),
            healthy_threshold: threshold(hc.healthy_threshold),
            unhealthy_threshold: threshold(hc.unhealthy_threshold),
        },
        session_affinity,
        affinity_cookie_ttl_sec,
        timeout_sec: secs(timeouts.request, 86_400),
        draining_timeout_sec: pool.drain_timeout.map_or(300, |d| {
            i32::try_from(d.as_secs()).unwrap_or(3600).min(3600)
        }),
        endpoint_groups,
    })
}

/// `(zone, instance)` of a `gce://project/zone/instance` provider ID.
fn zone_and_instance(provider_id: &str) -> Option<(String, String)> {
    names::instance_link(provider_id)?;
    let mut parts = provider_id.strip_prefix("gce://")?.split('/').skip(1);
    Some((parts.next()?.to_string(), parts.next()?.to_string()))
}

fn url_map(lb: &LoadBalancerName, routes: &RouteTable) -> Result<UrlMapPlan, String> {
    let routes = routes.clone().normalized();
    let default = routes
        .default_backend
        .clone()
        .map_or(Route::NotFound, Route::Backend);
    let mut host_rules = Vec::new();
    let mut path_matchers = Vec::new();
    for (i, group) in routes.hosts.iter().enumerate() {
        let host = match &group.host {
            HostMatch::Any => "*".to_string(),
            HostMatch::Exact(h) => h.clone(),
            HostMatch::Wildcard(suffix) => format!("*.{suffix}"),
        };
        let matcher = format!("m{i}");
        let mut taken: BTreeSet<String> = BTreeSet::new();
        let mut path_rules = Vec::new();
        for route in &group.paths {
            let (PathMatch::Exact(p) | PathMatch::Prefix(p)) = &route.path;
            if p.contains(['*', '?', '#']) {
                return Err(format!(
                    "path {p:?} contains *, ? or #, which URL map paths do not take literally"
                ));
            }
            let paths = match &route.path {
                PathMatch::Exact(p) => vec![p.clone()],
                PathMatch::Prefix(p) if p == "/" => vec!["/*".to_string()],
                PathMatch::Prefix(p) => vec![p.clone(), format!("{p}/*")],
            };
            // In normalized order the rule that wins a shared path comes first.
            let paths: Vec<String> = paths
                .into_iter()
                .filter(|p| taken.insert(p.clone()))
                .collect();
            if !paths.is_empty() {
                path_rules.push((paths, route.backend.clone()));
            }
        }
        host_rules.push(HostRulePlan {
            hosts: vec![host],
            path_matcher: matcher.clone(),
        });
        path_matchers.push(PathMatcherPlan {
            name: matcher,
            default: default.clone(),
            path_rules,
        });
    }
    Ok(UrlMapPlan {
        name: names::base(lb),
        default,
        host_rules,
        path_matchers,
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

    /// What a URL map does: the exact host rule, else the longest wildcard, else `*`, else
    /// the map's default; in the matcher the longest matching path, else its default.
    fn gce(map: &UrlMapPlan, host: &str, path: &str) -> Option<String> {
        let rule = map
            .host_rules
            .iter()
            .find(|r| r.hosts.iter().any(|h| h == host))
            .or_else(|| {
                map.host_rules
                    .iter()
                    .filter(|r| {
                        r.hosts.iter().any(|h| {
                            h.strip_prefix("*.")
                                .is_some_and(|s| host.ends_with(&format!(".{s}")))
                        })
                    })
                    .max_by_key(|r| r.hosts[0].len())
            })
            .or_else(|| map.host_rules.iter().find(|r| r.hosts == ["*"]));
        let route = match rule {
            None => &map.default,
            Some(rule) => {
                let matcher = map
                    .path_matchers
                    .iter()
                    .find(|m| m.name == rule.path_matcher)
                    .unwrap();
                let best = matcher
                    .path_rules
                    .iter()
                    .flat_map(|(paths, b)| paths.iter().map(move |p| (p, b)))
                    .filter(|(p, _)| match p.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => path == *p,
                    })
                    .max_by_key(|(p, _)| p.len());
                return match best {
                    Some((_, b)) => Some(b.clone()),
                    None => match &matcher.default {
                        Route::Backend(b) => Some(b.clone()),
                        Route::NotFound => None,
                    },
                };
            }
        };
        match route {
            Route::Backend(b) => Some(b.clone()),
            Route::NotFound => None,
        }
    }

    #[test]
    fn the_url_map_routes_every_request_as_the_ingress_does() {
        for default in [None, Some("fallback")] {
            let routes = table(default);
            let map = url_map(&lb(), &routes).unwrap();
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
                        gce(&map, host, path),
                        ingress,
                        "{host}{path} with default {default:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_exact_path_keeps_the_path_a_prefix_shares_with_it() {
        let map = url_map(&lb(), &table(None)).unwrap();
        let shop = map
            .host_rules
            .iter()
            .find(|r| r.hosts == ["shop.example.com"])
            .unwrap();
        let matcher = map
            .path_matchers
            .iter()
            .find(|m| m.name == shop.path_matcher)
            .unwrap();
        let rules: Vec<(Vec<&str>, &str)> = matcher
            .path_rules
            .iter()
            .map(|(p, b)| (p.iter().map(String::as_str).collect(), b.as_str()))
            .collect();
        assert!(rules.contains(&(vec!["/api"], "api-exact")), "{rules:?}");
        assert!(rules.contains(&(vec!["/api/*"], "api")), "{rules:?}");
        assert!(
            rules.contains(&(vec!["/api/v2", "/api/v2/*"], "api-v2")),
            "{rules:?}"
        );
        assert_eq!(matcher.default, Route::NotFound);
    }

    fn backend(name: &str, zones: &[&str]) -> Backend {
        Backend {
            name: name.into(),
            pool: TargetPool {
                targets: zones
                    .iter()
                    .enumerate()
                    .map(|(i, zone)| Target {
                        node: format!("node-{i}"),
                        address: format!("10.0.0.{}", i + 1).parse().unwrap(),
                        port: 30080,
                        provider_id: Some(format!("gce://shop/{zone}/node-{i}")),
                    })
                    .collect(),
                health_check: HealthCheck::with_probe(Probe::Http {
                    port: 30080,
                    path: "/".into(),
                }),
                affinity: SessionAffinity::Cookie {
                    name: "PORTICO_AFFINITY".into(),
                    ttl: Duration::from_secs(3600),
                },
                proxy_protocol: false,
                preserve_client_ip: false,
                drain_timeout: Some(Duration::from_secs(30)),
            },
            timeouts: None,
        }
    }

    fn frontend() -> ApplicationFrontend {
        ApplicationFrontend {
            http_port: 80,
            https: None,
            redirect_to_https: false,
            routes: RouteTable {
                hosts: vec![],
                default_backend: Some("web-80".into()),
            },
            backends: vec![backend(
                "web-80",
                &["europe-west1-b", "europe-west1-c", "europe-west1-b"],
            )],
            timeouts: HttpTimeouts::default(),
        }
    }

    #[test]
    fn a_backend_is_a_service_over_one_endpoint_group_per_zone_of_nodes_on_the_node_port() {
        let plan = plan(&lb(), &frontend(), &[]).unwrap();
        let web = &plan.backends["web-80"];
        assert_eq!(web.endpoint_groups.len(), 2, "two zones");
        let b = &web.endpoint_groups["europe-west1-b"];
        assert_eq!(
            b.endpoints,
            [
                ("node-0".into(), "10.0.0.1".into(), 30080),
                ("node-2".into(), "10.0.0.3".into(), 30080)
            ]
            .into()
        );
        assert!(b.name.len() <= 63, "{}", b.name);
        assert_eq!(web.session_affinity, "GENERATED_COOKIE");
        assert_eq!(web.affinity_cookie_ttl_sec, Some(3600));
        assert_eq!(web.draining_timeout_sec, 30);
        assert_eq!(web.timeout_sec, 60);
        assert_eq!(plan.firewall.allowed["tcp"], ["30080"]);
        assert_eq!(plan.url_map.default, Route::Backend("web-80".into()));
    }

    #[test]
    fn certificates_are_named_by_content_so_a_rotation_is_a_new_certificate() {
        let pem = |n: &str| CertificateSource::Pem {
            chain: format!("-----BEGIN CERTIFICATE-----{n}"),
            key: "-----BEGIN PRIVATE KEY-----".into(),
        };
        let mut f = frontend();
        f.https = Some(HttpsListener {
            port: 443,
            certificates: vec![
                Certificate {
                    name: "ns/shop".into(),
                    hosts: vec!["shop.example.com".into()],
                    source: pem("1"),
                },
                Certificate {
                    name: "ns/any".into(),
                    hosts: vec![],
                    source: pem("2"),
                },
                Certificate {
                    name: "held".into(),
                    hosts: vec![],
                    source: CertificateSource::Reference {
                        id: "shop-cert".into(),
                    },
                },
            ],
            min_tls_version: Default::default(),
        });
        let first = plan(&lb(), &f, &[]).unwrap().https.unwrap();
        assert_eq!(first.pre_shared, ["shop-cert"]);
        assert_eq!(
            (first.min_tls_version, first.ssl_profile),
            ("TLS_1_2", "MODERN")
        );
        assert_eq!(
            first.certificates[0].name,
            hashed_name(
                &lb(),
                "-----BEGIN CERTIFICATE-----2-----BEGIN PRIVATE KEY-----"
            ),
            "the hostless one first"
        );
        if let Some(h) = &mut f.https {
            h.certificates[0].source = pem("rotated");
        }
        let rotated = plan(&lb(), &f, &[]).unwrap().https.unwrap();
        assert_ne!(rotated.certificates[1].name, first.certificates[1].name);
        assert_eq!(rotated.certificates[0].name, first.certificates[0].name);
    }

    #[test]
    fn what_gcp_cannot_do_here_is_refused_with_the_reason() {
        let mut f = frontend();
        f.backends[0].pool.health_check = HealthCheck::with_probe(Probe::Tcp { port: 1 });
        let e = plan(&lb(), &f, &["192.0.2.0/24".parse().unwrap()]).unwrap_err();
        assert!(e.contains("TCP health checks"), "{e}");
        assert!(e.contains("Cloud Armor"), "{e}");
    }
}
