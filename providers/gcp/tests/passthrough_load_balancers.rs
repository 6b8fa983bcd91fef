//! The GCP provider against the fake Compute Engine API over the real client crate: Services
//! become external passthrough load balancers, updates change only what differs, deletion
//! goes in dependency order and leaves nothing, another owner's resources are never adopted,
//! operations are awaited within a bound, and a reconcile killed between any two calls
//! converges.

use std::time::Duration;

use portico_gcp::fake::FakeCompute;
use portico_gcp::{GcpProvider, GcpSettings};
use portico_provider::*;
use serde_json::json;

const PROJECT: &str = "shop-prod";
const REGION: &str = "europe-west1";

fn settings(fake: &FakeCompute) -> GcpSettings {
    GcpSettings {
        project: PROJECT.into(),
        region: REGION.into(),
        network: "default".into(),
        network_tier: "PREMIUM".into(),
        node_tags: vec!["shop-nodes".into()],
        endpoint_url: Some(fake.url()),
    }
}

fn owner(cluster: &str, uid: &str) -> Ownership {
    Ownership {
        cluster_id: cluster.into(),
        object_uid: uid.into(),
        object_ref: format!("Service/default/{uid}"),
    }
}

fn pool(nodes: &[u8]) -> TargetPool {
    TargetPool {
        targets: nodes
            .iter()
            .map(|k| Target {
                node: format!("node-{k}"),
                address: format!("10.0.1.{k}").parse().unwrap(),
                port: 30080,
                provider_id: Some(format!("gce://{PROJECT}/europe-west1-b/node-{k}")),
            })
            .collect(),
        health_check: HealthCheck::with_probe(Probe::Http {
            port: 10256,
            path: "/healthz".into(),
        }),
        affinity: SessionAffinity::None,
        proxy_protocol: false,
        preserve_client_ip: false,
        drain_timeout: None,
    }
}

fn listener(protocol: Protocol, port: u16, nodes: &[u8]) -> Listener {
    Listener {
        name: format!("{protocol}-{port}"),
        protocol,
        port,
        pool: pool(nodes),
    }
}

fn spec(uid: &str, owner: Ownership, listeners: Vec<Listener>) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: LoadBalancerName::for_object_uid(uid),
        owner,
        requested_address: None,
        requested_address_name: None,
        source_ranges: vec![],
        frontend: Frontend::Network(NetworkFrontend { listeners }),
    }
}

fn listeners(spec: &mut LoadBalancerSpec) -> &mut Vec<Listener> {
    match &mut spec.frontend {
        Frontend::Network(n) => &mut n.listeners,
        Frontend::Application(_) => unreachable!(),
    }
}

fn instance(k: u8) -> String {
    format!(
        "https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/europe-west1-b/instances/node-{k}"
    )
}

fn regional(collection: &str) -> String {
    format!("regions/{REGION}/{collection}")
}

#[tokio::test]
async fn a_service_becomes_an_address_target_pool_forwarding_rules_and_firewall_rules() {
    let fake = FakeCompute::start(2).await;
    let gcp = GcpProvider::new(settings(&fake));
    let web = spec(
        "3d9a-web",
        owner("c1", "3d9a-web"),
        vec![
            listener(Protocol::Tcp, 80, &[1, 2]),
            listener(Protocol::Udp, 53, &[1, 2]),
        ],
    );
    let status = gcp.ensure(&web).await.unwrap();
    let lb = web.name.as_str();

    let address = fake
        .resource(PROJECT, &regional("addresses"), lb)
        .expect("a reserved address");
    let ip = address["address"].as_str().unwrap();
    assert_eq!(
        status.addresses,
        vec![Address::Ip(ip.parse().unwrap())],
        "the status carries the reserved IP"
    );
    assert_eq!(
        status
            .ports
            .iter()
            .map(|p| (p.protocol, p.port))
            .collect::<Vec<_>>(),
        [(Protocol::Tcp, 80), (Protocol::Udp, 53)]
    );

    let pool = fake
        .resource(PROJECT, &regional("targetPools"), lb)
        .unwrap();
    assert_eq!(pool["instances"], json!([instance(1), instance(2)]));
    assert_eq!(pool["sessionAffinity"], "NONE");
    let hc = fake
        .resource(PROJECT, "global/httpHealthChecks", &format!("{lb}-hc"))
        .unwrap();
    assert_eq!(
        (hc["port"].as_i64(), hc["requestPath"].as_str()),
        (Some(10256), Some("/healthz"))
    );
    assert!(
        pool["healthChecks"][0]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{lb}-hc"))
    );

    let tcp = fake
        .resource(PROJECT, &regional("forwardingRules"), &format!("{lb}-tcp"))
        .unwrap();
    assert_eq!(tcp["IPAddress"], ip);
    assert_eq!(tcp["IPProtocol"], "TCP");
    assert_eq!(tcp["ports"], json!(["80"]));
    assert_eq!(tcp["loadBalancingScheme"], "EXTERNAL");
    assert!(
        tcp["target"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/targetPools/{lb}"))
    );
    let udp = fake
        .resource(PROJECT, &regional("forwardingRules"), &format!("{lb}-udp"))
        .unwrap();
    assert_eq!(udp["IPAddress"], ip, "both protocols on one address");

    let clients = fake.resource(PROJECT, "global/firewalls", lb).unwrap();
    assert_eq!(clients["sourceRanges"], json!(["0.0.0.0/0"]));
    assert_eq!(clients["targetTags"], json!(["shop-nodes"]));
    assert_eq!(
        clients["allowed"],
        json!([{"IPProtocol": "tcp", "ports": ["80"]}, {"IPProtocol": "udp", "ports": ["53"]}])
    );
    let checkers = fake
        .resource(PROJECT, "global/firewalls", &format!("{lb}-hc"))
        .unwrap();
    assert_eq!(
        checkers["allowed"],
        json!([{"IPProtocol": "tcp", "ports": ["10256"]}])
    );
    assert!(
        checkers["sourceRanges"]
            .as_array()
            .unwrap()
            .contains(&json!("35.191.0.0/16"))
    );
    assert_eq!(
        gcp.get(&web.name).await.unwrap().map(|o| o.status),
        Some(status),
        "what get observes is what ensure reported"
    );
}

#[tokio::test]
async fn a_repeat_changes_nothing_and_updates_change_only_what_differs() {
    let fake = FakeCompute::start(1).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut web = spec(
        "4e0b-web",
        owner("c1", "4e0b-web"),
        vec![listener(Protocol::Tcp, 80, &[1, 2])],
    );
    gcp.ensure(&web).await.unwrap();
    fake.take_changes();
    gcp.ensure(&web).await.unwrap();
    assert_eq!(
        fake.take_changes(),
        Vec::<String>::new(),
        "the same spec only reads"
    );

    // Node 3 joins, node 1 leaves.
    for l in listeners(&mut web) {
        l.pool = pool(&[2, 3]);
    }
    gcp.ensure(&web).await.unwrap();
    assert_eq!(
        fake.take_changes(),
        [
            "POST targetPools/addInstance",
            "POST targetPools/removeInstance"
        ]
    );
    let lb = web.name.to_string();
    let lb = lb.as_str();
    let tp = fake
        .resource(PROJECT, &regional("targetPools"), lb)
        .unwrap();
    assert_eq!(tp["instances"], json!([instance(2), instance(3)]));

    // A port joins: the TCP rule (immutable) is replaced, the firewall patched.
    listeners(&mut web).push(listener(Protocol::Tcp, 443, &[2, 3]));
    let status = gcp.ensure(&web).await.unwrap();
    assert_eq!(
        fake.take_changes(),
        [
            "DELETE forwardingRules",
            "POST forwardingRules",
            "PATCH firewalls"
        ]
    );
    assert_eq!(status.ports.len(), 2);
    let tcp = fake
        .resource(PROJECT, &regional("forwardingRules"), &format!("{lb}-tcp"))
        .unwrap();
    assert_eq!(tcp["ports"], json!(["80", "443"]));

    // ClientIP affinity cannot be changed on a pool: rules, then the pool, are recreated,
    // on the same address.
    let ip = status.addresses.clone();
    for l in listeners(&mut web) {
        l.pool.affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10800),
        };
    }
    let status = gcp.ensure(&web).await.unwrap();
    assert_eq!(status.addresses, ip, "the address stays");
    let tp = fake
        .resource(PROJECT, &regional("targetPools"), lb)
        .unwrap();
    assert_eq!(tp["sessionAffinity"], "CLIENT_IP");
}

#[tokio::test]
async fn delete_goes_in_dependency_order_and_garbage_collection_lists_only_this_clusters() {
    let fake = FakeCompute::start(1).await;
    let gcp = GcpProvider::new(settings(&fake));
    let web = spec(
        "5f1c-web",
        owner("c1", "5f1c-web"),
        vec![listener(Protocol::Tcp, 80, &[1])],
    );
    let other = spec(
        "6a2d-web",
        owner("c2", "6a2d-web"),
        vec![listener(Protocol::Tcp, 80, &[1])],
    );
    gcp.ensure(&web).await.unwrap();
    gcp.ensure(&other).await.unwrap();

    let owned = gcp.list_owned("c1").await.unwrap();
    assert_eq!(
        owned.iter().map(|o| &o.name).collect::<Vec<_>>(),
        [&web.name]
    );
    gcp.delete(&web.name, &web.owner).await.unwrap();
    gcp.delete(&other.name, &other.owner).await.unwrap();
    assert_eq!(fake.count(), 0, "nothing is left behind");
    assert!(gcp.get(&web.name).await.unwrap().is_none());
    gcp.delete(&web.name, &web.owner)
        .await
        .expect("deleting again is a no-op");
}

#[tokio::test]
async fn another_owners_resources_are_never_adopted_or_deleted() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let web = spec(
        "7b3e-web",
        owner("c1", "7b3e-web"),
        vec![listener(Protocol::Tcp, 80, &[1])],
    );
    fake.put(
        PROJECT,
        &regional("targetPools"),
        json!({"name": web.name.as_str(), "description": "made by hand", "instances": []}),
    );
    let e = gcp.ensure(&web).await.unwrap_err();
    assert!(matches!(e, ProviderError::NotOwned { .. }), "{e}");
    let e = gcp.delete(&web.name, &web.owner).await.unwrap_err();
    assert!(matches!(e, ProviderError::NotOwned { .. }), "{e}");
    assert_eq!(fake.count(), 1, "only the foreign pool, untouched");
    assert!(
        gcp.get(&web.name).await.unwrap().is_none(),
        "not ours to report"
    );
}

#[tokio::test]
async fn a_requested_address_is_used_not_reserved() {
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let mut web = spec(
        "8c4f-web",
        owner("c1", "8c4f-web"),
        vec![listener(Protocol::Tcp, 80, &[1])],
    );
    web.requested_address = Some("203.0.113.7".parse().unwrap());
    let status = gcp.ensure(&web).await.unwrap();
    assert_eq!(
        status.addresses,
        vec![Address::Ip("203.0.113.7".parse().unwrap())]
    );
    assert!(fake.names(PROJECT, &regional("addresses")).is_empty());
    gcp.delete(&web.name, &web.owner).await.unwrap();
    assert_eq!(fake.count(), 0);
}

#[tokio::test]
async fn operations_are_awaited_within_a_bound_and_errors_map_to_retry_or_exhaustion() {
    // Operations that never finish: the reconcile hands over instead of waiting forever.
    let slow = FakeCompute::start(u32::MAX).await;
    let gcp = GcpProvider::new(settings(&slow)).with_operation_timeout(Duration::from_millis(500));
    let web = spec(
        "9d5a-web",
        owner("c1", "9d5a-web"),
        vec![listener(Protocol::Tcp, 80, &[1])],
    );
    let e = gcp.ensure(&web).await.unwrap_err();
    assert!(
        e.retry_after().is_some(),
        "still running is retry later: {e}"
    );

    let fake = FakeCompute::start(1).await;
    let gcp = GcpProvider::new(settings(&fake));
    fake.fail_next("addresses", 403, "rateLimitExceeded");
    let e = gcp.ensure(&web).await.unwrap_err();
    assert!(
        e.retry_after().is_some(),
        "rate limited is retry later: {e}"
    );
    fake.fail_next("forwardingRules", 403, "quotaExceeded");
    let e = gcp.ensure(&web).await.unwrap_err();
    assert!(matches!(e, ProviderError::Exhausted(_)), "{e}");
    gcp.ensure(&web).await.expect("and then it converges");
}

#[tokio::test]
async fn a_reconcile_killed_between_any_two_calls_converges_without_duplicates_or_leaks() {
    // Operations finish at once here: waiting is covered above, the kill points are the point.
    let fake = FakeCompute::start(0).await;
    let gcp = GcpProvider::new(settings(&fake));
    let web = spec(
        "0e6b-web",
        owner("c1", "0e6b-web"),
        vec![
            listener(Protocol::Tcp, 80, &[1, 2]),
            listener(Protocol::Udp, 53, &[1, 2]),
        ],
    );
    gcp.ensure(&web).await.unwrap();
    let changes = fake.take_changes().len();
    let expected = gcp.get(&web.name).await.unwrap().unwrap().status.ports;
    let held = fake.count();
    gcp.delete(&web.name, &web.owner).await.unwrap();
    assert!(changes >= 7, "{changes} changes");

    for killed_after in 0..changes {
        fake.kill_after(Some(killed_after));
        assert!(
            gcp.ensure(&web).await.is_err(),
            "killed after {killed_after} changes"
        );
        fake.kill_after(None);
        let status = gcp.ensure(&web).await.unwrap_or_else(|e| {
            panic!("the next reconcile after {killed_after} changes completes: {e}")
        });
        assert_eq!(status.ports, expected);
        assert_eq!(
            fake.count(),
            held,
            "no duplicates (killed after {killed_after})"
        );
        gcp.delete(&web.name, &web.owner).await.unwrap();
        assert_eq!(
            fake.count(),
            0,
            "nothing leaks (killed after {killed_after})"
        );
    }
}
