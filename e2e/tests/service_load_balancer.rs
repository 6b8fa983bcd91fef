//! Services of type LoadBalancer end to end: the operator and the local cloud run as real
//! processes against a local cluster, and every assertion is about traffic that really flows
//! through the load balancer's address, or about what the API server really holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use portico_e2e::{
    agent::{ECHO_IMAGE, echo::UdpEcho},
    testkit::*,
};
use portico_provider::Provider;
use serde_json::json;
use tokio::net::UdpSocket;

const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
const CONDITION: &str = "portico.dev/LoadBalancerReady";
const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Echo pods answering HTTP on 8080/TCP and datagrams on 5353/UDP.
async fn echo_deployment(client: &Client, name: &str, replicas: i32) {
    create(
        client,
        &deployment(name, replicas, ECHO_IMAGE, &[(8080, "TCP"), (5353, "UDP")]),
    )
    .await;
}

/// A Service of type LoadBalancer for `app` with port 80 → 8080, `spec` merged over it.
fn lb_service(name: &str, app: &str, spec: serde_json::Value) -> Service {
    let mut merged = json!({"type": "LoadBalancer"});
    for (key, value) in spec.as_object().unwrap() {
        merged[key] = value.clone();
    }
    service(name, app, merged)
}

fn services(client: &Client) -> Api<Service> {
    Api::namespaced(client.clone(), NS)
}

async fn external_ip_of(client: &Client, name: &str) -> Option<Ipv4Addr> {
    let svc = services(client).get_opt(name).await.ok()??;
    svc.status?
        .load_balancer?
        .ingress?
        .first()?
        .ip
        .as_deref()?
        .parse()
        .ok()
}

async fn wait_for_external_ip(client: &Client, name: &str) -> Ipv4Addr {
    eventually(&format!("{name} has an EXTERNAL-IP"), || {
        external_ip_of(client, name)
    })
    .await
}

/// Waits until the load balancer answers HTTP on `target` (health checks have had their
/// first say), then returns.
async fn wait_until_answering(target: SocketAddr) {
    eventually(&format!("{target} answers"), || async {
        echo_via(target, None).await.ok()
    })
    .await;
}

async fn condition(client: &Client, name: &str) -> Option<(String, String, String)> {
    let svc = services(client).get_opt(name).await.ok()??;
    let c = svc
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == CONDITION)?;
    Some((c.status, c.reason, c.message))
}

async fn event_reasons(client: &Client, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The operator's default cluster id: the UID of `kube-system`.
async fn cluster_id(client: &Client) -> String {
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get("kube-system")
        .await
        .unwrap()
        .uid()
        .unwrap()
}

/// Some(()) once connecting to `target` is refused: nothing listens there any more.
async fn refused(target: SocketAddr) -> Option<()> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    }
}

async fn udp_echo(target: SocketAddr, payload: &str) -> Option<UdpEcho> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.send_to(payload.as_bytes(), target).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&buf[..n]).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_balancer_service_gets_an_external_ip_that_reaches_every_pod() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "web", 3).await;
    create(&client, &lb_service("web", "web", json!({}))).await;
    // Kubernetes 1.20 refuses TCP and UDP in one LoadBalancer Service (MixedProtocolLBService
    // is alpha there), so UDP gets a Service of its own.
    create(
        &client,
        &lb_service(
            "dns",
            "web",
            json!({"ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}),
        ),
    )
    .await;

    wait_for_endpoints(&client, "web", 3).await;
    let ip = wait_for_external_ip(&client, "web").await;
    assert!(ip.is_loopback());
    let svc = services(&client).get("web").await.unwrap();
    assert!(svc.finalizers().iter().any(|f| f == FINALIZER));
    let ports: BTreeSet<(i32, String)> =
        svc.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
            .ports
            .clone()
            .unwrap()
            .into_iter()
            .map(|p| (p.port, p.protocol))
            .collect();
    assert_eq!(ports, BTreeSet::from([(80, "TCP".into())]));

    let target = SocketAddr::from((ip, 80));
    wait_until_answering(target).await;
    let mut pods = BTreeSet::new();
    for _ in 0..300 {
        let echo = echo_via(target, None)
            .await
            .expect("every request through the LB answers");
        pods.insert(echo.pod);
    }
    assert_eq!(pods.len(), 3, "300 requests reach all 3 pods: {pods:?}");

    let dns = SocketAddr::from((wait_for_external_ip(&client, "dns").await, 53));
    let answer = eventually("a datagram comes back", || udp_echo(dns, "ping")).await;
    assert_eq!(answer.payload, "ping");

    let (status, reason, _) = condition(&client, "web").await.expect("condition set");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Ensured"));
    let reasons: Vec<String> = event_reasons(&client, "web")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(
        reasons.contains(&"EnsuringLoadBalancer".to_string()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"EnsuredLoadBalancer".to_string()),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ip_affinity_sends_one_client_to_one_pod() {
    let (testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "sticky", 3).await;
    create(
        &client,
        &lb_service("sticky", "sticky", json!({"sessionAffinity": "ClientIP"})),
    )
    .await;
    wait_for_endpoints(&client, "sticky", 3).await;
    let target = SocketAddr::from((wait_for_external_ip(&client, "sticky").await, 80));
    wait_until_answering(target).await;

    for n in 1..=3 {
        let me = IpAddr::V4(testbed.plan().client_ip(n));
        let mut pods = BTreeSet::new();
        for _ in 0..30 {
            pods.insert(echo_via(target, Some(me)).await.expect("answer").pod);
        }
        assert_eq!(pods.len(), 1, "client {me} reached {pods:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_traffic_policy_uses_only_nodes_with_endpoints_and_keeps_the_client_address() {
    let (testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "local", 1).await;
    create(
        &client,
        &lb_service("local", "local", json!({"externalTrafficPolicy": "Local"})),
    )
    .await;
    let target = SocketAddr::from((wait_for_external_ip(&client, "local").await, 80));
    wait_until_answering(target).await;

    // Two of the three nodes have no endpoint: their kube-proxy drops the connection. Every
    // request succeeding means the load balancer never sent one there.
    let me = testbed.plan().client_ip(7);
    for i in 0..60 {
        let echo = echo_via(target, Some(IpAddr::V4(me)))
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        let seen: SocketAddr = echo.client.parse().unwrap();
        assert_eq!(
            seen.ip(),
            IpAddr::V4(me),
            "the pod sees the client's own address"
        );
    }
}

/// Sends requests one after another until stopped, counting failures and which node's pod
/// answered (with `externalTrafficPolicy: Local`, that is the node the load balancer chose).
struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    answers: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(target: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, failures, answers) = (stop.clone(), failures.clone(), answers.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    match echo_via(target, None).await {
                        Ok(echo) => answers.lock().unwrap().push(echo.node),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Traffic {
            stop,
            failures,
            answers,
            task,
        }
    }

    fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Waits until the last `window` answers all avoided `node`.
    async fn until_avoiding(&self, node: &str, window: usize) {
        eventually(&format!("traffic avoids {node}"), || async {
            let answers = self.answers.lock().unwrap();
            (answers.len() >= window && answers[answers.len() - window..].iter().all(|n| n != node))
                .then_some(())
        })
        .await;
    }

    /// How many of the answers after `from` came from `node`.
    fn answers_by_since(&self, node: &str, from: usize) -> usize {
        self.answers.lock().unwrap()[from..]
            .iter()
            .filter(|n| *n == node)
            .count()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.failures.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn excluded_and_deleted_nodes_get_no_new_traffic_and_no_request_fails() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "spread", 3).await;
    create(
        &client,
        &lb_service(
            "spread",
            "spread",
            json!({"externalTrafficPolicy": "Local"}),
        ),
    )
    .await;
    wait_for_endpoints(&client, "spread", 3).await;
    let target = SocketAddr::from((wait_for_external_ip(&client, "spread").await, 80));
    wait_until_answering(target).await;
    let traffic = Traffic::start(target);
    eventually("every node's pod has answered", || async {
        let answers = traffic.answers.lock().unwrap();
        (answers.iter().collect::<BTreeSet<_>>().len() == 3).then_some(())
    })
    .await;

    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {EXCLUDE_LABEL: "true"}}})),
        )
        .await
        .unwrap();
    traffic.until_avoiding("node-1", 30).await;
    let after_exclusion = traffic.answered();

    nodes
        .delete("node-2", &DeleteParams::default())
        .await
        .unwrap();
    traffic.until_avoiding("node-2", 30).await;
    let after_deletion = traffic.answered();
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        traffic.answers_by_since("node-1", after_exclusion),
        0,
        "excluded node got new traffic"
    );
    assert_eq!(
        traffic.answers_by_since("node-2", after_deletion),
        0,
        "deleted node got new traffic"
    );
    let total = traffic.answered();
    let failures = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        total + failures.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_added_to_and_removed_from_the_service_are_followed() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "ports", 2).await;
    create(&client, &lb_service("ports", "ports", json!({}))).await;
    let ip = wait_for_external_ip(&client, "ports").await;
    wait_until_answering(SocketAddr::from((ip, 80))).await;

    let two_ports = json!({"spec": {"ports": [
        {"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "alt", "port": 8081, "targetPort": 8080, "protocol": "TCP"},
    ]}});
    services(&client)
        .patch("ports", &PatchParams::default(), &Patch::Merge(&two_ports))
        .await
        .unwrap();
    wait_until_answering(SocketAddr::from((ip, 8081))).await;

    let only_alt = json!({"spec": {"ports": [
        {"name": "alt", "port": 8081, "targetPort": 8080, "protocol": "TCP"},
    ]}});
    services(&client)
        .patch("ports", &PatchParams::default(), &Patch::Merge(&only_alt))
        .await
        .unwrap();
    eventually("port 80 is closed", || refused(SocketAddr::from((ip, 80)))).await;
    // The patch names no node ports, so the API server may hand "alt" a new one; the load
    // balancer and the nodes then move to it within moments of each other.
    wait_until_answering(SocketAddr::from((ip, 8081))).await;
    assert_eq!(
        external_ip_of(&client, "ports").await,
        Some(ip),
        "the address stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_service_or_changing_its_type_removes_the_load_balancer() {
    let (_testbed, portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "gone", 1).await;
    create(&client, &lb_service("deleted", "gone", json!({}))).await;
    create(&client, &lb_service("retyped", "gone", json!({}))).await;
    let deleted_ip = wait_for_external_ip(&client, "deleted").await;
    let retyped_ip = wait_for_external_ip(&client, "retyped").await;
    wait_until_answering(SocketAddr::from((deleted_ip, 80))).await;
    wait_until_answering(SocketAddr::from((retyped_ip, 80))).await;

    services(&client)
        .delete("deleted", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted Service is gone", || async {
        services(&client)
            .get_opt("deleted")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually("its address is closed", || {
        refused(SocketAddr::from((deleted_ip, 80)))
    })
    .await;

    services(&client)
        .patch(
            "retyped",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP", "ports": [
                {"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": null}
            ]}})),
        )
        .await
        .unwrap();
    let svc = eventually("the retyped Service is cleaned up", || async {
        let svc = services(&client).get("retyped").await.unwrap();
        let clean = !svc.finalizers().iter().any(|f| f == FINALIZER)
            && svc
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_deref()
                .unwrap_or_default()
                .is_empty();
        clean.then_some(svc)
    })
    .await;
    assert!(svc.metadata.deletion_timestamp.is_none());
    eventually("its address is closed", || {
        refused(SocketAddr::from((retyped_ip, 80)))
    })
    .await;

    let left = portico
        .local_cloud()
        .list_owned(&cluster_id(&client).await)
        .await
        .unwrap();
    assert!(left.is_empty(), "load balancers left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_connection_survives_an_operator_restart_and_the_address_stays() {
    let (_testbed, mut portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "long", 2).await;
    create(&client, &lb_service("long", "long", json!({}))).await;
    let ip = wait_for_external_ip(&client, "long").await;
    let target = SocketAddr::from((ip, 80));
    wait_until_answering(target).await;

    let mut session = raw_session(target).await.expect("raw session");
    portico.kill_operator();
    still_echoes(&mut session, "while the operator is down").await;
    echo_via(target, None)
        .await
        .expect("new connections work without the operator");

    portico.start_operator().await.expect("operator restarts");
    still_echoes(&mut session, "after the restart").await;
    // Let the new leader reconcile everything once; the address must not move.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(external_ip_of(&client, "long").await, Some(ip));
    still_echoes(&mut session, "still the same connection").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_local_cloud_keeps_every_address() {
    let (_testbed, mut portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "keep", 2).await;
    let mut before = BTreeMap::new();
    for name in ["keep-a", "keep-b", "keep-c"] {
        create(&client, &lb_service(name, "keep", json!({}))).await;
    }
    for name in ["keep-a", "keep-b", "keep-c"] {
        before.insert(name, wait_for_external_ip(&client, name).await);
    }

    portico.stop_local_cloud().await.unwrap();
    eventually("the data plane is down", || {
        refused(SocketAddr::from((before["keep-a"], 80)))
    })
    .await;
    portico.start_local_cloud().await.unwrap();

    for (name, ip) in &before {
        wait_until_answering(SocketAddr::from((*ip, 80))).await;
        assert_eq!(
            external_ip_of(&client, name).await,
            Some(*ip),
            "{name} kept its address"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unparseable_annotation_is_reported_on_that_service_and_others_keep_working() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    echo_deployment(&client, "mixed", 2).await;
    let mut bad = lb_service("bad", "mixed", json!({}));
    bad.metadata.annotations = Some(BTreeMap::from([(
        "lb.portico.dev/proxy-protocol".to_string(),
        "maybe".to_string(),
    )]));
    create(&client, &bad).await;
    create(&client, &lb_service("good", "mixed", json!({}))).await;

    let good = SocketAddr::from((wait_for_external_ip(&client, "good").await, 80));
    wait_until_answering(good).await;
    let (status, reason, message) = eventually("the bad Service says why", || async {
        condition(&client, "bad")
            .await
            .filter(|(s, _, _)| s == "False")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidService")
    );
    assert!(
        message.contains("lb.portico.dev/proxy-protocol"),
        "{message}"
    );
    let warning = eventually("a warning event names the problem", || async {
        event_reasons(&client, "bad")
            .await
            .into_iter()
            .find(|(r, _)| r == "SyncLoadBalancerFailed")
    })
    .await;
    assert!(warning.1.contains("maybe"), "{warning:?}");
    assert_eq!(external_ip_of(&client, "bad").await, None);

    // Fixing the annotation is all it takes.
    services(&client)
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"lb.portico.dev/proxy-protocol": "false"}}}),
            ),
        )
        .await
        .unwrap();
    let fixed = SocketAddr::from((wait_for_external_ip(&client, "bad").await, 80));
    wait_until_answering(fixed).await;
    echo_via(good, None)
        .await
        .expect("the good Service kept working");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_address_pool_is_reported_and_others_keep_working() {
    let (testbed, _portico, client) = cluster_with_portico(|config| {
        let (first, _) = config.plan.load_balancer_pool();
        config.pool = Some(format!("{first}-{first}"));
    })
    .await;
    echo_deployment(&client, "pool", 1).await;
    create(&client, &lb_service("first", "pool", json!({}))).await;
    let first = wait_for_external_ip(&client, "first").await;
    assert_eq!(first, testbed.plan().load_balancer_pool().0);
    create(&client, &lb_service("second", "pool", json!({}))).await;

    let (_, reason, message) =
        eventually("the second Service says the pool is exhausted", || async {
            condition(&client, "second")
                .await
                .filter(|(s, _, _)| s == "False")
        })
        .await;
    assert_eq!(reason, "CapacityExhausted", "{message}");
    eventually("a warning event", || async {
        event_reasons(&client, "second")
            .await
            .into_iter()
            .find(|(r, _)| r == "SyncLoadBalancerFailed")
    })
    .await;
    wait_until_answering(SocketAddr::from((first, 80))).await;

    // Freeing the address lets the waiting Service through on its next retry.
    services(&client)
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    let second = wait_for_external_ip(&client, "second").await;
    assert_eq!(second, first);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_balancer_whose_service_vanished_is_garbage_collected() {
    let (_testbed, portico, client) =
        cluster_with_portico(|config| config.operator_args.push("--gc-seconds=2".into())).await;
    echo_deployment(&client, "orphan", 1).await;
    create(&client, &lb_service("orphan", "orphan", json!({}))).await;
    let ip = wait_for_external_ip(&client, "orphan").await;
    wait_until_answering(SocketAddr::from((ip, 80))).await;
    let uid = services(&client)
        .get("orphan")
        .await
        .unwrap()
        .uid()
        .unwrap();

    // Someone strips the finalizer and deletes the Service: the reconciler never sees it go.
    services(&client)
        .patch(
            "orphan",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    services(&client)
        .delete("orphan", &DeleteParams::default())
        .await
        .unwrap();

    eventually("the orphaned load balancer is deleted", || {
        refused(SocketAddr::from((ip, 80)))
    })
    .await;
    let cloud = portico.local_cloud();
    let name = portico_provider::LoadBalancerName::for_object_uid(&uid);
    assert!(cloud.get(&name).await.unwrap().is_none());
}
