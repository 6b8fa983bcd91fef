//! The simulated nodes against the real control plane: the scheduler and kubelet run echo
//! pods made by real Deployments, and every node's kube-proxy stand-in forwards its node ports
//! to the endpoints the real endpoints controller publishes.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Service},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use portico_e2e::agent::{ECHO_IMAGE, echo::UdpEcho};
use portico_e2e::testkit::*;
use serde_json::json;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread")]
async fn echo_pods_answer_through_the_node_port_of_every_node() {
    let (testbed, client) = three_nodes().await;
    create(&client, &deployment("web", 3, ECHO_IMAGE, &[(8080, "TCP")])).await;
    create(&client, &service("web", "web", json!({}))).await;
    wait_for_endpoints(&client, "web", 3).await;
    let port = node_port(&client, "web").await;
    wait_until_served(&testbed, port).await;

    let pods: BTreeSet<String> = running_pods(&client, "web")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    let nodes_used: BTreeSet<String> = running_pods(&client, "web")
        .await
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(nodes_used.len(), 3, "the scheduler spreads the replicas");

    let mut seen = BTreeSet::new();
    for node in testbed.nodes() {
        for _ in 0..20 {
            let echo = echo_via(SocketAddr::from((node.internal_ip, port)), None)
                .await
                .unwrap_or_else(|e| panic!("via {}: {e}", node.name));
            assert_eq!(echo.path, "/hello");
            assert_eq!(echo.query, "via=node-port");
            // Cluster traffic policy: the pod sees the node that forwarded it.
            let client_ip: SocketAddr = echo.client.parse().unwrap();
            assert_eq!(client_ip.ip(), IpAddr::V4(node.internal_ip));
            seen.insert(echo.pod);
        }
    }
    assert_eq!(seen, pods, "all 3 pods answer over 60 requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_traffic_policy_serves_only_where_a_pod_runs_and_keeps_the_client_address() {
    let (testbed, client) = three_nodes().await;
    create(
        &client,
        &deployment("local", 1, ECHO_IMAGE, &[(8080, "TCP")]),
    )
    .await;
    let svc = create(
        &client,
        &service(
            "local",
            "local",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
        ),
    )
    .await;
    let health_port = svc
        .spec
        .unwrap()
        .health_check_node_port
        .expect("a health check node port") as u16;
    wait_for_endpoints(&client, "local", 1).await;
    let port = node_port(&client, "local").await;
    let pod = running_pods(&client, "local").await.remove(0);
    let pod_node = pod.spec.unwrap().node_name.unwrap();
    let pod_node_ip = testbed
        .nodes()
        .into_iter()
        .find(|n| n.name == pod_node)
        .unwrap()
        .internal_ip;
    // The endpoint reaches the agent's watch a moment after the API shows it.
    let pod_node_health = SocketAddr::from((pod_node_ip, health_port));
    eventually("the pod's node reports a local endpoint", || async {
        let (status, _) = http_get(pod_node_health, None, "/healthz").await.ok()?;
        (status == 200).then_some(())
    })
    .await;

    for node in testbed.nodes() {
        let (status, body) = http_get(
            SocketAddr::from((node.internal_ip, health_port)),
            None,
            "/healthz",
        )
        .await
        .unwrap();
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["service"], json!({"namespace": NS, "name": "local"}));
        if node.name == pod_node {
            assert_eq!(
                (status, report["localEndpoints"].as_u64()),
                (200, Some(1)),
                "{}",
                node.name
            );
        } else {
            assert_eq!(
                (status, report["localEndpoints"].as_u64()),
                (503, Some(0)),
                "{}",
                node.name
            );
        }
        // kube-proxy's own health port says every node is fine.
        let (status, _) = http_get(
            SocketAddr::from((node.internal_ip, 10256)),
            None,
            "/healthz",
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }

    let me = IpAddr::V4(Ipv4Addr::new(127, 99, testbed.plan().slot, 7));
    for _ in 0..5 {
        let echo = echo_via(SocketAddr::from((pod_node_ip, port)), Some(me))
            .await
            .unwrap();
        let seen: SocketAddr = echo.client.parse().unwrap();
        assert_eq!(seen.ip(), me, "the pod sees the client's own address");
    }
    let elsewhere = testbed
        .nodes()
        .into_iter()
        .find(|n| n.name != pod_node)
        .unwrap();
    assert!(
        echo_via(SocketAddr::from((elsewhere.internal_ip, port)), Some(me))
            .await
            .is_err(),
        "a node without a local endpoint doesn't serve the service"
    );

    // A node the cluster autoscaler is about to delete asks load balancers to drain it.
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .patch(
            &elsewhere.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": [
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"},
            ]}})),
        )
        .await
        .unwrap();
    let node_health = SocketAddr::from((elsewhere.internal_ip, 10256));
    eventually("the tainted node's kube-proxy health turns 503", || async {
        let (status, _) = http_get(node_health, None, "/healthz").await.ok()?;
        (status == 503).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_pods_leave_the_rotation_and_scaled_up_pods_join_it() {
    let (testbed, client) = three_nodes().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    create(
        &client,
        &deployment("rotate", 2, ECHO_IMAGE, &[(8080, "TCP")]),
    )
    .await;
    create(&client, &service("rotate", "rotate", json!({}))).await;
    wait_for_endpoints(&client, "rotate", 2).await;
    let port = node_port(&client, "rotate").await;
    wait_until_served(&testbed, port).await;
    let target = SocketAddr::from((testbed.nodes()[0].internal_ip, port));
    let pod_names = |pods: Vec<Pod>| pods.iter().map(|p| p.name_any()).collect::<BTreeSet<_>>();

    let before = pod_names(running_pods(&client, "rotate").await);
    assert_eq!(pods_seen(target, 10).await, before);

    let victim = before.first().unwrap().clone();
    Api::<Pod>::namespaced(client.clone(), NS)
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    // The ReplicaSet replaces it; once the endpoints settle only live pods answer.
    let after = eventually(
        "the deleted pod is out of rotation and its replacement in",
        || async {
            let live = pod_names(running_pods(&client, "rotate").await);
            let seen = pods_seen(target, 10).await;
            (live.len() == 2 && !live.contains(&victim) && seen == live).then_some(live)
        },
    )
    .await;
    assert!(!after.contains(&victim));

    deployments
        .patch(
            "rotate",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    wait_for_endpoints(&client, "rotate", 4).await;
    let live = pod_names(running_pods(&client, "rotate").await);
    assert_eq!(live.len(), 4);
    eventually("all 4 pods answer", || async {
        (pods_seen(target, 16).await == live).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_datagrams_are_answered_through_a_node_port() {
    let (testbed, client) = three_nodes().await;
    create(&client, &deployment("dns", 2, ECHO_IMAGE, &[(5353, "UDP")])).await;
    create(
        &client,
        &service(
            "dns",
            "dns",
            json!({"ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}),
        ),
    )
    .await;
    wait_for_endpoints(&client, "dns", 2).await;
    let port = node_port(&client, "dns").await;

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for node in testbed.nodes() {
        let target = SocketAddr::from((node.internal_ip, port));
        // UDP may lose a datagram (e.g. sent before this node's proxy saw the endpoints), so
        // ask again, as any UDP client would.
        let (from, echo) = eventually(&format!("{} answers over UDP", node.name), || async {
            socket.send_to(b"where are you?", target).await.unwrap();
            let mut buf = [0u8; 4096];
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf))
                    .await
                    .ok()?
                    .unwrap();
            Some((from, serde_json::from_slice::<UdpEcho>(&buf[..n]).unwrap()))
        })
        .await;
        assert_eq!(from, target, "the answer comes from the node port");
        assert_eq!(echo.payload, "where are you?");
        assert!(echo.pod.starts_with("dns-"), "{echo:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_with_another_image_stays_pending_while_echo_pods_keep_working() {
    let (testbed, client) = three_nodes().await;
    create(&client, &deployment("web", 1, ECHO_IMAGE, &[(8080, "TCP")])).await;
    create(&client, &service("web", "web", json!({}))).await;
    let nginx: Pod = serde_json::from_value(json!({
        "metadata": {"name": "nginx"},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.25"}]},
    }))
    .unwrap();
    create(&client, &nginx).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let waiting = eventually("nginx reports why it waits", || async {
        let pod = pods.get("nginx").await.ok()?;
        let status = pod.status?;
        let waiting = status.container_statuses?.first()?.state.clone()?.waiting?;
        Some((status.phase, waiting))
    })
    .await;
    assert_eq!(waiting.0.as_deref(), Some("Pending"));
    assert_eq!(waiting.1.reason.as_deref(), Some("UnsupportedImage"));
    assert!(waiting.1.message.unwrap().contains(ECHO_IMAGE));
    let nginx = pods.get("nginx").await.unwrap();
    assert!(nginx.spec.unwrap().node_name.is_some(), "it was scheduled");
    let ready = nginx
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");

    wait_for_endpoints(&client, "web", 1).await;
    let port = node_port(&client, "web").await;
    wait_until_served(&testbed, port).await;
    for node in testbed.nodes() {
        let echo = echo_via(SocketAddr::from((node.internal_ip, port)), None)
            .await
            .unwrap();
        assert!(echo.pod.starts_with("web-"));
    }

    // Pods may change their images: with the echo image it runs.
    pods.patch(
        "nginx",
        &PatchParams::default(),
        &Patch::Strategic(
            json!({"spec": {"containers": [{"name": "nginx", "image": ECHO_IMAGE}]}}),
        ),
    )
    .await
    .unwrap();
    eventually("nginx runs once its image is the echo image", || async {
        let status = pods.get("nginx").await.ok()?.status?;
        (status.phase.as_deref() == Some("Running") && status.pod_ip.is_some()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn user_changes_to_nodes_survive_and_a_deleted_node_leaves_for_good() {
    use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
    let (testbed, client) = three_nodes().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let merge = |patch| Patch::Merge(patch);
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &merge(json!({"metadata": {"labels": {"disk": "ssd"}}})),
        )
        .await
        .unwrap();
    nodes
        .patch(
            "node-2",
            &PatchParams::default(),
            &merge(json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}})),
        )
        .await
        .unwrap();
    create(&client, &deployment("web", 2, ECHO_IMAGE, &[(8080, "TCP")])).await;
    create(&client, &service("web", "web", json!({}))).await;
    wait_for_endpoints(&client, "web", 2).await;
    let port = node_port(&client, "web").await;
    wait_until_served(&testbed, port).await;
    let placed: BTreeSet<String> = running_pods(&client, "web")
        .await
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(
        placed,
        BTreeSet::from(["node-1".into(), "node-3".into()]),
        "node-2's taint is honoured"
    );

    // A long-lived connection through node-3, then node-3 is deleted.
    let node_3 = testbed.nodes()[2].internal_ip;
    let mut session = raw_session(SocketAddr::from((node_3, port))).await.unwrap();
    nodes
        .delete("node-3", &DeleteParams::default())
        .await
        .unwrap();
    eventually("node-3's kube-proxy reports it is leaving", || async {
        let (status, _) = http_get(SocketAddr::from((node_3, 10256)), None, "/healthz")
            .await
            .ok()?;
        (status == 503).then_some(())
    })
    .await;
    // Like a VM that is still up: its proxy keeps serving, old and new connections alike.
    still_echoes(&mut session, "after the node was deleted").await;
    echo_via(SocketAddr::from((node_3, port)), None)
        .await
        .unwrap();

    // Past a heartbeat: node-3 stays deleted, and the users' label and taint are still there.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        nodes.get_opt("node-3").await.unwrap().is_none(),
        "a deleted node is not re-created"
    );
    let node_1 = nodes.get("node-1").await.unwrap();
    assert_eq!(node_1.labels().get("disk").map(String::as_str), Some("ssd"));
    let node_2 = nodes.get("node-2").await.unwrap();
    assert_eq!(node_2.spec.unwrap().taints.unwrap()[0].key, "dedicated");
    let lease = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
        .get("node-1")
        .await
        .unwrap();
    let renewed = lease.spec.unwrap().renew_time.unwrap().0;
    assert!(
        jiff::Timestamp::now().duration_since(renewed).as_secs() < 30,
        "node-1's lease is renewed"
    );
    still_echoes(&mut session, "still").await;

    // New pods go to node-1 only: node-2 is tainted and node-3 is gone.
    let before: BTreeSet<String> = running_pods(&client, "web")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    Api::<Deployment>::namespaced(client.clone(), NS)
        .patch(
            "web",
            &PatchParams::default(),
            &merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    let new_nodes = eventually("2 more pods are scheduled", || async {
        let fresh: Vec<String> = running_pods(&client, "web")
            .await
            .into_iter()
            .filter(|p| !before.contains(&p.name_any()))
            .filter_map(|p| p.spec?.node_name)
            .collect();
        (fresh.len() == 2).then_some(fresh)
    })
    .await;
    assert_eq!(new_nodes, ["node-1", "node-1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_that_cannot_run_say_why() {
    let (_testbed, client) = three_nodes().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let picky: Pod = serde_json::from_value(json!({
        "metadata": {"name": "picky"},
        "spec": {
            "nodeSelector": {"disk": "none-has-this"},
            "containers": [{"name": "echo", "image": ECHO_IMAGE}],
        },
    }))
    .unwrap();
    create(&client, &picky).await;
    let clash: Pod = serde_json::from_value(json!({
        "metadata": {"name": "clash"},
        "spec": {"containers": [
            {"name": "first", "image": ECHO_IMAGE, "ports": [{"containerPort": 9000}]},
            {"name": "second", "image": "portico.dev/echo", "ports": [{"containerPort": 9000}]},
        ]},
    }))
    .unwrap();
    create(&client, &clash).await;

    let scheduled = eventually("picky is reported unschedulable", || async {
        let status = pods.get("picky").await.ok()?.status?;
        status
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    })
    .await;
    assert_eq!(scheduled.reason.as_deref(), Some("Unschedulable"));
    assert!(
        scheduled
            .message
            .as_deref()
            .unwrap()
            .starts_with("0/3 nodes are available"),
        "{scheduled:?}"
    );

    let statuses = eventually("clash reports its containers", || async {
        let statuses = pods.get("clash").await.ok()?.status?.container_statuses?;
        (statuses.len() == 2).then_some(statuses)
    })
    .await;
    assert!(statuses[0].ready, "the first container got the port");
    let waiting = statuses[1].state.clone().unwrap().waiting.unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("PortInUse"));
    assert!(waiting.message.unwrap().contains("9000/TCP"));
    let clash = pods.get("clash").await.unwrap().status.unwrap();
    let ready = clash
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(clash.pod_ip.unwrap().starts_with("10.244."));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ip_affinity_sticks_and_node_ports_close_when_the_type_changes() {
    let (testbed, client) = three_nodes().await;
    create(
        &client,
        &deployment("sticky", 3, ECHO_IMAGE, &[(8080, "TCP")]),
    )
    .await;
    create(
        &client,
        &service("sticky", "sticky", json!({"sessionAffinity": "ClientIP"})),
    )
    .await;
    wait_for_endpoints(&client, "sticky", 3).await;
    let port = node_port(&client, "sticky").await;
    wait_until_served(&testbed, port).await;
    let target = SocketAddr::from((testbed.nodes()[0].internal_ip, port));
    assert_eq!(pods_seen(target, 10).await.len(), 1, "one client, one pod");

    Api::<Service>::namespaced(client.clone(), NS)
        .patch(
            "sticky",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "type": "ClusterIP",
                "ports": [{"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            }})),
        )
        .await
        .unwrap();
    for node in testbed.nodes() {
        let target = SocketAddr::from((node.internal_ip, port));
        eventually(
            &format!("{}'s node port {port} is closed", node.name),
            || async {
                match tokio::net::TcpStream::connect(target).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
}
