//! The AWS provider against moto over the real SDK: Services become network load balancers,
//! updates change what differs, deletion and garbage collection leave nothing behind, and
//! nothing that belongs to another owner is ever adopted or deleted.

use std::collections::BTreeSet;

use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, Tag, TargetTypeEnum};
use portico_aws::moto::Moto;
use portico_aws::network::target_group_name;
use portico_aws::{AwsProvider, AwsSettings};
use portico_provider::*;

fn owner(cluster: &str, uid: &str) -> Ownership {
    Ownership {
        cluster_id: cluster.into(),
        object_uid: uid.into(),
        object_ref: format!("Service/default/{uid}"),
    }
}

fn node(k: u8, port: u16) -> Target {
    Target {
        node: format!("node-{k}"),
        address: format!("10.0.1.{k}").parse().unwrap(),
        port,
        provider_id: None,
    }
}

fn listener(protocol: Protocol, port: u16, node_port: u16, nodes: &[u8]) -> Listener {
    Listener {
        name: format!("{protocol}-{port}"),
        protocol,
        port,
        pool: TargetPool {
            targets: nodes.iter().map(|k| node(*k, node_port)).collect(),
            health_check: HealthCheck::with_probe(Probe::Http {
                port: 10256,
                path: "/healthz".into(),
            }),
            affinity: SessionAffinity::None,
            proxy_protocol: false,
            preserve_client_ip: false,
            drain_timeout: None,
        },
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

async fn provider(moto: &Moto) -> AwsProvider {
    provider_with(moto, moto.client()).await
}

async fn provider_with(moto: &Moto, client: Client) -> AwsProvider {
    let (vpc, subnets) = moto.default_network().await;
    assert!(!subnets.is_empty(), "moto's default VPC has subnets");
    AwsProvider::new(
        client,
        AwsSettings {
            subnets,
            vpc_id: Some(vpc),
            tags: [("team".to_string(), "edge".to_string())].into(),
            ..AwsSettings::default()
        },
    )
}

/// `(port, protocol, registered (id, port) targets)` of every listener, as AWS holds them.
async fn listeners_of(
    client: &Client,
    name: &LoadBalancerName,
) -> Vec<(i32, String, BTreeSet<(String, i32)>)> {
    let lb = client
        .describe_load_balancers()
        .names(name.as_str())
        .send()
        .await
        .unwrap();
    let arn = lb.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    let listeners = client
        .describe_listeners()
        .load_balancer_arn(arn)
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for l in listeners.listeners() {
        let tg = l.default_actions()[0].target_group_arn().unwrap();
        let health = client
            .describe_target_health()
            .target_group_arn(tg)
            .send()
            .await
            .unwrap();
        let targets = health
            .target_health_descriptions()
            .iter()
            .map(|d| {
                let t = d.target().unwrap();
                (t.id().unwrap().to_string(), t.port().unwrap())
            })
            .collect();
        out.push((
            l.port().unwrap(),
            l.protocol().unwrap().as_str().to_string(),
            targets,
        ));
    }
    out.sort();
    out
}

async fn target_group_names(client: &Client) -> BTreeSet<String> {
    client
        .describe_target_groups()
        .send()
        .await
        .unwrap()
        .target_groups()
        .iter()
        .filter_map(|t| t.target_group_name().map(String::from))
        .collect()
}

fn targets(pairs: &[(&str, i32)]) -> BTreeSet<(String, i32)> {
    pairs.iter().map(|(a, p)| (a.to_string(), *p)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_becomes_a_network_load_balancer_with_a_listener_and_target_group_per_port() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let web = spec(
        "0b5e-web",
        owner("c1", "0b5e-web"),
        vec![
            listener(Protocol::Tcp, 80, 30080, &[1, 2, 3]),
            listener(Protocol::Udp, 53, 30053, &[1, 2, 3]),
        ],
    );
    let status = aws.ensure(&web).await.expect("ensure succeeds");
    let [Address::Hostname(host)] = status.addresses.as_slice() else {
        panic!("one hostname: {status:?}");
    };
    assert!(
        host.contains(web.name.as_str()) && host.ends_with(".elb.amazonaws.com"),
        "{host}"
    );
    assert_eq!(status.ports.len(), 2);

    let client = moto.client();
    let lb = client
        .describe_load_balancers()
        .names(web.name.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(lb.load_balancers()[0].r#type().unwrap().as_str(), "network");
    assert_eq!(
        listeners_of(&client, &web.name).await,
        vec![
            (
                53,
                "UDP".into(),
                targets(&[
                    ("10.0.1.1", 30053),
                    ("10.0.1.2", 30053),
                    ("10.0.1.3", 30053)
                ])
            ),
            (
                80,
                "TCP".into(),
                targets(&[
                    ("10.0.1.1", 30080),
                    ("10.0.1.2", 30080),
                    ("10.0.1.3", 30080)
                ])
            ),
        ]
    );
    let tg = client
        .describe_target_groups()
        .names(target_group_name(&web.name, "TCP", 80))
        .send()
        .await
        .unwrap();
    let tg = &tg.target_groups()[0];
    assert_eq!(tg.target_type(), Some(&TargetTypeEnum::Ip));
    assert_eq!(tg.health_check_protocol(), Some(&ProtocolEnum::Http));
    assert_eq!(tg.health_check_port(), Some("10256"));
    assert_eq!(tg.health_check_path(), Some("/healthz"));

    let observed = aws.get(&web.name).await.unwrap().expect("found by name");
    assert!(observed.owner.same_owner(&web.owner));
    assert_eq!(observed.status.addresses, status.addresses);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_follows_ports_nodes_and_health_checks_and_a_repeat_changes_nothing() {
    let moto = Moto::start().await;
    let (recording, calls) = moto.recording_client();
    let aws = provider_with(&moto, recording).await;
    let client = moto.client();
    let mut web = spec(
        "1c6f-web",
        owner("c1", "1c6f-web"),
        vec![
            listener(Protocol::Tcp, 80, 30080, &[1, 2]),
            listener(Protocol::Tcp, 443, 30443, &[1, 2]),
        ],
    );
    let first = aws.ensure(&web).await.unwrap();
    calls.take();
    assert_eq!(
        aws.ensure(&web).await.unwrap(),
        first,
        "the same spec again reports the same"
    );
    assert_eq!(calls.take_changes(), Vec::<String>::new(), "and only reads");
    let before = target_group_names(&client).await;

    // Port 443 goes, node 3 joins, node 1 leaves, the probe becomes TCP.
    web = spec(
        "1c6f-web",
        web.owner.clone(),
        vec![listener(Protocol::Tcp, 80, 30080, &[2, 3])],
    );
    if let Frontend::Network(n) = &mut web.frontend {
        n.listeners[0].pool.health_check = HealthCheck::with_probe(Probe::Tcp { port: 30080 });
    }
    aws.ensure(&web).await.unwrap();
    assert_eq!(
        listeners_of(&client, &web.name).await,
        vec![(
            80,
            "TCP".into(),
            targets(&[("10.0.1.2", 30080), ("10.0.1.3", 30080)])
        )]
    );
    let after = target_group_names(&client).await;
    let gone = target_group_name(&web.name, "TCP", 443);
    assert!(
        before.contains(&gone) && !after.contains(&gone),
        "the 443 group is deleted with its listener"
    );
    let tg = client
        .describe_target_groups()
        .names(target_group_name(&web.name, "TCP", 80))
        .send()
        .await
        .unwrap();
    assert_eq!(
        tg.target_groups()[0].health_check_protocol(),
        Some(&ProtocolEnum::Tcp)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_leaves_nothing_and_garbage_collection_lists_only_this_clusters() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let client = moto.client();
    let ours = spec(
        "2d7a-ours",
        owner("c1", "2d7a-ours"),
        vec![listener(Protocol::Tcp, 80, 30080, &[1])],
    );
    let theirs = spec(
        "3e8b-theirs",
        owner("c2", "3e8b-theirs"),
        vec![listener(Protocol::Tcp, 80, 30081, &[1])],
    );
    aws.ensure(&ours).await.unwrap();
    aws.ensure(&theirs).await.unwrap();

    let listed: Vec<LoadBalancerName> = aws
        .list_owned("c1")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(listed, vec![ours.name.clone()]);

    aws.delete(&ours.name, &ours.owner).await.unwrap();
    assert!(aws.get(&ours.name).await.unwrap().is_none());
    assert_eq!(
        target_group_names(&client).await,
        [target_group_name(&theirs.name, "TCP", 80)].into(),
        "only the other cluster's target group is left"
    );
    aws.delete(&ours.name, &ours.owner)
        .await
        .expect("deleting again is a no-op");
    assert!(aws.get(&theirs.name).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn another_owners_load_balancer_is_never_adopted_or_deleted() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let theirs = spec(
        "4f9c-shared",
        owner("c2", "4f9c-shared"),
        vec![listener(Protocol::Tcp, 80, 30080, &[1])],
    );
    aws.ensure(&theirs).await.unwrap();

    let mut ours = theirs.clone();
    ours.owner = owner("c1", "4f9c-shared");
    let refused = aws.ensure(&ours).await.unwrap_err();
    assert!(
        matches!(refused, ProviderError::NotOwned { .. }),
        "{refused:?}"
    );
    let refused = aws.delete(&ours.name, &ours.owner).await.unwrap_err();
    assert!(
        matches!(refused, ProviderError::NotOwned { .. }),
        "{refused:?}"
    );
    assert!(
        aws.get(&theirs.name).await.unwrap().is_some(),
        "theirs is untouched"
    );

    // A load balancer of that name without Portico's tags at all is not ours either.
    let client = moto.client();
    let (_, subnets) = moto.default_network().await;
    let bare = LoadBalancerName::for_object_uid("5a0d-bare");
    client
        .create_load_balancer()
        .name(bare.as_str())
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .set_subnets(Some(subnets))
        .send()
        .await
        .unwrap();
    let bare_spec = spec(
        "5a0d-bare",
        owner("c1", "5a0d-bare"),
        vec![listener(Protocol::Tcp, 80, 30080, &[1])],
    );
    assert!(matches!(
        aws.ensure(&bare_spec).await,
        Err(ProviderError::NotOwned { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_interrupted_after_creating_a_target_group_converges_without_duplicates() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let client = moto.client();
    let (vpc, _) = moto.default_network().await;
    let web = spec(
        "6b1e-web",
        owner("c1", "6b1e-web"),
        vec![listener(Protocol::Tcp, 80, 30080, &[1, 2])],
    );
    // What a reconcile killed right after its CreateTargetGroup call leaves behind: the group,
    // tagged as ours, with no load balancer or listener yet.
    let name = target_group_name(&web.name, "TCP", 80);
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    client
        .create_target_group()
        .name(&name)
        .protocol(ProtocolEnum::Tcp)
        .port(30080)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Ip)
        .tags(tag("portico.dev/cluster-id", "c1"))
        .tags(tag("portico.dev/object-uid", "6b1e-web"))
        .send()
        .await
        .unwrap();

    aws.ensure(&web)
        .await
        .expect("the next reconcile completes");
    aws.ensure(&web)
        .await
        .expect("and the one after changes nothing");
    let groups = target_group_names(&client).await;
    assert_eq!(groups, [name].into(), "one target group, no duplicate");
    assert_eq!(
        listeners_of(&client, &web.name).await,
        vec![(
            80,
            "TCP".into(),
            targets(&[("10.0.1.1", 30080), ("10.0.1.2", 30080)])
        )]
    );
    let lbs = client.describe_load_balancers().send().await.unwrap();
    assert_eq!(lbs.load_balancers().len(), 1, "one load balancer");
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_with_instance_ids_are_registered_as_instances_on_their_node_port() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let instances = moto.run_instances(2).await;
    assert_eq!(instances.len(), 2);
    let mut web = spec(
        "8d3a-web",
        owner("c1", "8d3a-web"),
        vec![listener(Protocol::Tcp, 80, 30080, &[1, 2])],
    );
    if let Frontend::Network(n) = &mut web.frontend {
        for (target, id) in n.listeners[0].pool.targets.iter_mut().zip(&instances) {
            target.provider_id = Some(format!("aws:///us-east-1a/{id}"));
        }
    }
    aws.ensure(&web).await.unwrap();

    let client = moto.client();
    let tg = client
        .describe_target_groups()
        .names(target_group_name(&web.name, "TCP", 80))
        .send()
        .await
        .unwrap();
    assert_eq!(
        tg.target_groups()[0].target_type(),
        Some(&TargetTypeEnum::Instance)
    );
    let registered = listeners_of(&client, &web.name).await;
    let expected: BTreeSet<(String, i32)> = instances.iter().map(|i| (i.clone(), 30080)).collect();
    assert_eq!(registered, vec![(80, "TCP".into(), expected)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_killed_between_any_two_calls_converges_without_duplicates_or_leaks() {
    let moto = Moto::start().await;
    let aws = provider(&moto).await;
    let client = moto.client();
    let web = spec(
        "7c2f-web",
        owner("c1", "7c2f-web"),
        vec![
            listener(Protocol::Tcp, 80, 30080, &[1, 2]),
            listener(Protocol::Udp, 53, 30053, &[1, 2]),
        ],
    );
    let (recording, calls) = moto.recording_client();
    provider_with(&moto, recording)
        .await
        .ensure(&web)
        .await
        .unwrap();
    let changes = calls.take_changes().len();
    let expected = listeners_of(&client, &web.name).await;
    let groups = target_group_names(&client).await;
    aws.delete(&web.name, &web.owner).await.unwrap();

    for killed_after in 0..changes {
        let killed = provider_with(&moto, moto.client_killed_after(killed_after)).await;
        assert!(killed.ensure(&web).await.is_err());
        aws.ensure(&web).await.unwrap_or_else(|e| {
            panic!("the next reconcile after {killed_after} changes completes: {e}")
        });
        assert_eq!(listeners_of(&client, &web.name).await, expected);
        assert_eq!(target_group_names(&client).await, groups, "no duplicates");
        aws.delete(&web.name, &web.owner).await.unwrap();
        assert_eq!(
            target_group_names(&client).await,
            BTreeSet::new(),
            "nothing leaks (killed after {killed_after} changes)"
        );
        let lbs = client.describe_load_balancers().send().await.unwrap();
        assert!(lbs.load_balancers().is_empty());
    }
}
