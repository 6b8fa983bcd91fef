//! The GCP provider's Application load balancers against the fake Compute Engine API over
//! the real client crate: an Ingress becomes a global address, backend services over zonal
//! endpoint groups, a URL map, proxies and forwarding rules; updates change only what
//! differs; certificates rotate by swapping; deletion leaves nothing; and a reconcile killed
//! between any two calls converges.

use portico_gcp::application::hashed_name;
use portico_gcp::fake::FakeCompute;
use portico_gcp::{GcpProvider, GcpSettings};
use portico_provider::routing::{HostMatch, HostRoutes, PathMatch, PathRoute, RouteTable};
use portico_provider::*;
use serde_json::{Value, json};

const PROJECT: &str = "shop-prod";

fn settings(fake: &FakeCompute) -> GcpSettings {
    GcpSettings {
        project: PROJECT.into(),
        region: "europe-west1".into(),
        network: "default".into(),
        network_tier: "PREMIUM".into(),
        node_tags: vec![],
        endpoint_url: Some(fake.url()),
    }
}

fn backend(name: &str, node_port: u16, nodes: &[u8]) -> Backend {
    Backend {
        name: name.into(),
        pool: TargetPool {
            targets: nodes
                .iter()
                .map(|k| Target {
                    node: format!("node-{k}"),
                    address: format!("10.0.1.{k}").parse().unwrap(),
                    port: node_port,
                    provider_id: Some(format!(
                        "gce://{PROJECT}/europe-west1-{}/node-{k}",
                        if k % 2 == 0 { "c" } else { "b" }
                    )),
                })
                .collect(),
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

fn shop(uid: &str) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: LoadBalancerName::for_object_uid(uid),
        owner: Ownership {
            cluster_id: "c1".into(),
            object_uid: uid.into(),
            object_ref: format!("Ingress/default/{uid}"),
        },
        requested_address: None,
        requested_address_name: None,
        source_ranges: vec![],
        frontend: Frontend::Application(ApplicationFrontend {
            http_port: 80,
            https: None,
            redirect_to_https: false,
            routes: RouteTable {
                hosts: vec![HostRoutes {
                    host: HostMatch::parse(Some("shop.example.com")),
                    paths: vec![
                        PathRoute {
                            path: PathMatch::prefix("/api"),
                            backend: "api-80".into(),
                        },
                        PathRoute {
                            path: PathMatch::prefix("/"),
                            backend: "shop-80".into(),
                        },
                    ],
                }],
                default_backend: Some("web-80".into()),
            }
            .normalized(),
            backends: vec![
                backend("api-80", 30081, &[1, 2]),
                backend("shop-80", 30082, &[1, 2]),
                backend("web-80", 30080, &[1, 2]),
            ],
            timeouts: HttpTimeouts::default(),
        }),
    }
}

fn app(spec: &mut LoadBalancerSpec) -> &mut ApplicationFrontend {
    match &mut spec.frontend {
        Frontend::Application(a) => a,
        Frontend::Network(_) => unreachable!(),
    }
}

fn pem(n: &str) -> Certificate {
    Certificate {
        name: format!("default/{n}"),
        hosts: vec![],
        source: CertificateSource::Pem {
            chain: format!("-----BEGIN CERTIFICATE-----{n}"),
            key: "-----BEGIN PRIVATE KEY-----".into(),
        },
    }
}

fn global(fake: &FakeCompute, collection: &str, name: &str) -> Option<Value> {
    fake.resource(PROJECT, &format!("global/{collection}"), name)
}

fn ends(link: &Value, tail: &str) -> bool {
    link.as_str().is_some_and(|l| l.ends_with(tail))
}

#[tokio::test]
async fn an_ingress_becomes_backend_services_a_url_map_a_proxy_and_a_forwarding_rule() {
    let fake = FakeCompute::start(1).await;
    let gcp = GcpProvider::new(settings(&fake));
    let spec = shop("2b7c-shop");
    let status = gcp.ensure(&spec).await.unwrap();
    let lb = spec.name.as_str();

    let address = global(&fake, "addresses", lb).expect("a global address");
    assert_eq!(
        status.addresses,
        vec![Address::Ip(
            address["address"].as_str().unwrap().parse().unwrap()
        )]
    );
    let api = hashed_name(&spec.name, "api-80");
    let service = global(&fake, "backendServices", &api).expect("a backend service per backend");
    assert_eq!(service["loadBalancingScheme"], "EXTERNAL_MANAGED");
    assert!(ends(
        &service["healthChecks"][0],
        &format!("/healthChecks/{api}")
    ));
    let groups: Vec<&str> = service["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["group"].as_str().unwrap())
        .collect();
    assert_eq!(groups.len(), 2, "one endpoint group per zone: {groups:?}");
    let check = global(&fake, "healthChecks", &api).unwrap();
    assert_eq!(check["httpHealthCheck"]["port"], 30081);
    assert!(
        fake.resource(
            PROJECT,
            "zones/europe-west1-b/networkEndpointGroups",
            &format!("{api}-europe-west1-b")
        )
        .is_some()
    );

    let map = global(&fake, "urlMaps", lb).expect("a URL map");
    assert!(ends(
        &map["defaultService"],
        &format!("/backendServices/{}", hashed_name(&spec.name, "web-80"))
    ));
    assert_eq!(
        map["hostRules"],
        json!([{"hosts": ["shop.example.com"], "pathMatcher": "m0"}])
    );
    let rules = &map["pathMatchers"][0]["pathRules"];
    assert_eq!(rules[0]["paths"], json!(["/api", "/api/*"]));
    assert!(ends(&rules[0]["service"], &api));
    assert_eq!(rules[1]["paths"], json!(["/*"]));

    let proxy = global(&fake, "targetHttpProxies", lb).unwrap();
    assert!(ends(&proxy["urlMap"], &format!("/urlMaps/{lb}")));
    let rule = global(&fake, "forwardingRules", &format!("{lb}-http")).unwrap();
    assert_eq!(rule["portRange"], "80");
    assert_eq!(rule["IPAddress"], address["address"]);
    assert_eq!(
        gcp.get(&spec.name).await.unwrap().map(|o| o.status),
        Some(status)
    );
}

#[tokio::test]
async fn a_repeat_changes_nothing_and_updates_change_only_what_differs() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut spec = shop("3c8d-shop");
    gcp.ensure(&spec).await.unwrap();
    fake.take_changes();
    gcp.ensure(&spec).await.unwrap();
    assert_eq!(
        fake.take_changes(),
        Vec::<String>::new(),
        "the same Ingress only reads"
    );

    // A node joins web's zone b.
    app(&mut spec).backends[2] = backend("web-80", 30080, &[1, 2, 3]);
    gcp.ensure(&spec).await.unwrap();
    assert_eq!(
        fake.take_changes(),
        ["POST networkEndpointGroups/attachNetworkEndpoints"]
    );

    // The api route goes: the URL map is updated, then api's service, groups and check go.
    let a = app(&mut spec);
    a.routes.hosts[0].paths.retain(|p| p.backend != "api-80");
    a.backends.retain(|b| b.name != "api-80");
    gcp.ensure(&spec).await.unwrap();
    let changes = fake.take_changes();
    let at = |c: &str| changes.iter().position(|x| x == c);
    assert!(
        at("PUT urlMaps").is_some() && at("PUT urlMaps") < at("DELETE backendServices"),
        "the URL map lets go of api before api's service goes: {changes:?}"
    );
    assert!(
        changes.contains(&"PATCH firewalls".to_string()),
        "api's node port closes"
    );
    let api = hashed_name(&spec.name, "api-80");
    assert!(global(&fake, "backendServices", &api).is_none());
    assert!(global(&fake, "healthChecks", &api).is_none());
    assert!(
        fake.names(PROJECT, "zones/europe-west1-b/networkEndpointGroups")
            .iter()
            .all(|n| !n.starts_with(&api))
    );
}

#[tokio::test]
async fn certificates_rotate_by_swapping_and_plain_http_can_redirect() {
    let fake = FakeCompute::start(1).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut spec = shop("4d9e-shop");
    app(&mut spec).https = Some(HttpsListener {
        port: 443,
        certificates: vec![pem("v1")],
        min_tls_version: TlsVersion::Tls12,
    });
    let status = gcp.ensure(&spec).await.unwrap();
    assert_eq!(
        status.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [80, 443]
    );
    let lb = spec.name.to_string();
    let lb = lb.as_str();
    let v1 = fake.names(PROJECT, "global/sslCertificates");
    assert_eq!(v1.len(), 1);
    let proxy = global(&fake, "targetHttpsProxies", lb).unwrap();
    assert!(ends(&proxy["sslCertificates"][0], &v1[0]));
    assert!(ends(&proxy["sslPolicy"], &format!("/sslPolicies/{lb}")));
    let policy = global(&fake, "sslPolicies", lb).unwrap();
    assert_eq!(policy["minTlsVersion"], "TLS_1_2");
    assert!(global(&fake, "forwardingRules", &format!("{lb}-https")).is_some());

    // Rotation: a new certificate, swapped in, the old one deleted; HTTP now redirects.
    let a = app(&mut spec);
    a.https.as_mut().unwrap().certificates = vec![pem("v2")];
    a.https.as_mut().unwrap().min_tls_version = TlsVersion::Tls13;
    a.redirect_to_https = true;
    gcp.ensure(&spec).await.unwrap();
    let v2 = fake.names(PROJECT, "global/sslCertificates");
    assert_eq!(v2.len(), 1, "the old certificate is gone");
    assert_ne!(v2, v1);
    let proxy = global(&fake, "targetHttpsProxies", lb).unwrap();
    assert!(ends(&proxy["sslCertificates"][0], &v2[0]));
    assert_eq!(
        global(&fake, "sslPolicies", lb).unwrap()["minTlsVersion"],
        "TLS_1_3",
        "the lowest TLS version follows the policy"
    );
    let http = global(&fake, "targetHttpProxies", lb).unwrap();
    assert!(ends(&http["urlMap"], &format!("/urlMaps/{lb}-redirect")));
    let redirect = global(&fake, "urlMaps", &format!("{lb}-redirect")).unwrap();
    assert_eq!(redirect["defaultUrlRedirect"]["httpsRedirect"], true);

    // TLS and the redirect removed: HTTPS goes, HTTP routes again.
    let a = app(&mut spec);
    a.https = None;
    a.redirect_to_https = false;
    gcp.ensure(&spec).await.unwrap();
    assert!(fake.names(PROJECT, "global/sslCertificates").is_empty());
    assert!(global(&fake, "targetHttpsProxies", lb).is_none());
    assert!(global(&fake, "sslPolicies", lb).is_none());
    assert!(global(&fake, "urlMaps", &format!("{lb}-redirect")).is_none());
    let http = global(&fake, "targetHttpProxies", lb).unwrap();
    assert!(ends(&http["urlMap"], &format!("/urlMaps/{lb}")));
}

#[tokio::test]
async fn a_named_static_address_is_served_on_and_never_released() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    fake.put(
        PROJECT,
        "global/addresses",
        json!({"name": "shop-ip", "address": "203.0.113.9", "description": "reserved by hand"}),
    );
    let mut spec = shop("8a2b-shop");
    spec.requested_address_name = Some("shop-ip".into());
    let status = gcp.ensure(&spec).await.unwrap();
    assert_eq!(
        status.addresses,
        vec![Address::Ip("203.0.113.9".parse().unwrap())]
    );
    let rule = global(&fake, "forwardingRules", &format!("{}-http", spec.name)).unwrap();
    assert_eq!(rule["IPAddress"], "203.0.113.9");
    assert_eq!(
        fake.names(PROJECT, "global/addresses"),
        ["shop-ip"],
        "none reserved"
    );
    gcp.delete(&spec.name, &spec.owner).await.unwrap();
    assert_eq!(fake.count(), 1, "the user's address stays");

    spec.requested_address_name = Some("missing-ip".into());
    let e = gcp.ensure(&spec).await.unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("missing-ip"),
        "{e}"
    );
}

#[tokio::test]
async fn delete_leaves_nothing_and_garbage_collection_lists_the_ingress() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut spec = shop("5e0f-shop");
    app(&mut spec).https = Some(HttpsListener {
        port: 443,
        certificates: vec![pem("v1")],
        min_tls_version: TlsVersion::Tls12,
    });
    app(&mut spec).redirect_to_https = true;
    gcp.ensure(&spec).await.unwrap();
    let owned = gcp.list_owned("c1").await.unwrap();
    assert_eq!(
        owned.iter().map(|o| &o.name).collect::<Vec<_>>(),
        [&spec.name]
    );
    gcp.delete(&spec.name, &spec.owner).await.unwrap();
    assert_eq!(fake.count(), 0, "nothing is left behind");
    assert!(gcp.get(&spec.name).await.unwrap().is_none());
}

#[tokio::test]
async fn a_reconcile_killed_between_any_two_calls_converges_without_duplicates_or_leaks() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut spec = shop("6f1a-shop");
    app(&mut spec).https = Some(HttpsListener {
        port: 443,
        certificates: vec![pem("v1")],
        min_tls_version: TlsVersion::Tls12,
    });
    gcp.ensure(&spec).await.unwrap();
    let made = fake.take_changes();
    let changes = made.len();
    let held = fake.count();
    let expected = gcp.get(&spec.name).await.unwrap().unwrap().status.ports;
    gcp.delete(&spec.name, &spec.owner).await.unwrap();
    assert_eq!(fake.count(), 0);
    assert!(changes > 20, "{changes} changes");

    for killed_after in 0..changes {
        fake.kill_after(Some(killed_after));
        assert!(
            gcp.ensure(&spec).await.is_err(),
            "killed after {killed_after} of {made:?}"
        );
        fake.kill_after(None);
        let status = gcp.ensure(&spec).await.unwrap_or_else(|e| {
            panic!("the next reconcile after {killed_after} changes completes: {e}")
        });
        assert_eq!(status.ports, expected);
        assert_eq!(
            fake.count(),
            held,
            "no duplicates (killed after {killed_after})"
        );
        gcp.delete(&spec.name, &spec.owner).await.unwrap();
        assert_eq!(
            fake.count(),
            0,
            "nothing leaks (killed after {killed_after})"
        );
    }
}
