//! The local cloud end to end: a daemon in-process, driven through `LocalCloudProvider`,
//! with real sockets on loopback. Each test has its own 127.9x.y.0/24.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use portico_provider::*;
use tokio::net::UdpSocket;

const NODE_PORT: u16 = 30080;
const HEALTH_PORT: u16 = 10256;

fn lb_addr(status: &LoadBalancerStatus, port: u16) -> SocketAddr {
    SocketAddr::from((address_of(status), port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_load_balancer_spreads_connections_round_robin_over_all_targets() {
    let net = Net::new(90, 1);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let c = TcpTarget::start("c", net.target_ip(3), NODE_PORT, Greeting::Plain).await;

    let status = cloud
        .provider
        .ensure(&spec("web", vec![tcp_listener(80, &[&a, &b, &c])]))
        .await
        .unwrap();
    assert_eq!(
        address_of(&status),
        net.ip(1),
        "the lowest address of the pool"
    );
    assert_eq!(
        status.ports,
        vec![PortStatus {
            protocol: Protocol::Tcp,
            port: 80,
            error: None
        }]
    );
    cloud.wait_health("web", 3, 0).await;

    let names = whos(net.client(1), lb_addr(&status, 80), 9).await;
    for round in names.chunks(3) {
        let set: BTreeSet<&str> = round.iter().map(String::as_str).collect();
        assert_eq!(
            set,
            BTreeSet::from(["a", "b", "c"]),
            "each round hits every target: {names:?}"
        );
    }
    assert_eq!(
        names[0..3],
        names[3..6],
        "the same order every round: {names:?}"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensuring_the_same_spec_twice_changes_nothing() {
    let net = Net::new(90, 2);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let web = spec("web", vec![tcp_listener(80, &[&a])]);

    let first = cloud.provider.ensure(&web).await.unwrap();
    let mut conn = Conn::open(net.client(1), lb_addr(&first, 80))
        .await
        .unwrap();
    assert!(conn.line().await.unwrap().starts_with("a "));

    let second = cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(first, second);
    assert!(
        conn.echo("still here").await,
        "the connection survives a no-op ensure"
    );

    let observed = cloud.provider.get(&web.name).await.unwrap().unwrap();
    assert_eq!(observed.name, web.name);
    assert_eq!(observed.owner, web.owner);
    assert_eq!(observed.status, first);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_round_trips_and_each_flow_sticks_to_its_target() {
    let net = Net::new(90, 3);
    let cloud = TestCloud::start(net).await;
    let a = UdpTarget::start("a", net.target_ip(1), NODE_PORT).await;
    let b = UdpTarget::start("b", net.target_ip(2), NODE_PORT).await;
    // UDP targets are health-checked over TCP, as node ports are by kube-proxy's healthz.
    let _ha = HealthServer::start(net.target_ip(1), HEALTH_PORT).await;
    let _hb = HealthServer::start(net.target_ip(2), HEALTH_PORT).await;
    let dns = spec(
        "dns",
        vec![listener(
            Protocol::Udp,
            53,
            vec![target("a", a.addr), target("b", b.addr)],
            fast_check(Probe::Tcp { port: HEALTH_PORT }),
        )],
    );
    let status = cloud.provider.ensure(&dns).await.unwrap();
    cloud.wait_health("dns", 2, 0).await;
    let lb = lb_addr(&status, 53);

    let mut seen = BTreeMap::new();
    for k in 1..=2 {
        let client = UdpSocket::bind((net.client(k), 0)).await.unwrap();
        let mut names = BTreeSet::new();
        for i in 0..4 {
            client
                .send_to(format!("q{i}").as_bytes(), lb)
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
                .await
                .expect("a reply")
                .unwrap();
            assert_eq!(from, lb, "replies come from the load balancer's address");
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(reply.ends_with(&format!(" q{i}")), "{reply}");
            names.insert(reply.split(' ').next().unwrap().to_string());
        }
        assert_eq!(names.len(), 1, "one flow, one target: {names:?}");
        seen.insert(k, names.into_iter().next().unwrap());
    }
    assert_ne!(seen[&1], seen[&2], "flows are spread round robin: {seen:?}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_pins_each_client_to_one_target() {
    let net = Net::new(90, 4);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let c = TcpTarget::start("c", net.target_ip(3), NODE_PORT, Greeting::Plain).await;
    let mut l = tcp_listener(80, &[&a, &b, &c]);
    l.pool.affinity = SessionAffinity::ClientIp {
        timeout: Duration::from_secs(60),
    };
    let status = cloud
        .provider
        .ensure(&spec("sticky", vec![l]))
        .await
        .unwrap();
    cloud.wait_health("sticky", 3, 0).await;

    let mut pinned = BTreeSet::new();
    for k in 1..=3 {
        let names: BTreeSet<String> = whos(net.client(k), lb_addr(&status, 80), 5)
            .await
            .into_iter()
            .collect();
        assert_eq!(
            names.len(),
            1,
            "client {k} always reaches the same target: {names:?}"
        );
        pinned.extend(names);
    }
    assert_eq!(pinned.len(), 3, "new clients are still spread: {pinned:?}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ranges_refuse_outside_clients_and_admit_inside_ones() {
    let net = Net::new(90, 5);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let mut restricted = spec("private", vec![tcp_listener(80, &[&a])]);
    // 127.90.5.48/28 holds clients .50-.63.
    restricted.source_ranges = vec![format!("{}/28", net.ip(48)).parse().unwrap()];
    let status = cloud.provider.ensure(&restricted).await.unwrap();
    let lb = lb_addr(&status, 80);

    assert_eq!(who(net.client(1), lb).await.as_deref(), Some("a"));
    assert_eq!(
        who(net.client(20), lb).await,
        None,
        "127.90.5.70 is outside the range"
    );

    // Lifting the restriction applies to the running listener.
    restricted.source_ranges.clear();
    cloud.provider.ensure(&restricted).await.unwrap();
    assert_eq!(who(net.client(20), lb).await.as_deref(), Some("a"));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_asking_for_proxy_protocol_gets_a_v2_header_naming_the_client() {
    let net = Net::new(90, 6);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::ProxyV2).await;
    // A TCP probe would be taken for a client that never sends its header; probe elsewhere.
    let _health = HealthServer::start(net.target_ip(1), HEALTH_PORT).await;
    let mut l = listener(
        Protocol::Tcp,
        443,
        vec![target("a", a.addr)],
        fast_check(Probe::Http {
            port: HEALTH_PORT,
            path: "/healthz".into(),
        }),
    );
    l.pool.proxy_protocol = true;
    let status = cloud.provider.ensure(&spec("pp", vec![l])).await.unwrap();
    let lb = lb_addr(&status, 443);

    let mut conn = Conn::open(net.client(1), lb).await.unwrap();
    let line = conn.line().await.unwrap();
    let hex = line.strip_prefix("a ").unwrap();
    let client = match conn.local {
        SocketAddr::V4(v4) => v4,
        _ => unreachable!(),
    };
    let mut expected = String::from("0d0a0d0a000d0a515549540a" /* signature */);
    expected.push_str("2111000c"); // v2 PROXY, TCP over IPv4, 12 address bytes
    for octet in client.ip().octets().iter().chain(&net.ip(1).octets()) {
        expected.push_str(&format!("{octet:02x}"));
    }
    expected.push_str(&format!("{:04x}{:04x}", client.port(), 443));
    assert_eq!(hex, expected);
    assert!(conn.echo("after the header, plain bytes").await);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_its_health_check_gets_no_traffic_until_it_recovers() {
    let net = Net::new(90, 7);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let _ha = HealthServer::start(net.target_ip(1), HEALTH_PORT).await;
    let hb = HealthServer::start(net.target_ip(2), HEALTH_PORT).await;
    let l = listener(
        Protocol::Tcp,
        80,
        vec![target("a", a.addr), target("b", b.addr)],
        fast_check(Probe::Http {
            port: HEALTH_PORT,
            path: "/healthz".into(),
        }),
    );
    let status = cloud.provider.ensure(&spec("hc", vec![l])).await.unwrap();
    let lb = lb_addr(&status, 80);
    cloud.wait_health("hc", 2, 0).await;
    let both: BTreeSet<String> = whos(net.client(1), lb, 4).await.into_iter().collect();
    assert_eq!(both.len(), 2);

    hb.set_healthy(false);
    cloud.wait_health("hc", 1, 1).await;
    assert_eq!(whos(net.client(1), lb, 6).await, vec!["a"; 6]);

    hb.set_healthy(true);
    cloud.wait_health("hc", 2, 0).await;
    let both: BTreeSet<String> = whos(net.client(1), lb, 4).await.into_iter().collect();
    assert_eq!(both, BTreeSet::from(["a".to_string(), "b".to_string()]));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refused_when_every_target_is_unhealthy() {
    let net = Net::new(90, 8);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let ha = HealthServer::start(net.target_ip(1), HEALTH_PORT).await;
    let hb = HealthServer::start(net.target_ip(2), HEALTH_PORT).await;
    ha.set_healthy(false);
    hb.set_healthy(false);
    let l = listener(
        Protocol::Tcp,
        80,
        vec![target("a", a.addr), target("b", b.addr)],
        fast_check(Probe::Http {
            port: HEALTH_PORT,
            path: "/healthz".into(),
        }),
    );
    let status = cloud.provider.ensure(&spec("down", vec![l])).await.unwrap();
    cloud.wait_health("down", 0, 2).await;
    // Not even "panic mode": targets that fail their checks (nodes without local endpoints
    // under externalTrafficPolicy: Local) get nothing.
    assert_eq!(who(net.client(1), lb_addr(&status, 80)).await, None);
    let metrics = cloud.metrics().await;
    assert!(
        metrics.lines().any(|l| l.contains("reason=\"no_target\"")
            && l.contains("lb=\"down\"")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_apply_without_dropping_established_connections() {
    let net = Net::new(90, 9);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let mut web = spec("web", vec![tcp_listener(80, &[&a])]);
    let status = cloud.provider.ensure(&web).await.unwrap();
    let lb80 = lb_addr(&status, 80);
    let lb81 = lb_addr(&status, 81);

    let mut long = Conn::open(net.client(1), lb80).await.unwrap();
    assert!(long.line().await.unwrap().starts_with("a "));

    // Target a is replaced by b, and port 81 is added.
    web = spec(
        "web",
        vec![tcp_listener(80, &[&b]), tcp_listener(81, &[&b])],
    );
    let status = cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(status.ports.len(), 2);
    assert!(status.ports.iter().all(|p| p.error.is_none()), "{status:?}");
    assert!(
        long.echo("through the update").await,
        "the connection to a removed target lives on"
    );
    cloud.wait_health("web", 1, 0).await;
    assert_eq!(whos(net.client(2), lb80, 3).await, vec!["b"; 3]);
    assert_eq!(who(net.client(2), lb81).await.as_deref(), Some("b"));

    // Port 80 is removed: it stops accepting, its connection still runs.
    web = spec("web", vec![tcp_listener(81, &[&b])]);
    cloud.provider.ensure(&web).await.unwrap();
    assert!(
        Conn::open(net.client(2), lb80).await.is_err(),
        "nothing listens on port 80"
    );
    assert!(long.echo("after the port went away").await);
    assert_eq!(who(net.client(2), lb81).await.as_deref(), Some("b"));

    // And it can come back.
    web = spec(
        "web",
        vec![tcp_listener(80, &[&a]), tcp_listener(81, &[&b])],
    );
    cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(who(net.client(2), lb80).await.as_deref(), Some("a"));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_drain_timeout_connections_to_a_removed_target_end_when_it_runs_out() {
    let net = Net::new(90, 20);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let draining = |targets: &[&TcpTarget]| {
        let mut listener = tcp_listener(80, targets);
        listener.pool.drain_timeout = Some(Duration::from_millis(800));
        spec("web", vec![listener])
    };
    let status = cloud.provider.ensure(&draining(&[&a, &b])).await.unwrap();
    let lb = lb_addr(&status, 80);
    cloud.wait_health("web", 2, 0).await;

    let mut to_a = None;
    let mut to_b = None;
    for i in 1..=4 {
        let mut conn = Conn::open(net.client(i), lb).await.unwrap();
        let greeting = conn.line().await.unwrap();
        if greeting.starts_with("a ") {
            to_a = Some(conn);
        } else {
            to_b = Some(conn);
        }
    }
    let (mut to_a, mut to_b) = (to_a.unwrap(), to_b.unwrap());

    // a leaves the pool: its connection goes on for the drain timeout, then ends.
    cloud.provider.ensure(&draining(&[&b])).await.unwrap();
    assert!(
        to_a.echo("while draining").await,
        "alive within the drain timeout"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !to_a.echo("after draining").await,
        "closed once the drain timeout ran out"
    );
    assert!(
        to_b.echo("b stays").await,
        "connections to remaining targets are untouched"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_serves_its_load_balancers_on_the_same_addresses() {
    let net = Net::new(90, 10);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("local-cloud.json");
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;

    let cloud = TestCloud::start_on(net, net.pool(1, 9), state.clone()).await;
    cloud
        .provider
        .ensure(&spec("first", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    let second = cloud
        .provider
        .ensure(&spec("second", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    cloud
        .provider
        .delete(&"first".parse().unwrap(), &owner("first"))
        .await
        .unwrap();
    assert_eq!(address_of(&second), net.ip(2));
    cloud.stop().await;
    assert!(
        Conn::open(net.client(1), lb_addr(&second, 80))
            .await
            .is_err(),
        "stopped means stopped"
    );

    let cloud = TestCloud::start_on(net, net.pool(1, 9), state).await;
    let restored = cloud
        .provider
        .get(&"second".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        restored.status.addresses, second.addresses,
        "same address after a restart"
    );
    assert_eq!(
        who(net.client(1), lb_addr(&second, 80)).await.as_deref(),
        Some("a")
    );
    // The freed address is handed out again, the restored one is not.
    let third = cloud
        .provider
        .ensure(&spec("third", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    assert_eq!(address_of(&third), net.ip(1));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_owners_load_balancer_is_never_adopted_or_deleted() {
    let net = Net::new(90, 11);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let theirs = spec("shared", vec![tcp_listener(80, &[&a])]);
    let status = cloud.provider.ensure(&theirs).await.unwrap();

    let mut ours = spec("shared", vec![tcp_listener(8080, &[&a])]);
    ours.owner.cluster_id = "another-cluster".into();
    let err = cloud.provider.ensure(&ours).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::NotOwned { name, .. } if name == "shared"),
        "{err}"
    );
    let err = cloud
        .provider
        .delete(&ours.name, &ours.owner)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::NotOwned { .. }), "{err}");

    let observed = cloud.provider.get(&theirs.name).await.unwrap().unwrap();
    assert_eq!(observed.owner, theirs.owner);
    assert_eq!(observed.status, status);
    assert_eq!(
        who(net.client(1), lb_addr(&status, 80)).await.as_deref(),
        Some("a")
    );
    assert!(
        cloud
            .provider
            .list_owned("another-cluster")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        cloud.provider.list_owned("test-cluster").await.unwrap(),
        vec![observed]
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_come_from_the_pool_until_it_is_exhausted() {
    let net = Net::new(90, 12);
    let cloud = TestCloud::start_with_pool(net, net.pool(1, 2)).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let lb = |name: &str| spec(name, vec![tcp_listener(80, &[&a])]);

    let mut pinned = lb("pinned");
    pinned.requested_address = Some(IpAddr::V4(net.ip(2)));
    assert_eq!(
        address_of(&cloud.provider.ensure(&pinned).await.unwrap()),
        net.ip(2)
    );
    let mut clash = lb("clash");
    clash.requested_address = Some(IpAddr::V4(net.ip(2)));
    assert!(matches!(
        cloud.provider.ensure(&clash).await,
        Err(ProviderError::Invalid(_))
    ));
    let mut outside = lb("outside");
    outside.requested_address = Some(IpAddr::V4(net.ip(9)));
    assert!(matches!(
        cloud.provider.ensure(&outside).await,
        Err(ProviderError::Invalid(_))
    ));

    assert_eq!(
        address_of(&cloud.provider.ensure(&lb("one")).await.unwrap()),
        net.ip(1)
    );
    let err = cloud.provider.ensure(&lb("two")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Exhausted(_)), "{err}");
    assert!(!err.is_permanent());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requesting_another_address_moves_the_load_balancer_and_frees_the_old_one() {
    let net = Net::new(90, 18);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let mut web = spec("web", vec![tcp_listener(80, &[&a])]);
    let before = cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(address_of(&before), net.ip(1));

    web.requested_address = Some(IpAddr::V4(net.ip(5)));
    let after = cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(address_of(&after), net.ip(5));
    assert_eq!(
        who(net.client(1), lb_addr(&after, 80)).await.as_deref(),
        Some("a")
    );
    assert!(
        Conn::open(net.client(1), lb_addr(&before, 80))
            .await
            .is_err()
    );
    let other = cloud
        .provider
        .ensure(&spec("other", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    assert_eq!(
        address_of(&other),
        net.ip(1),
        "the old address is free again"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_closes_connections_and_frees_the_address() {
    let net = Net::new(90, 13);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let web = spec("web", vec![tcp_listener(80, &[&a])]);
    let status = cloud.provider.ensure(&web).await.unwrap();
    let lb = lb_addr(&status, 80);
    let mut conn = Conn::open(net.client(1), lb).await.unwrap();
    assert!(conn.line().await.is_some());

    cloud.provider.delete(&web.name, &web.owner).await.unwrap();
    assert!(
        conn.closed().await,
        "the load balancer's connections are closed"
    );
    assert!(
        Conn::open(net.client(1), lb).await.is_err(),
        "and its listener"
    );
    assert_eq!(cloud.provider.get(&web.name).await.unwrap(), None);
    // Deleting what is gone succeeds.
    cloud.provider.delete(&web.name, &web.owner).await.unwrap();

    let next = cloud
        .provider
        .ensure(&spec("next", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    assert_eq!(
        address_of(&next),
        address_of(&status),
        "the freed address is reused"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserving_the_client_ip_shows_targets_the_real_client() {
    let net = Net::new(90, 14);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let mut l = tcp_listener(80, &[&a]);
    l.pool.preserve_client_ip = true;
    let status = cloud
        .provider
        .ensure(&spec("local", vec![l]))
        .await
        .unwrap();

    let mut conn = Conn::open(net.client(7), lb_addr(&status, 80))
        .await
        .unwrap();
    let line = conn.line().await.unwrap();
    let peer: SocketAddr = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(net.client(7)));

    // Without it, targets see the proxy's own source.
    let mut l = tcp_listener(80, &[&a]);
    l.pool.preserve_client_ip = false;
    cloud
        .provider
        .ensure(&spec("local", vec![l]))
        .await
        .unwrap();
    let mut conn = Conn::open(net.client(7), lb_addr(&status, 80))
        .await
        .unwrap();
    let line = conn.line().await.unwrap();
    let peer: SocketAddr = line.split(' ').nth(1).unwrap().parse().unwrap();
    assert_ne!(peer.ip(), IpAddr::V4(net.client(7)));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_cannot_be_bound_is_reported_and_the_others_are_served() {
    let net = Net::new(90, 15);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let squatter = tokio::net::TcpListener::bind((net.ip(1), 81))
        .await
        .unwrap();

    let web = spec(
        "web",
        vec![tcp_listener(80, &[&a]), tcp_listener(81, &[&a])],
    );
    let status = cloud.provider.ensure(&web).await.unwrap();
    assert_eq!(address_of(&status), net.ip(1));
    assert_eq!(status.ports[0].error, None);
    assert!(status.ports[1].error.is_some(), "{status:?}");
    assert_eq!(
        who(net.client(1), lb_addr(&status, 80)).await.as_deref(),
        Some("a")
    );

    // The same spec again retries the port once it is free.
    drop(squatter);
    let status = cloud.provider.ensure(&web).await.unwrap();
    assert!(status.ports.iter().all(|p| p.error.is_none()), "{status:?}");
    assert_eq!(
        who(net.client(1), lb_addr(&status, 81)).await.as_deref(),
        Some("a")
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_and_the_api_answers_health_and_metrics() {
    let net = Net::new(90, 16);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;

    let mut dup = spec(
        "dup",
        vec![tcp_listener(80, &[&a]), tcp_listener(80, &[&a])],
    );
    assert!(matches!(
        cloud.provider.ensure(&dup).await,
        Err(ProviderError::Invalid(_))
    ));
    // Targets off loopback would make the data plane dial a real network.
    let remote = SocketAddr::from(([192, 0, 2, 1], NODE_PORT));
    dup = spec(
        "remote",
        vec![listener(
            Protocol::Tcp,
            80,
            vec![target("far", remote)],
            fast_check(Probe::Tcp { port: NODE_PORT }),
        )],
    );
    let err = cloud.provider.ensure(&dup).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("loopback")),
        "{err}"
    );
    assert!(
        cloud
            .provider
            .list_owned("test-cluster")
            .await
            .unwrap()
            .is_empty()
    );

    let (status, body) = http_get(cloud.daemon.api_addr(), "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    cloud
        .provider
        .ensure(&spec("web", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    cloud.wait_health("web", 1, 0).await;
    who(net.client(1), SocketAddr::from((net.ip(1), 80)))
        .await
        .unwrap();
    let metrics = cloud.metrics().await;
    assert!(metrics.contains("portico_local_cloud_connections_accepted_total{lb=\"web\",listener=\"tcp-80\",protocol=\"TCP\",port=\"80\"} "), "{metrics}");
    assert!(metrics.contains("# TYPE portico_local_cloud_connections_active gauge"));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_is_unavailable() {
    let net = Net::new(90, 17);
    // Nothing listens here.
    let provider = portico_local_cloud::LocalCloudProvider::new(SocketAddr::from((net.ip(250), 1)));
    let err = provider.get(&"web".parse().unwrap()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
    assert_eq!(provider.name(), "local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_with_half_closes_all_complete() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let net = Net::new(90, 19);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let b = TcpTarget::start("b", net.target_ip(2), NODE_PORT, Greeting::Plain).await;
    let status = cloud
        .provider
        .ensure(&spec("busy", vec![tcp_listener(80, &[&a, &b])]))
        .await
        .unwrap();
    let lb = lb_addr(&status, 80);

    let clients: Vec<_> = (0..200u32)
        .map(|i| {
            let source = net.client((i % 40) as u8);
            tokio::spawn(async move {
                let mut stream = connect_from(source, lb).await.unwrap();
                let payload = format!("payload {i} {}\n", "x".repeat(100_000));
                stream.write_all(payload.as_bytes()).await.unwrap();
                // Half-close: the target still answers, then closes, and the proxy passes
                // both ends of stream on.
                stream.shutdown().await.unwrap();
                let mut answer = Vec::new();
                tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
                    .await
                    .expect("the proxy closes after the target")
                    .unwrap();
                let answer = String::from_utf8(answer).unwrap();
                let (greeting, echoed) = answer.split_once('\n').unwrap();
                assert!(
                    greeting.starts_with("a ") || greeting.starts_with("b "),
                    "{greeting}"
                );
                assert_eq!(echoed, payload);
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    eventually("every connection is closed", || async {
        cloud.metrics().await.lines().any(|l| {
            l.starts_with("portico_local_cloud_connections_active{lb=\"busy\"") && l.ends_with(" 0")
        })
    })
    .await;
    let metrics = cloud.metrics().await;
    let accepted = metrics
        .lines()
        .find(|l| l.starts_with("portico_local_cloud_connections_accepted_total{lb=\"busy\""))
        .unwrap();
    assert!(accepted.ends_with(" 200"), "{accepted}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_a_part_of_the_pool_places_new_load_balancers_only_there() {
    let net = Net::new(90, 21);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let tenant = cloud.provider.clone().with_pool(net.pool(5, 6));

    let first = tenant
        .ensure(&spec("tenant-1", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    let second = tenant
        .ensure(&spec("tenant-2", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    assert_eq!(
        (address_of(&first), address_of(&second)),
        (net.ip(5), net.ip(6))
    );
    assert_eq!(
        who(net.client(1), lb_addr(&first, 80)).await.as_deref(),
        Some("a")
    );
    let full = tenant
        .ensure(&spec("tenant-3", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap_err();
    assert!(
        matches!(full, ProviderError::Exhausted(_)),
        "its part is full even though the pool is not: {full:?}"
    );
    // Everyone else still gets the rest of the pool.
    let other = cloud
        .provider
        .ensure(&spec("other", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    assert_eq!(address_of(&other), net.ip(1));

    let outside = cloud.provider.clone().with_pool(net.pool(8, 20));
    let err = outside
        .ensure(&spec("outside", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("not inside the cloud's pool")),
        "{err:?}"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_refuses_connections_is_skipped_before_its_checks_notice() {
    let net = Net::new(90, 22);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    // b's health endpoint says healthy while nothing listens on its traffic port.
    let ha = HealthServer::start(net.target_ip(1), HEALTH_PORT).await;
    let hb = HealthServer::start(net.target_ip(2), HEALTH_PORT).await;
    let refusing = SocketAddr::from((net.target_ip(2), NODE_PORT));
    let l = listener(
        Protocol::Tcp,
        80,
        vec![target("b", refusing), target("a", a.addr)],
        fast_check(Probe::Http {
            port: HEALTH_PORT,
            path: "/healthz".into(),
        }),
    );
    let status = cloud.provider.ensure(&spec("half", vec![l])).await.unwrap();
    cloud.wait_health("half", 2, 0).await;

    let names = whos(net.client(1), lb_addr(&status, 80), 6).await;
    assert_eq!(names, vec!["a"; 6], "every connection lands on a");
    drop((ha, hb));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_arrive_intact_both_ways_and_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SIZE: usize = 8 << 20;
    let net = Net::new(90, 23);
    let cloud = TestCloud::start(net).await;
    let a = TcpTarget::start("a", net.target_ip(1), NODE_PORT, Greeting::Plain).await;
    let status = cloud
        .provider
        .ensure(&spec("bulk", vec![tcp_listener(80, &[&a])]))
        .await
        .unwrap();
    let lb = lb_addr(&status, 80);

    // Large enough that the proxy moves most of it in the kernel (Linux), in a pattern that
    // differs at every offset and per connection, so a lost, repeated or misplaced page shows.
    let clients: Vec<_> = (0..4u32)
        .map(|c| {
            let source = net.client(c as u8 + 1);
            tokio::spawn(async move {
                let data: Vec<u8> = (0..SIZE as u32)
                    .map(|i| ((i ^ (c << 24)).wrapping_mul(2_654_435_761) >> 11) as u8)
                    .collect();
                let stream = connect_from(source, lb).await.unwrap();
                let (mut read, mut write) = stream.into_split();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    write.write_all(&sent).await.unwrap();
                    write.shutdown().await.unwrap();
                });
                let mut answer = Vec::new();
                tokio::time::timeout(WAIT, read.read_to_end(&mut answer))
                    .await
                    .expect("the echo ends after the client's half-close")
                    .unwrap();
                writer.await.unwrap();
                let newline = answer.iter().position(|&b| b == b'\n').unwrap();
                assert!(answer.starts_with(b"a "));
                let echoed = &answer[newline + 1..];
                assert_eq!(echoed.len(), SIZE);
                assert!(
                    echoed == data,
                    "connection {c}: the echo differs from what was sent"
                );
                answer.len() as u64
            })
        })
        .collect();
    let mut to_clients = 0;
    for client in clients {
        to_clients += client.await.unwrap();
    }
    let counter = |direction: &str| {
        format!(
            "portico_local_cloud_bytes_total{{lb=\"bulk\",listener=\"tcp-80\",protocol=\"TCP\",port=\"80\",direction=\"{direction}\"}} "
        )
    };
    eventually("every connection is counted", || async {
        let metrics = cloud.metrics().await;
        metrics.contains(&format!("{}{}\n", counter("to_target"), 4 * SIZE))
            && metrics.contains(&format!("{}{to_clients}\n", counter("to_client")))
    })
    .await;
    cloud.stop().await;
}
