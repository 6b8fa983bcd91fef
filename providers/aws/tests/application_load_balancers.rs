//! The AWS provider against moto over the real SDK: Ingresses become application load
//! balancers (an HTTP target group per backend, listener rules in Ingress precedence, HTTPS
//! with ACM certificates chosen by SNI, a redirect), updates change only what differs,
//! deletion leaves nothing, and a reconcile killed between any two calls converges.

use std::collections::BTreeSet;

use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::types::{ActionTypeEnum, Rule};
use portico_aws::application::target_group_name;
use portico_aws::moto::Moto;
use portico_aws::{AwsProvider, AwsSettings};
use portico_provider::routing::{HostMatch, HostRoutes, PathMatch, PathRoute, RouteTable};
use portico_provider::*;

fn owner(uid: &str) -> Ownership {
    Ownership {
        cluster_id: "c1".into(),
        object_uid: uid.into(),
        object_ref: format!("Ingress/default/{uid}"),
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
                    provider_id: None,
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

fn route(path: PathMatch, backend: &str) -> PathRoute {
    PathRoute {
        path,
        backend: backend.into(),
    }
}

/// `shop.example.com`: `/api` (Prefix) to api, everything else to shop; other hosts to web.
fn shop(uid: &str) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: LoadBalancerName::for_object_uid(uid),
        owner: owner(uid),
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
                        route(PathMatch::prefix("/api"), "api-80"),
                        route(PathMatch::prefix("/"), "shop-80"),
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

fn acm(arn: &str, hosts: &[&str]) -> Certificate {
    Certificate {
        name: arn.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        source: CertificateSource::Reference { id: arn.into() },
    }
}

async fn provider(moto: &Moto, client: Client) -> AwsProvider {
    let (vpc, subnets) = moto.default_network().await;
    AwsProvider::new(
        client,
        AwsSettings {
            subnets,
            vpc_id: Some(vpc),
            ..AwsSettings::default()
        },
    )
}

/// What a listener does, in a form a test can compare: `(port, protocol, default, rules)`,
/// each rule as `"host path,path -> action"` in priority order.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    port: i32,
    protocol: String,
    default: String,
    rules: Vec<String>,
    certificates: Vec<String>,
}

async fn seen(client: &Client, name: &LoadBalancerName) -> Vec<Seen> {
    let lb = client
        .describe_load_balancers()
        .names(name.as_str())
        .send()
        .await
        .unwrap();
    let lb_arn = lb.load_balancers()[0].load_balancer_arn().unwrap();
    let groups = client.describe_target_groups().send().await.unwrap();
    let group_name = |arn: &str| {
        groups
            .target_groups()
            .iter()
            .find(|t| t.target_group_arn() == Some(arn))
            .and_then(|t| t.target_group_name())
            .unwrap_or("?")
            .to_string()
    };
    let action = |rule: &Rule| {
        let a = &rule.actions()[0];
        match a.r#type().unwrap() {
            ActionTypeEnum::Forward => group_name(a.target_group_arn().unwrap()),
            ActionTypeEnum::FixedResponse => a
                .fixed_response_config()
                .unwrap()
                .status_code()
                .unwrap()
                .to_string(),
            ActionTypeEnum::Redirect => {
                let r = a.redirect_config().unwrap();
                format!("redirect {}:{}", r.protocol().unwrap(), r.port().unwrap())
            }
            other => format!("{other:?}"),
        }
    };
    let listeners = client
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for l in listeners.listeners() {
        let rules = client
            .describe_rules()
            .listener_arn(l.listener_arn().unwrap())
            .send()
            .await
            .unwrap();
        let mut rules: Vec<&Rule> = rules.rules().iter().collect();
        rules.sort_by_key(|r| r.priority().unwrap().parse::<i32>().unwrap_or(i32::MAX));
        let default = rules
            .iter()
            .find(|r| r.is_default() == Some(true))
            .map(|r| action(r))
            .unwrap();
        let rules = rules
            .iter()
            .filter(|r| r.is_default() != Some(true))
            .map(|r| {
                let mut host = "*".to_string();
                let mut paths = "*".to_string();
                for c in r.conditions() {
                    match c.field().unwrap() {
                        "host-header" => {
                            host = c.host_header_config().unwrap().values().join(",");
                        }
                        "path-pattern" => {
                            paths = c.path_pattern_config().unwrap().values().join(",");
                        }
                        other => panic!("unexpected condition {other}"),
                    }
                }
                format!("{host} {paths} -> {}", action(r))
            })
            .collect();
        let certificates = if l.protocol().unwrap().as_str() == "HTTPS" {
            let c = client
                .describe_listener_certificates()
                .listener_arn(l.listener_arn().unwrap())
                .send()
                .await
                .unwrap();
            let mut arns: Vec<String> = c
                .certificates()
                .iter()
                .map(|c| {
                    let default = if c.is_default() == Some(true) {
                        " (default)"
                    } else {
                        ""
                    };
                    format!("{}{default}", c.certificate_arn().unwrap())
                })
                .collect();
            arns.sort();
            arns
        } else {
            vec![]
        };
        out.push(Seen {
            port: l.port().unwrap(),
            protocol: l.protocol().unwrap().as_str().to_string(),
            default,
            rules,
            certificates,
        });
    }
    out.sort_by_key(|s| s.port);
    out
}

async fn target_group_names(client: &Client) -> BTreeSet<String> {
    let groups = client.describe_target_groups().send().await.unwrap();
    groups
        .target_groups()
        .iter()
        .filter_map(|t| t.target_group_name().map(String::from))
        .collect()
}

async fn targets_of(client: &Client, group: &str) -> BTreeSet<(String, i32)> {
    let tg = client
        .describe_target_groups()
        .names(group)
        .send()
        .await
        .unwrap();
    let health = client
        .describe_target_health()
        .target_group_arn(tg.target_groups()[0].target_group_arn().unwrap())
        .send()
        .await
        .unwrap();
    health
        .target_health_descriptions()
        .iter()
        .map(|d| {
            let t = d.target().unwrap();
            (t.id().unwrap().to_string(), t.port().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ingress_becomes_an_application_load_balancer_routing_as_the_ingress_does() {
    let moto = Moto::start().await;
    let client = moto.client();
    let aws = provider(&moto, moto.client()).await;
    let spec = shop("7d2a-shop");
    let status = aws.ensure(&spec).await.unwrap();

    let lb = client
        .describe_load_balancers()
        .names(spec.name.as_str())
        .send()
        .await
        .unwrap();
    let lb = &lb.load_balancers()[0];
    assert_eq!(lb.r#type().unwrap().as_str(), "application");
    assert_eq!(
        status.addresses,
        vec![Address::Hostname(lb.dns_name().unwrap().to_string())],
        "the status carries the DNS name moto reports"
    );
    assert_eq!(
        status.ports,
        vec![PortStatus {
            protocol: Protocol::Tcp,
            port: 80,
            error: None
        }]
    );

    let tg = |b: &str| target_group_name(&spec.name, b);
    assert_eq!(
        seen(&client, &spec.name).await,
        vec![Seen {
            port: 80,
            protocol: "HTTP".into(),
            default: tg("web-80"),
            rules: vec![
                format!("shop.example.com /api,/api/* -> {}", tg("api-80")),
                format!("shop.example.com /* -> {}", tg("shop-80")),
                // What shop's paths miss never falls through to another host's rules.
                format!("shop.example.com * -> {}", tg("web-80")),
            ],
            certificates: vec![],
        }]
    );
    assert_eq!(
        targets_of(&client, &tg("api-80")).await,
        [("10.0.1.1".into(), 30081), ("10.0.1.2".into(), 30081)].into(),
        "each backend's group holds the nodes on its node port"
    );
    let groups = client
        .describe_target_groups()
        .names(tg("api-80"))
        .send()
        .await
        .unwrap();
    let api = &groups.target_groups()[0];
    assert_eq!(api.protocol().unwrap().as_str(), "HTTP");
    assert_eq!(api.health_check_port(), Some("30081"));
    assert_eq!(api.matcher().and_then(|m| m.http_code()), Some("200-299"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_reconcile_changes_nothing_and_an_update_changes_only_what_differs() {
    let moto = Moto::start().await;
    let client = moto.client();
    let (recording, calls) = moto.recording_client();
    let aws = provider(&moto, recording).await;
    let mut spec = shop("8e3b-shop");
    aws.ensure(&spec).await.unwrap();
    let first = calls.take();
    assert!(
        first.contains(&"CreateLoadBalancer".to_string()),
        "{first:?}"
    );

    aws.ensure(&spec).await.unwrap();
    assert_eq!(
        calls.take_changes(),
        Vec::<String>::new(),
        "the same Ingress again only reads"
    );

    // The api route goes (and with it its backend), a node joins web.
    let a = app(&mut spec);
    a.routes.hosts[0].paths.retain(|p| p.backend != "api-80");
    a.backends.retain(|b| b.name != "api-80");
    a.backends[1] = backend("web-80", 30080, &[1, 2, 3]);
    aws.ensure(&spec).await.unwrap();
    let mut changes = calls.take_changes();
    changes.sort();
    assert_eq!(
        changes,
        [
            "DeleteRule",
            "DeleteTargetGroup",
            "ModifyRule",
            "ModifyRule",
            "RegisterTargets",
        ],
        "rules 1 and 2 take the new rules 1 and 2, rule 3 goes, the api group goes, node 3 is \
         registered"
    );
    let tg = |b: &str| target_group_name(&spec.name, b);
    assert_eq!(
        seen(&client, &spec.name).await[0].rules,
        vec![
            format!("shop.example.com /* -> {}", tg("shop-80")),
            format!("shop.example.com * -> {}", tg("web-80")),
        ]
    );
    assert!(!target_group_names(&client).await.contains(&tg("api-80")));
    assert_eq!(targets_of(&client, &tg("web-80")).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_acm_certificates_by_sni_and_rotation_and_redirect_follow_the_spec() {
    let moto = Moto::start().await;
    let client = moto.client();
    let aws = provider(&moto, moto.client()).await;
    let shop_cert = moto.request_certificate("shop.example.com").await;
    let any_cert = moto.request_certificate("*.example.com").await;
    let renewed = moto.request_certificate("shop.example.com").await;

    let mut spec = shop("9f4c-shop");
    app(&mut spec).https = Some(HttpsListener {
        port: 443,
        certificates: vec![acm(&shop_cert, &["shop.example.com"]), acm(&any_cert, &[])],
        min_tls_version: TlsVersion::Tls12,
    });
    let status = aws.ensure(&spec).await.unwrap();
    assert_eq!(
        status.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [80, 443]
    );
    let listeners = seen(&client, &spec.name).await;
    assert_eq!(listeners.len(), 2);
    assert_eq!(listeners[1].protocol, "HTTPS");
    assert_eq!(
        listeners[1].rules, listeners[0].rules,
        "HTTPS routes as HTTP"
    );
    let mut want = vec![format!("{any_cert} (default)"), shop_cert.clone()];
    want.sort();
    assert_eq!(
        listeners[1].certificates, want,
        "the hostless certificate is the default, the other is chosen by SNI"
    );

    // Rotation: shop's certificate is replaced by its renewal; plain HTTP now redirects.
    let a = app(&mut spec);
    a.https.as_mut().unwrap().certificates[0] = acm(&renewed, &["shop.example.com"]);
    a.https.as_mut().unwrap().min_tls_version = TlsVersion::Tls13;
    a.redirect_to_https = true;
    aws.ensure(&spec).await.unwrap();
    let listeners = seen(&client, &spec.name).await;
    let mut want = vec![format!("{any_cert} (default)"), renewed.clone()];
    want.sort();
    assert_eq!(listeners[1].certificates, want);
    assert_eq!(listeners[0].default, "redirect HTTPS:443");
    assert_eq!(
        listeners[0].rules,
        Vec::<String>::new(),
        "HTTP only redirects"
    );
    assert_eq!(listeners[1].rules.len(), 3, "HTTPS still routes");
    let https = client
        .describe_listeners()
        .load_balancer_arn(
            client
                .describe_load_balancers()
                .names(spec.name.as_str())
                .send()
                .await
                .unwrap()
                .load_balancers()[0]
                .load_balancer_arn()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let https = https
        .listeners()
        .iter()
        .find(|l| l.port() == Some(443))
        .unwrap();
    assert_eq!(
        https.ssl_policy(),
        Some("ELBSecurityPolicy-TLS13-1-3-2021-06")
    );

    // TLS removed: the HTTPS listener goes, HTTP routes again.
    let a = app(&mut spec);
    a.https = None;
    a.redirect_to_https = false;
    aws.ensure(&spec).await.unwrap();
    let listeners = seen(&client, &spec.name).await;
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].rules.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_leaves_nothing_and_garbage_collection_lists_the_ingress() {
    let moto = Moto::start().await;
    let client = moto.client();
    let aws = provider(&moto, moto.client()).await;
    let spec = shop("0a5d-shop");
    aws.ensure(&spec).await.unwrap();

    let owned = aws.list_owned("c1").await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].owner, spec.owner);
    assert_eq!(owned[0].status.ports.len(), 1);

    aws.delete(&spec.name, &spec.owner).await.unwrap();
    assert!(aws.get(&spec.name).await.unwrap().is_none());
    assert_eq!(target_group_names(&client).await, BTreeSet::new());
    aws.delete(&spec.name, &spec.owner)
        .await
        .expect("deleting again is a no-op");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_killed_between_any_two_calls_converges_without_duplicates_or_leaks() {
    let moto = Moto::start().await;
    let client = moto.client();
    let aws = provider(&moto, moto.client()).await;
    let cert = moto.request_certificate("shop.example.com").await;
    let mut spec = shop("1b6e-shop");
    app(&mut spec).https = Some(HttpsListener {
        port: 443,
        certificates: vec![acm(&cert, &[])],
        min_tls_version: TlsVersion::Tls12,
    });

    // How many changes a reconcile from nothing makes, and what it leaves.
    let (recording, calls) = moto.recording_client();
    provider(&moto, recording)
        .await
        .ensure(&spec)
        .await
        .unwrap();
    let changes = calls.take_changes().len();
    let expected = seen(&client, &spec.name).await;
    let groups = target_group_names(&client).await;
    aws.delete(&spec.name, &spec.owner).await.unwrap();
    assert!(changes > 10, "{changes} changes");

    for killed_after in 0..changes {
        let killed = provider(&moto, moto.client_killed_after(killed_after)).await;
        assert!(
            killed.ensure(&spec).await.is_err(),
            "the reconcile killed after {killed_after} changes fails"
        );
        aws.ensure(&spec).await.unwrap_or_else(|e| {
            panic!("the next reconcile after {killed_after} changes completes: {e}")
        });
        assert_eq!(
            seen(&client, &spec.name).await,
            expected,
            "killed after {killed_after} changes"
        );
        assert_eq!(
            target_group_names(&client).await,
            groups,
            "no duplicate groups"
        );
        let lbs = client.describe_load_balancers().send().await.unwrap();
        assert_eq!(lbs.load_balancers().len(), 1, "one load balancer");

        aws.delete(&spec.name, &spec.owner).await.unwrap();
        assert_eq!(
            target_group_names(&client).await,
            BTreeSet::new(),
            "nothing leaks (killed after {killed_after} changes)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn source_ranges_are_refused_rather_than_left_open() {
    let moto = Moto::start().await;
    let aws = provider(&moto, moto.client()).await;
    let mut spec = shop("2c7f-shop");
    spec.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    let e = aws.ensure(&spec).await.unwrap_err();
    assert!(e.is_permanent(), "{e}");
    assert!(e.to_string().contains("source ranges"), "{e}");
    assert!(
        aws.get(&spec.name).await.unwrap().is_none(),
        "nothing created"
    );
}
