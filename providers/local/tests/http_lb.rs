//! End-to-end tests of the local cloud's L7 (HTTP/HTTPS) load balancers, with real sockets
//! on loopback. Each test has its own 127.100.y.0/24.

mod common;
mod l7;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use l7::*;
use portico_provider::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn create(cloud: &TestCloud, spec: &LoadBalancerSpec) -> std::net::Ipv4Addr {
    let status = cloud.provider.ensure(spec).await.unwrap();
    assert!(status.ports.iter().all(|p| p.error.is_none()), "{status:?}");
    address_of(&status)
}

fn at(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_reach_two_backends_through_one_address() {
    let net = Net::new(100, 1);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let b = HttpTarget::start("b", net.target_ip(2)).await;
    let spec = app_spec(
        "hosts",
        app(
            routes(
                vec![
                    host(Some("a.example"), vec![prefix("/", "a")]),
                    host(Some("*.b.example"), vec![prefix("/", "b")]),
                ],
                None,
            ),
            vec![backend("a", &[&a]), backend("b", &[&b])],
        ),
    );
    let status = cloud.provider.ensure(&spec).await.unwrap();
    assert_eq!(
        status.ports,
        vec![PortStatus {
            protocol: Protocol::Tcp,
            port: 80,
            error: None
        }]
    );
    let lb = at(address_of(&status), 80);
    cloud.wait_health("hosts", 2, 0).await;

    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("a.example", "/x", &[]).await.target(), "a");
    assert_eq!(conn.get("A.Example:80", "/", &[]).await.target(), "a");
    assert_eq!(conn.get("www.b.example", "/", &[]).await.target(), "b");
    let unknown = conn.get("c.example", "/", &[]).await;
    assert_eq!(unknown.status, 404, "no rule and no default backend");

    let metrics = cloud.metrics().await;
    assert!(
        metrics.contains(
            "portico_local_cloud_http_requests_total{lb=\"hosts\",backend=\"a\",class=\"2xx\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "portico_local_cloud_http_requests_total{lb=\"hosts\",backend=\"\",class=\"4xx\"} 1"
        ),
        "{metrics}"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_beats_prefix_and_the_longest_prefix_wins() {
    let net = Net::new(100, 2);
    let cloud = TestCloud::start(net).await;
    let exact_t = HttpTarget::start("exact", net.target_ip(1)).await;
    let prefix_t = HttpTarget::start("prefix", net.target_ip(2)).await;
    let deep_t = HttpTarget::start("deep", net.target_ip(3)).await;
    let root_t = HttpTarget::start("root", net.target_ip(4)).await;
    let spec = app_spec(
        "paths",
        app(
            routes(
                vec![host(
                    None,
                    vec![
                        prefix("/", "root"),
                        prefix("/api", "prefix"),
                        exact("/api", "exact"),
                        prefix("/api/v2", "deep"),
                    ],
                )],
                None,
            ),
            vec![
                backend("exact", &[&exact_t]),
                backend("prefix", &[&prefix_t]),
                backend("deep", &[&deep_t]),
                backend("root", &[&root_t]),
            ],
        ),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("paths", 4, 0).await;
    let mut conn = H1::connect(net.client(1), lb).await;
    for (path, want) in [
        ("/api", "exact"),
        ("/api/", "prefix"),
        ("/api/users?id=1", "prefix"),
        ("/api/v2/things", "deep"),
        ("/api/v2", "deep"),
        ("/apiary", "root"),
        ("/", "root"),
    ] {
        let reply = conn.get("any.example", path, &[]).await;
        assert_eq!(reply.target(), want, "{path}");
    }
    // The target sees the path and query as sent.
    let reply = conn.get("any.example", "/api/users?id=1", &[]).await;
    assert_eq!(reply.request_line(), "GET /api/users?id=1");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_go_to_the_default_backend_and_without_one_get_404() {
    let net = Net::new(100, 3);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let d = HttpTarget::start("fallback", net.target_ip(2)).await;
    let rules = vec![host(Some("a.example"), vec![exact("/only", "a")])];
    let mut spec = app_spec(
        "default",
        app(
            routes(rules.clone(), Some("fallback")),
            vec![backend("a", &[&a]), backend("fallback", &[&d])],
        ),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("default", 2, 0).await;
    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("a.example", "/only", &[]).await.target(), "a");
    assert_eq!(
        conn.get("a.example", "/other", &[]).await.target(),
        "fallback"
    );
    assert_eq!(
        conn.get("b.example", "/only", &[]).await.target(),
        "fallback"
    );

    // Without the default backend the same requests find nothing; the update applies on the
    // same keep-alive connection.
    let Frontend::Application(app) = &mut spec.frontend else {
        unreachable!()
    };
    app.routes = routes(rules, None);
    create(&cloud, &spec).await;
    let reply = conn.get("a.example", "/other", &[]).await;
    assert_eq!(reply.status, 404);
    assert!(!reply.body.is_empty(), "a short explanation");
    assert_eq!(conn.get("a.example", "/only", &[]).await.target(), "a");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_a_healthy_target_answers_503() {
    let net = Net::new(100, 4);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    // Nothing listens on the second backend's target.
    let dead = HttpTarget::start("dead", net.target_ip(2)).await;
    let dead_backend = backend("dead", &[&dead]);
    drop(dead);
    let spec = app_spec(
        "unhealthy",
        app(
            routes(
                vec![host(None, vec![prefix("/", "a"), prefix("/dead", "dead")])],
                None,
            ),
            vec![backend("a", &[&a]), dead_backend],
        ),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("unhealthy", 1, 1).await;
    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("x", "/dead/x", &[]).await.status, 503);
    assert_eq!(conn.get("x", "/alive", &[]).await.target(), "a");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_keep_alive_connection_are_balanced_round_robin() {
    let net = Net::new(100, 5);
    let cloud = TestCloud::start(net).await;
    let targets = [
        HttpTarget::start("t1", net.target_ip(1)).await,
        HttpTarget::start("t2", net.target_ip(2)).await,
        HttpTarget::start("t3", net.target_ip(3)).await,
    ];
    let refs: Vec<&HttpTarget> = targets.iter().collect();
    let spec = app_spec(
        "rr",
        app(routes(vec![], Some("web")), vec![backend("web", &refs)]),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("rr", 3, 0).await;
    let all: BTreeSet<String> = ["t1", "t2", "t3"].map(String::from).into();

    let mut h1 = H1::connect(net.client(1), lb).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(h1.get("rr.example", "/", &[]).await.target().to_string());
    }
    assert_eq!(
        seen.iter().cloned().collect::<BTreeSet<_>>(),
        all,
        "{seen:?}"
    );
    assert_eq!(seen[0..3], seen[3..6], "in turn: {seen:?}");

    let mut h2 = H2::over(tcp_from(net.client(2), lb).await).await;
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let reply = h2.get("rr.example", "/");
        let reply = reply.await;
        assert_eq!(reply.status, 200);
        // The HTTP/1.1 target gets the :authority as Host.
        assert_eq!(reply.received("host"), Some("rr.example"));
        seen.insert(reply.target().to_string());
    }
    assert_eq!(seen, all);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_reached_over_kept_alive_connections_reused_across_requests_and_clients() {
    let net = Net::new(100, 21);
    let cloud = TestCloud::start(net).await;
    let targets = [
        HttpTarget::start("t1", net.target_ip(1)).await,
        HttpTarget::start("t2", net.target_ip(2)).await,
    ];
    let refs: Vec<&HttpTarget> = targets.iter().collect();
    let spec = app_spec(
        "pooled",
        app(routes(vec![], Some("web")), vec![backend("web", &refs)]),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("pooled", 2, 0).await;

    // One request at a time, from two clients in turn, over their own keep-alive
    // connections. Each proxy worker keeps its own pool and the two clients may be served by
    // different workers, so a target needs at most one connection per worker for all 44.
    let mut first = H1::connect(net.client(1), lb).await;
    let mut second = H1::connect(net.client(2), lb).await;
    for _ in 0..20 {
        assert_eq!(first.get("pooled.example", "/", &[]).await.status, 200);
        assert_eq!(second.get("pooled.example", "/", &[]).await.status, 200);
    }
    // A response with no body (HEAD) gives its connection back as well.
    for _ in 0..4 {
        let head = first.request("HEAD", "pooled.example", "/").await;
        assert_eq!(head.status, 200);
    }
    let workers = portico_local_cloud::dataplane::workers::get().count();
    let used = targets.each_ref().map(HttpTarget::used_connections);
    assert!(
        used.iter().all(|&n| (1..=workers.min(2)).contains(&n)),
        "44 requests in turn reuse one connection per target and worker: {used:?}"
    );
    cloud.stop().await;
}

/// A target that answers each request on a kept-alive connection, then closes the connection
/// once it has been idle for `idle`, as servers with a keep-alive timeout do.
async fn target_closing_idle_connections(ip: std::net::Ipv4Addr, idle: Duration) -> SocketAddr {
    raw_server(ip, move |mut stream| async move {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 1024];
            match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                // Idle too long, or the peer is gone: close.
                _ => return,
            }
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// A target on `ip` that serves each connection with `serve`.
async fn raw_server<F, Fut>(ip: std::net::Ipv4Addr, serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind((ip, TARGET_PORT))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = common::accept(&listener).await;
            tokio::spawn(serve(stream));
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_target_closed_while_pooled_is_not_used_again() {
    let net = Net::new(100, 19);
    let cloud = TestCloud::start(net).await;
    let addr = target_closing_idle_connections(net.target_ip(1), Duration::from_millis(50)).await;
    let web = backend_at("web", &[("closing", addr)]);
    let spec = app_spec("closing", app(routes(vec![], Some("web")), vec![web]));
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("closing", 1, 0).await;

    let mut client = H1::connect(net.client(1), lb).await;
    for _ in 0..5 {
        assert_eq!(client.get("closing.example", "/", &[]).await.status, 200);
        // The target closes the pooled connection meanwhile; the next request must not fail.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_affinity_pins_a_client_and_gives_new_clients_a_cookie() {
    let net = Net::new(100, 6);
    let cloud = TestCloud::start(net).await;
    let targets = [
        HttpTarget::start("t1", net.target_ip(1)).await,
        HttpTarget::start("t2", net.target_ip(2)).await,
        HttpTarget::start("t3", net.target_ip(3)).await,
    ];
    let refs: Vec<&HttpTarget> = targets.iter().collect();
    let mut web = backend("web", &refs);
    web.pool.affinity = SessionAffinity::Cookie {
        name: "PORTICO".into(),
        ttl: Duration::from_secs(3600),
    };
    let spec = app_spec("sticky", app(routes(vec![], Some("web")), vec![web]));
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("sticky", 3, 0).await;

    let mut conn = H1::connect(net.client(1), lb).await;
    let first = conn.get("s.example", "/", &[]).await;
    let set_cookie = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set_cookie.starts_with("PORTICO=")
            && set_cookie.ends_with("; Path=/; Max-Age=3600; HttpOnly"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    assert!(
        !cookie.contains("127."),
        "the cookie does not reveal the target: {cookie}"
    );
    let pinned = first.target().to_string();
    for _ in 0..6 {
        let reply = conn
            .get(
                "s.example",
                "/",
                &[("cookie", &format!("other=1; {cookie}"))],
            )
            .await;
        assert_eq!(reply.target(), pinned);
        assert!(!reply.headers.contains_key("set-cookie"), "already pinned");
    }
    // Without the cookie requests are spread, each with a cookie naming its target.
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let reply = conn.get("s.example", "/", &[]).await;
        assert!(reply.headers.contains_key("set-cookie"));
        seen.insert(reply.target().to_string());
    }
    assert_eq!(seen.len(), 3);
    // A cookie naming no target is replaced.
    let reply = conn
        .get("s.example", "/", &[("cookie", "PORTICO=0000000000000000")])
        .await;
    assert!(reply.headers.contains_key("set-cookie"));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_learn_the_client_through_x_forwarded_headers() {
    let net = Net::new(100, 7);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let spec = app_spec(
        "fwd",
        app(routes(vec![], Some("a")), vec![backend("a", &[&a])]),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("fwd", 1, 0).await;
    let mut conn = H1::connect(net.client(3), lb).await;
    let reply = conn
        .get(
            "Shop.Example:80",
            "/",
            &[
                ("x-forwarded-for", "10.1.2.3"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
    let client = net.client(3).to_string();
    assert_eq!(
        reply.received("x-forwarded-for"),
        Some(format!("10.1.2.3, {client}").as_str())
    );
    assert_eq!(reply.received("x-forwarded-proto"), Some("http"));
    assert_eq!(reply.received("x-forwarded-host"), Some("Shop.Example:80"));
    assert_eq!(
        reply.received("host"),
        Some("Shop.Example:80"),
        "Host kept as sent"
    );
    assert_eq!(
        reply.received("x-hop"),
        None,
        "named by Connection: hop-by-hop"
    );
    assert_eq!(reply.received("x-end-to-end"), Some("kept"));
    cloud.stop().await;
}

fn https_app(
    certificates: Vec<Certificate>,
    redirect: bool,
    backends: Vec<Backend>,
) -> ApplicationFrontend {
    let default = backends[0].name.clone();
    ApplicationFrontend {
        https: Some(HttpsListener {
            port: 443,
            certificates,
            min_tls_version: Default::default(),
        }),
        redirect_to_https: redirect,
        ..app(routes(vec![], Some(&default)), backends)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_chooses_the_certificate_by_sni() {
    let net = Net::new(100, 8);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let shop = TestCert::new(&["shop.example"]);
    let wild = TestCert::new(&["*.api.example"]);
    let spec = app_spec(
        "sni",
        https_app(
            vec![
                shop.certificate("default/shop", &["shop.example"]),
                wild.certificate("default/api", &["*.api.example"]),
            ],
            false,
            vec![backend("a", &[&a])],
        ),
    );
    let status = cloud.provider.ensure(&spec).await.unwrap();
    let ports: Vec<u16> = status.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![80, 443]);
    let lb = at(address_of(&status), 443);
    cloud.wait_health("sni", 1, 0).await;

    let client = tls_client(&[&shop, &wild], &[b"http/1.1"]);
    let (tls, der) = tls_connect(&client, net.client(1), lb, "shop.example").await;
    assert_eq!(der, shop.der);
    let mut conn = H1::over(tls).await;
    let reply = conn.get("shop.example", "/", &[]).await;
    assert_eq!(reply.target(), "a");
    assert_eq!(reply.received("x-forwarded-proto"), Some("https"));

    let (_, der) = tls_connect(&client, net.client(1), lb, "v1.api.example").await;
    assert_eq!(der, wild.der);
    // An unknown name gets the first certificate, which the client then rejects; h2 is
    // negotiated over ALPN for clients offering it.
    let h2_client = tls_client(&[&shop, &wild], &[b"h2", b"http/1.1"]);
    let (tls, _) = tls_connect(&h2_client, net.client(1), lb, "v2.api.example").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = H2::over(tls).await;
    assert_eq!(h2.get("v2.api.example", "/").await.target(), "a");
    cloud.stop().await;
}

/// Whether a client offering only TLS 1.2 completes a handshake with `lb`.
async fn tls12_handshake_succeeds(
    cert: &TestCert,
    source: std::net::Ipv4Addr,
    lb: std::net::SocketAddr,
) -> bool {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert.der.clone()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tcp_from(source, lb).await;
    let name = rustls::pki_types::ServerName::try_from("shop.example").unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("the handshake ends in time")
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimum_tls_version_of_1_3_refuses_tls_1_2_clients_from_the_next_handshake_on() {
    let net = Net::new(100, 18);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let shop = TestCert::new(&["shop.example"]);
    let mut app = https_app(
        vec![shop.certificate("default/shop", &["shop.example"])],
        false,
        vec![backend("a", &[&a])],
    );
    let status = cloud
        .provider
        .ensure(&app_spec("tls", app.clone()))
        .await
        .unwrap();
    let lb = at(address_of(&status), 443);
    cloud.wait_health("tls", 1, 0).await;
    assert!(
        tls12_handshake_succeeds(&shop, net.client(1), lb).await,
        "1.2 by default"
    );

    app.https.as_mut().unwrap().min_tls_version = portico_provider::TlsVersion::Tls13;
    cloud.provider.ensure(&app_spec("tls", app)).await.unwrap();
    assert!(
        !tls12_handshake_succeeds(&shop, net.client(1), lb).await,
        "1.2 refused"
    );
    let client = tls_client(&[&shop], &[b"http/1.1"]);
    let (tls, _) = tls_connect(&client, net.client(1), lb, "shop.example").await;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut conn = H1::over(tls).await;
    assert_eq!(conn.get("shop.example", "/", &[]).await.target(), "a");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_handshakes_while_open_connections_continue() {
    let net = Net::new(100, 9);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let old = TestCert::new(&["shop.example"]);
    let new = TestCert::new(&["shop.example"]);
    let backends = vec![backend("a", &[&a])];
    let spec = app_spec(
        "rotate",
        https_app(
            vec![old.certificate("default/shop", &["shop.example"])],
            false,
            backends.clone(),
        ),
    );
    let lb = at(create(&cloud, &spec).await, 443);
    cloud.wait_health("rotate", 1, 0).await;
    let client = tls_client(&[&old, &new], &[b"http/1.1"]);
    let (tls, der) = tls_connect(&client, net.client(1), lb, "shop.example").await;
    assert_eq!(der, old.der);
    let mut established = H1::over(tls).await;
    assert_eq!(established.get("shop.example", "/", &[]).await.status, 200);

    let rotated = app_spec(
        "rotate",
        https_app(
            vec![new.certificate("default/shop", &["shop.example"])],
            false,
            backends,
        ),
    );
    create(&cloud, &rotated).await;
    // A fresh client: the first one would resume its TLS session and see no certificate.
    let fresh = tls_client(&[&old, &new], &[b"http/1.1"]);
    let (_, der) = tls_connect(&fresh, net.client(2), lb, "shop.example").await;
    assert_eq!(der, new.der, "new handshakes get the new certificate");
    for _ in 0..3 {
        assert_eq!(established.get("shop.example", "/", &[]).await.status, 200);
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https() {
    let net = Net::new(100, 10);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let cert = TestCert::new(&["shop.example"]);
    let mut app = https_app(
        vec![cert.certificate("default/shop", &[])],
        true,
        vec![backend("a", &[&a])],
    );
    let spec = app_spec("redirect", app.clone());
    let ip = create(&cloud, &spec).await;
    cloud.wait_health("redirect", 1, 0).await;
    let reply = get_once(net.client(1), at(ip, 80), "shop.example", "/cart?item=7").await;
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.headers["location"],
        "https://shop.example/cart?item=7"
    );

    // Another HTTPS port shows in the location; HTTPS itself serves.
    app.https.as_mut().unwrap().port = 8443;
    create(&cloud, &app_spec("redirect", app)).await;
    let reply = get_once(net.client(1), at(ip, 80), "shop.example:80", "/").await;
    assert_eq!(reply.headers["location"], "https://shop.example:8443/");
    let client = tls_client(&[&cert], &[b"http/1.1"]);
    let (tls, _) = tls_connect(&client, net.client(1), at(ip, 8443), "shop.example").await;
    let mut conn = H1::over(tls).await;
    assert_eq!(conn.get("shop.example", "/", &[]).await.target(), "a");
    // Port 443 is no longer served.
    assert!(tokio::net::TcpStream::connect(at(ip, 443)).await.is_err());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_switched_and_tunnelled_both_ways() {
    let net = Net::new(100, 11);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("ws", net.target_ip(1)).await;
    let spec = app_spec(
        "upgrade",
        app(routes(vec![], Some("ws")), vec![backend("ws", &[&a])]),
    );
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("upgrade", 1, 0).await;

    let mut stream = tcp_from(net.client(1), lb).await;
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    // The 101 head, then the target's greeting on the switched connection.
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\nws\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in ["hello", "again"] {
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, msg.as_bytes());
    }
    // Deleting the load balancer closes the tunnel too.
    cloud
        .provider
        .delete(&spec.name, &spec.owner)
        .await
        .unwrap();
    let end = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(tokio::net::TcpStream::connect(lb).await.is_err());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_slower_than_the_request_timeout_gets_504_and_a_dead_one_502() {
    let net = Net::new(100, 16);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let mut app = app(routes(vec![], Some("a")), vec![backend("a", &[&a])]);
    app.timeouts.request = SLOW / 4;
    let lb = at(create(&cloud, &app_spec("timeouts", app)).await, 80);
    cloud.wait_health("timeouts", 1, 0).await;
    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("x", "/slow", &[]).await.status, 504);
    assert_eq!(
        conn.get("x", "/", &[]).await.status,
        200,
        "the connection stays usable"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_but_a_slow_request_is_not_idle() {
    let net = Net::new(100, 22);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let mut app = app(routes(vec![], Some("a")), vec![backend("a", &[&a])]);
    app.timeouts.idle = SLOW / 4;
    let lb = at(create(&cloud, &app_spec("idle", app)).await, 80);
    cloud.wait_health("idle", 1, 0).await;

    // In flight for four idle periods: answered, not cut off.
    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("x", "/slow", &[]).await.status, 200);

    // Answered, then nothing more: the proxy closes the connection.
    let mut idle = tcp_from(net.client(2), lb).await;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, idle.read_to_end(&mut answer))
        .await
        .expect("an idle connection was kept open")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A request head that never completes does not hold the connection either.
    let mut trickle = tcp_from(net.client(3), lb).await;
    trickle.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let mut rest = Vec::new();
    // Closed (a FIN or a reset, either ends the read) rather than waited on.
    let _closed = tokio::time::timeout(WAIT, trickle.read_to_end(&mut rest))
        .await
        .expect("a half-sent request head kept the connection open");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_closed_after_the_request_timeout() {
    let net = Net::new(100, 24);
    let cloud = TestCloud::start(net).await;
    // No route and no default backend: every request gets the proxy's own 404.
    let mut app = app(routes(vec![], None), vec![]);
    app.timeouts.request = SLOW / 4;
    let lb = at(create(&cloud, &app_spec("unread", app)).await, 80);

    // A small receive window, so the proxy's writes stall after a few dozen answers.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::from((net.client(1), 0))).unwrap();
    let stream = socket.connect(lb).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const REQUESTS: usize = 50_000;
    let sending = tokio::spawn(async move {
        let requests = b"GET / HTTP/1.1\r\nHost: nobody\r\n\r\n".repeat(REQUESTS);
        let _ = writer.write_all(&requests).await;
        writer
    });

    // Not reading for four request timeouts, then reading what is left.
    tokio::time::sleep(SLOW).await;
    let mut answers = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    sending.abort();
    let answered = answers.windows(12).filter(|w| w == b"HTTP/1.1 404").count();
    assert!(
        closed.is_ok(),
        "the connection stayed open ({answered} answers read)"
    );
    assert!(answered < REQUESTS, "every request was answered");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_refuses_connections_gets_502() {
    let net = Net::new(100, 17);
    let cloud = TestCloud::start(net).await;
    // Its health endpoint says yes, but nothing serves the target port.
    let _health = HealthServer::start(net.target_ip(1), 10256).await;
    let mut gone = backend("gone", &[]);
    gone.pool.targets = vec![target(
        "gone",
        SocketAddr::from((net.target_ip(1), TARGET_PORT)),
    )];
    gone.pool.health_check = fast_check(Probe::Http {
        port: 10256,
        path: "/healthz".into(),
    });
    let app = app(routes(vec![], Some("gone")), vec![gone]);
    let lb = at(create(&cloud, &app_spec("refused", app)).await, 80);
    cloud.wait_health("refused", 1, 0).await;
    let mut conn = H1::connect(net.client(1), lb).await;
    assert_eq!(conn.get("x", "/", &[]).await.status, 502);
    assert_eq!(
        conn.get("x", "/", &[]).await.status,
        502,
        "the client connection stays"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_does_not_fail_a_request_in_flight() {
    let net = Net::new(100, 12);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let b = HttpTarget::start("b", net.target_ip(2)).await;
    let backends = vec![backend("a", &[&a]), backend("b", &[&b])];
    let spec = app_spec("inflight", app(routes(vec![], Some("a")), backends.clone()));
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("inflight", 2, 0).await;

    let mut conn = H1::connect(net.client(1), lb).await;
    let slow = tokio::spawn(async move {
        let reply = conn.get("x", "/slow", &[]).await;
        (reply, conn)
    });
    tokio::time::sleep(SLOW / 4).await;
    // Now everything goes to b, and a is gone from the load balancer altogether.
    let changed = app_spec(
        "inflight",
        app(routes(vec![], Some("b")), vec![backends[1].clone()]),
    );
    create(&cloud, &changed).await;
    let (reply, mut conn) = slow.await.unwrap();
    assert_eq!((reply.status, reply.target()), (200, "a"));
    // The same connection's next request follows the new routes.
    assert_eq!(conn.get("x", "/", &[]).await.target(), "b");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_serves_its_http_load_balancer_on_the_same_address() {
    let net = Net::new(100, 13);
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let cloud = TestCloud::start_on(net, net.pool(1, 9), state_file.clone()).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let cert = TestCert::new(&["shop.example"]);
    let spec = app_spec(
        "restart",
        https_app(
            vec![cert.certificate("default/shop", &["shop.example"])],
            false,
            vec![backend("a", &[&a])],
        ),
    );
    let ip = create(&cloud, &spec).await;
    cloud.wait_health("restart", 1, 0).await;
    assert_eq!(
        get_once(net.client(1), at(ip, 80), "x", "/").await.target(),
        "a"
    );
    cloud.stop().await;

    let cloud = TestCloud::start_on(net, net.pool(1, 9), state_file).await;
    let observed = cloud.provider.get(&spec.name).await.unwrap().unwrap();
    assert_eq!(address_of(&observed.status), ip);
    cloud.wait_health("restart", 1, 0).await;
    assert_eq!(
        get_once(net.client(1), at(ip, 80), "x", "/").await.target(),
        "a"
    );
    let client = tls_client(&[&cert], &[b"http/1.1"]);
    let (tls, _) = tls_connect(&client, net.client(1), at(ip, 443), "shop.example").await;
    assert_eq!(
        H1::over(tls)
            .await
            .get("shop.example", "/", &[])
            .await
            .target(),
        "a"
    );
    // Ensuring the same spec again changes nothing.
    assert_eq!(address_of(&cloud.provider.ensure(&spec).await.unwrap()), ip);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ranges_apply_to_http_clients() {
    let net = Net::new(100, 15);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let mut spec = app_spec(
        "ranges",
        app(routes(vec![], Some("a")), vec![backend("a", &[&a])]),
    );
    // 127.100.15.48/28 holds clients .50-.63.
    spec.source_ranges = vec!["127.100.15.48/28".parse().unwrap()];
    let lb = at(create(&cloud, &spec).await, 80);
    cloud.wait_health("ranges", 1, 0).await;
    assert_eq!(get_once(net.client(1), lb, "x", "/").await.target(), "a");
    assert!(
        refused(net.ip(70), lb).await,
        "127.100.15.70 is outside the range"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_http_specs_are_rejected() {
    let net = Net::new(100, 14);
    let cloud = TestCloud::start(net).await;
    let a = HttpTarget::start("a", net.target_ip(1)).await;
    let invalid = |spec: LoadBalancerSpec, needle: &'static str| {
        let provider = cloud.provider.clone();
        async move {
            let err = provider.ensure(&spec).await.unwrap_err();
            assert!(
                matches!(&err, ProviderError::Invalid(m) if m.contains(needle)),
                "{needle}: {err}"
            );
        }
    };
    invalid(
        app_spec(
            "unknown",
            app(routes(vec![], Some("nope")), vec![backend("a", &[&a])]),
        ),
        "\"nope\"",
    )
    .await;
    let mut named = app_spec(
        "named",
        app(routes(vec![], Some("a")), vec![backend("a", &[&a])]),
    );
    named.requested_address_name = Some("shop-ip".into());
    invalid(named, "named addresses").await;
    let reference = Certificate {
        name: "acm".into(),
        hosts: vec![],
        source: CertificateSource::Reference {
            id: "arn:aws:acm:cert".into(),
        },
    };
    invalid(
        app_spec(
            "reference",
            https_app(vec![reference], false, vec![backend("a", &[&a])]),
        ),
        "the local cloud needs PEM certificates",
    )
    .await;
    let garbage = Certificate {
        name: "bad".into(),
        hosts: vec![],
        source: CertificateSource::Pem {
            chain: "not a certificate".into(),
            key: "not a key".into(),
        },
    };
    invalid(
        app_spec(
            "garbage",
            https_app(vec![garbage], false, vec![backend("a", &[&a])]),
        ),
        "certificate \"bad\"",
    )
    .await;
    let mut cookie = backend("a", &[&a]);
    cookie.pool.affinity = SessionAffinity::Cookie {
        name: "bad name".into(),
        ttl: Duration::from_secs(60),
    };
    invalid(
        app_spec("cookie", app(routes(vec![], Some("a")), vec![cookie])),
        "cookie name",
    )
    .await;
    assert!(
        cloud
            .provider
            .list_owned("test-cluster")
            .await
            .unwrap()
            .is_empty()
    );
    cloud.stop().await;
}

/// A target speaking raw HTTP/1.1, answering by path: `/length` (with hop-by-hop headers,
/// one named by `Connection`), `/chunked`, `/close` (a body that runs to the close), `/echo`
/// (the request head it got, as the body), and a request with a body gets its length back.
async fn raw_target(ip: std::net::Ipv4Addr) -> SocketAddr {
    raw_server(ip, |mut stream| async move {
        let mut buf = Vec::new();
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
                continue;
            };
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the body was cut short");
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + length);
            let path = head.split(' ').nth(1).unwrap().to_string();
            let answer = match path.as_str() {
                _ if length > 0 => {
                    let body = format!("got {length} bytes");
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                }
                "/length" => "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\nContent-Length: 5\r\n\r\nhello".to_string(),
                "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nTrailer: t\r\n\r\n".to_string(),
                "/close" => {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the close").await;
                    return;
                }
                _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}", head.len()),
            };
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// One response off `stream` (after what `buf` already holds): its head and decoded body.
async fn raw_response(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    async fn more(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        n > 0
    }
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        assert!(more(stream, buf).await, "closed before a response head");
    };
    let head = String::from_utf8(buf.drain(..end + 4).collect())
        .unwrap()
        .to_ascii_lowercase();
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked\r\n") {
        loop {
            let line_end = loop {
                if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                assert!(more(stream, buf).await);
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            while buf.len() < line_end + 2 + size + 2 {
                assert!(more(stream, buf).await);
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let length: usize = length.trim().parse().unwrap();
        while buf.len() < length {
            assert!(more(stream, buf).await);
        }
        body = buf.drain(..length).collect();
    } else {
        while more(stream, buf).await {}
        body = std::mem::take(buf);
    }
    (head, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_on_the_wire_pipelined_in_every_framing_and_handed_to_hyper_for_a_body() {
    let net = Net::new(100, 23);
    let cloud = TestCloud::start(net).await;
    let addr = raw_target(net.target_ip(1)).await;
    let web = backend_at("web", &[("raw", addr)]);
    let lb = at(
        create(
            &cloud,
            &app_spec("wire", app(routes(vec![], Some("web")), vec![web])),
        )
        .await,
        80,
    );
    cloud.wait_health("wire", 1, 0).await;

    let mut client = tcp_from(net.client(1), lb).await;
    let mut buf = Vec::new();
    // Three requests in one write: answered in order on the one connection.
    client
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: wire.example\r\nConnection: keep-alive, x-private\r\nX-Private: secret\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: spoofed\r\nCookie: a=b\r\n\r\n\
              GET /length HTTP/1.1\r\nHost: wire.example\r\n\r\n\
              GET /chunked HTTP/1.1\r\nHost: wire.example\r\n\r\n",
        )
        .await
        .unwrap();
    let (head, echoed) = raw_response(&mut client, &mut buf).await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(
        echoed.contains("\r\nCookie: a=b\r\n"),
        "names keep their case: {echoed}"
    );
    let echoed = echoed.to_ascii_lowercase();
    assert!(echoed.starts_with("get /echo http/1.1\r\n"), "{echoed}");
    for kept in [
        "host: wire.example",
        "cookie: a=b",
        "x-forwarded-proto: http",
        "x-forwarded-host: wire.example",
    ] {
        assert!(
            echoed.contains(&format!("\r\n{kept}\r\n")),
            "{kept} in {echoed}"
        );
    }
    let client_ip = net.client(1);
    assert!(
        echoed.contains(&format!("\r\nx-forwarded-for: 10.1.2.3, {client_ip}\r\n")),
        "{echoed}"
    );
    for dropped in ["connection:", "x-private:", "te:", "upgrade:", "spoofed"] {
        assert!(!echoed.contains(dropped), "{dropped} in {echoed}");
    }

    let (head, body) = raw_response(&mut client, &mut buf).await;
    assert_eq!(body, "hello");
    assert!(head.contains("x-kept: 2\r\n"), "{head}");
    for dropped in ["connection:", "x-hop:", "keep-alive:"] {
        assert!(!head.contains(dropped), "{dropped} in {head}");
    }
    let (head, body) = raw_response(&mut client, &mut buf).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(body, "abcdefg", "chunks relayed, trailers dropped");

    // A request with a body: hyper serves the connection from here on, still kept alive.
    client
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: wire.example\r\nContent-Length: 11\r\n\r\nhello world",
        )
        .await
        .unwrap();
    let (_, body) = raw_response(&mut client, &mut buf).await;
    assert_eq!(body, "got 11 bytes");
    client
        .write_all(b"GET /length HTTP/1.1\r\nHost: wire.example\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(raw_response(&mut client, &mut buf).await.1, "hello");

    // A body that runs to the target's close: the client's connection closes after it.
    let mut client = tcp_from(net.client(2), lb).await;
    let mut buf = Vec::new();
    client
        .write_all(b"GET /close HTTP/1.1\r\nHost: wire.example\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = raw_response(&mut client, &mut buf).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "until the close");

    // The client asks to close: told so, and closed.
    let mut client = tcp_from(net.client(3), lb).await;
    let mut buf = Vec::new();
    client
        .write_all(b"GET /length HTTP/1.1\r\nHost: wire.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = raw_response(&mut client, &mut buf).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "hello");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());

    // HTTP/1.0 goes to hyper, and is answered.
    let mut client = tcp_from(net.client(4), lb).await;
    let mut buf = Vec::new();
    client
        .write_all(b"GET /length HTTP/1.0\r\nHost: wire.example\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(raw_response(&mut client, &mut buf).await.1, "hello");
    cloud.stop().await;
}
