//! The GCP provider: reads each resource of a load balancer by its derived name, checks the
//! owner recorded in its description, changes only what differs from the plan, and waits
//! (bounded) for every operation it starts. Deletion goes in dependency order: forwarding
//! rules, target pool, health check, firewall rules, address.

use std::collections::BTreeSet;

use async_trait::async_trait;
use google_cloud_compute_v1::client::{
    Addresses, Firewalls, ForwardingRules, HttpHealthChecks, TargetPools,
};
use google_cloud_compute_v1::model::{
    self, Address as GceAddress, Firewall, ForwardingRule, HealthCheckReference, HttpHealthCheck,
    InstanceReference, TargetPool, TargetPoolsAddHealthCheckRequest, TargetPoolsAddInstanceRequest,
    TargetPoolsRemoveHealthCheckRequest, TargetPoolsRemoveInstanceRequest,
};
use portico_provider::{
    Address, Frontend, LoadBalancerName, LoadBalancerSpec, LoadBalancerStatus,
    ObservedLoadBalancer, Ownership, PortStatus, Protocol, Provider, ProviderError,
};
use tokio::sync::OnceCell;

use crate::error::{GaxError, from_gax, is_not_found};
use crate::names;
use crate::network::{self, FirewallPlan, ForwardingRulePlan, HealthCheckPlan, NetworkPlan, Ports};
use crate::operation::wait;

/// Where load balancers go, from the ProviderConfig's `gcp` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcpSettings {
    pub project: String,
    pub region: String,
    pub network: String,
    /// `PREMIUM` or `STANDARD`.
    pub network_tier: String,
    /// Network tags of the nodes; the firewall rules apply to these instances only (all the
    /// network's instances when empty).
    pub node_tags: Vec<String>,
    /// Another endpoint (a fake, a private endpoint); then no credentials are sent.
    pub endpoint_url: Option<String>,
}

struct Clients {
    addresses: Addresses,
    forwarding_rules: ForwardingRules,
    target_pools: TargetPools,
    health_checks: HttpHealthChecks,
    firewalls: Firewalls,
}

pub struct GcpProvider {
    clients: OnceCell<Clients>,
    l7: OnceCell<application_resources::L7Clients>,
    settings: GcpSettings,
    operation_timeout: std::time::Duration,
}

/// Builds a client of the crate with the endpoint and credentials of `settings`. The
/// reconciler retries with backoff, so the clients do not retry on their own.
macro_rules! client {
    ($kind:ty, $settings:expr) => {{
        let mut builder =
            <$kind>::builder().with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        if let Some(url) = &$settings.endpoint_url {
            builder = builder.with_endpoint(url.clone()).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        builder.build().await.map_err(|e| {
            ProviderError::Unavailable(format!(
                "building the Compute Engine client: {}",
                portico_provider::error::error_chain(&e)
            ))
        })?
    }};
}

/// Sends a mutation and waits for its operation, polled through the same client.
macro_rules! regional {
    ($self:ident, $client:ident, $what:expr, $call:expr) => {{
        let c = &$self.clients().await?.$client;
        let (project, region) = (&$self.settings.project, &$self.settings.region);
        wait(
            $what,
            $self.operation_timeout,
            $call(c).send().await,
            |op| {
                c.get_operation()
                    .set_project(project)
                    .set_region(region)
                    .set_operation(op)
                    .send()
            },
        )
        .await
    }};
}

/// Sends a mutation of a global resource of this project through client `$set().$client`
/// (`clients` for Services', `l7` for Ingresses' resources) and waits for its operation.
macro_rules! global {
    ($self:ident, $set:ident . $client:ident, $what:expr, $call:expr) => {{
        let c = &$self.$set().await?.$client;
        let project = &$self.settings.project;
        wait(
            $what,
            $self.operation_timeout,
            $call(c).set_project(project).send().await,
            |op| {
                c.get_operation()
                    .set_project(project)
                    .set_operation(op)
                    .send()
            },
        )
        .await
    }};
}

/// A read of one resource of this project (`$call` names it), 404 as absent.
macro_rules! read {
    ($self:ident, $set:ident . $client:ident, $what:expr, $call:expr) => {{
        let c = &$self.$set().await?.$client;
        found(
            $what,
            $call(c).set_project(&$self.settings.project).send().await,
        )
    }};
}

mod application_resources;

/// A read that treats 404 as absent.
fn found<T>(what: &str, r: Result<T, GaxError>) -> Result<Option<T>, ProviderError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(from_gax(what, e)),
    }
}

/// Refuses a resource whose description names another owner (or none).
fn ours(name: &str, description: Option<&str>, owner: &Ownership) -> Result<(), ProviderError> {
    match names::owner_from(description) {
        Some(found) if found.same_owner(owner) => Ok(()),
        found => Err(ProviderError::NotOwned {
            name: name.to_string(),
            owner: found.map_or("someone else (no Portico description)".into(), |o| {
                format!(
                    "cluster {} object {} ({})",
                    o.cluster_id, o.object_uid, o.object_ref
                )
            }),
        }),
    }
}

impl GcpProvider {
    pub fn new(settings: GcpSettings) -> Self {
        GcpProvider {
            clients: OnceCell::new(),
            l7: OnceCell::new(),
            settings,
            operation_timeout: crate::operation::WAIT,
        }
    }

    /// How long a reconcile waits for one operation before it reports "retry later".
    pub fn with_operation_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    async fn clients(&self) -> Result<&Clients, ProviderError> {
        self.clients
            .get_or_try_init(|| async {
                Ok(Clients {
                    addresses: client!(Addresses, self.settings),
                    forwarding_rules: client!(ForwardingRules, self.settings),
                    target_pools: client!(TargetPools, self.settings),
                    health_checks: client!(HttpHealthChecks, self.settings),
                    firewalls: client!(Firewalls, self.settings),
                })
            })
            .await
    }

    async fn l7(&self) -> Result<&application_resources::L7Clients, ProviderError> {
        self.l7
            .get_or_try_init(|| application_resources::L7Clients::build(&self.settings))
            .await
    }

    fn regional_link(&self, collection: &str, name: &str) -> String {
        names::regional_link(
            &self.settings.project,
            &self.settings.region,
            collection,
            name,
        )
    }

    fn network_link(&self) -> String {
        names::global_link(&self.settings.project, "networks", &self.settings.network)
    }

    async fn get_address(&self, name: &str) -> Result<Option<GceAddress>, ProviderError> {
        read!(
            self,
            clients.addresses,
            "reading the address",
            |c: &Addresses| c.get().set_region(&self.settings.region).set_address(name)
        )
    }

    async fn get_forwarding_rule(
        &self,
        name: &str,
    ) -> Result<Option<ForwardingRule>, ProviderError> {
        read!(
            self,
            clients.forwarding_rules,
            "reading a forwarding rule",
            |c: &ForwardingRules| c
                .get()
                .set_region(&self.settings.region)
                .set_forwarding_rule(name)
        )
    }

    async fn get_target_pool(&self, name: &str) -> Result<Option<TargetPool>, ProviderError> {
        read!(
            self,
            clients.target_pools,
            "reading the target pool",
            |c: &TargetPools| c
                .get()
                .set_region(&self.settings.region)
                .set_target_pool(name)
        )
    }

    async fn get_health_check(&self, name: &str) -> Result<Option<HttpHealthCheck>, ProviderError> {
        read!(
            self,
            clients.health_checks,
            "reading the health check",
            |c: &HttpHealthChecks| c.get().set_http_health_check(name)
        )
    }

    async fn get_firewall(&self, name: &str) -> Result<Option<Firewall>, ProviderError> {
        read!(
            self,
            clients.firewalls,
            "reading a firewall rule",
            |c: &Firewalls| c.get().set_firewall(name)
        )
    }

    /// The IP the forwarding rules use: the requested one, else the load balancer's own
    /// reserved address (created on first use).
    async fn ensure_address(&self, spec: &LoadBalancerSpec) -> Result<String, ProviderError> {
        if let Some(ip) = spec.requested_address {
            return Ok(ip.to_string());
        }
        if let Some(held) = &spec.requested_address_name {
            // The user's address: used as it is, never created or released here.
            return self
                .get_address(held)
                .await?
                .and_then(|a| a.address)
                .ok_or_else(|| {
                    ProviderError::Invalid(format!(
                        "there is no address {held:?} in region {}",
                        self.settings.region
                    ))
                });
        }
        let name = names::base(&spec.name);
        if let Some(existing) = self.get_address(&name).await? {
            ours(&name, existing.description.as_deref(), &spec.owner)?;
            if let Some(ip) = existing.address {
                return Ok(ip);
            }
        } else {
            let mut body = GceAddress::default();
            body.name = Some(name.clone());
            body.description = Some(names::description(&spec.owner));
            body.address_type = Some(model::address::AddressType::from("EXTERNAL"));
            body.network_tier = Some(model::address::NetworkTier::from(
                self.settings.network_tier.as_str(),
            ));
            regional!(self, addresses, "reserving the address", |c: &Addresses| c
                .insert()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_body(body.clone()))?;
            tracing::info!(lb = %spec.name, "reserved address");
        }
        self.get_address(&name)
            .await?
            .and_then(|a| a.address)
            .ok_or_else(|| ProviderError::RetryAfter {
                after: crate::error::RETRY_AFTER,
                reason: "the reserved address has no IP yet".into(),
            })
    }

    async fn ensure_health_check(
        &self,
        spec: &LoadBalancerSpec,
        plan: &HealthCheckPlan,
    ) -> Result<String, ProviderError> {
        let mut body = HttpHealthCheck::default();
        body.name = Some(plan.name.clone());
        body.description = Some(names::description(&spec.owner));
        body.port = Some(plan.port);
        body.request_path = Some(plan.request_path.clone());
        body.check_interval_sec = Some(plan.check_interval_sec);
        body.timeout_sec = Some(plan.timeout_sec);
        body.healthy_threshold = Some(plan.healthy_threshold);
        body.unhealthy_threshold = Some(plan.unhealthy_threshold);
        match self.get_health_check(&plan.name).await? {
            None => {
                global!(
                    self,
                    clients.health_checks,
                    "creating the health check",
                    |c: &HttpHealthChecks| c
                        .insert()
                        .set_project(&self.settings.project)
                        .set_body(body.clone())
                )?;
            }
            Some(existing) => {
                ours(&plan.name, existing.description.as_deref(), &spec.owner)?;
                let same = existing.port == body.port
                    && existing.request_path == body.request_path
                    && existing.check_interval_sec == body.check_interval_sec
                    && existing.timeout_sec == body.timeout_sec
                    && existing.healthy_threshold == body.healthy_threshold
                    && existing.unhealthy_threshold == body.unhealthy_threshold;
                if !same {
                    global!(
                        self,
                        clients.health_checks,
                        "updating the health check",
                        |c: &HttpHealthChecks| c
                            .patch()
                            .set_project(&self.settings.project)
                            .set_http_health_check(&plan.name)
                            .set_body(body.clone())
                    )?;
                }
            }
        }
        Ok(names::global_link(
            &self.settings.project,
            "httpHealthChecks",
            &plan.name,
        ))
    }

    /// The target pool as planned; a change of affinity (immutable) recreates it, after the
    /// forwarding rules that point at it.
    async fn ensure_target_pool(
        &self,
        spec: &LoadBalancerSpec,
        plan: &NetworkPlan,
        health_check: &str,
    ) -> Result<String, ProviderError> {
        let tp = &plan.target_pool;
        let link = self.regional_link("targetPools", &tp.name);
        let existing = match self.get_target_pool(&tp.name).await? {
            Some(existing) => {
                ours(&tp.name, existing.description.as_deref(), &spec.owner)?;
                let affinity = existing.session_affinity.as_ref().and_then(|a| a.name());
                if affinity.unwrap_or("NONE") != tp.session_affinity {
                    self.delete_forwarding_rules(&spec.name, &spec.owner, &[])
                        .await?;
                    self.delete_target_pool(&tp.name).await?;
                    None
                } else {
                    Some(existing)
                }
            }
            None => None,
        };
        let Some(existing) = existing else {
            let mut body = TargetPool::default();
            body.name = Some(tp.name.clone());
            body.description = Some(names::description(&spec.owner));
            body.instances = tp.instances.iter().cloned().collect();
            body.health_checks = vec![health_check.to_string()];
            body.session_affinity = Some(model::target_pool::SessionAffinity::from(
                tp.session_affinity,
            ));
            regional!(
                self,
                target_pools,
                "creating the target pool",
                |c: &TargetPools| c
                    .insert()
                    .set_project(&self.settings.project)
                    .set_region(&self.settings.region)
                    .set_body(body.clone())
            )?;
            return Ok(link);
        };
        let current: BTreeSet<String> = existing.instances.iter().cloned().collect();
        let reference = |i: &String| {
            let mut r = InstanceReference::default();
            r.instance = Some(i.clone());
            r
        };
        let missing: Vec<InstanceReference> =
            tp.instances.difference(&current).map(reference).collect();
        let extra: Vec<InstanceReference> =
            current.difference(&tp.instances).map(reference).collect();
        if !missing.is_empty() {
            let mut body = TargetPoolsAddInstanceRequest::default();
            body.instances = missing;
            regional!(self, target_pools, "adding instances", |c: &TargetPools| c
                .add_instance()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_target_pool(&tp.name)
                .set_body(body.clone()))?;
        }
        if !extra.is_empty() {
            let mut body = TargetPoolsRemoveInstanceRequest::default();
            body.instances = extra;
            regional!(
                self,
                target_pools,
                "removing instances",
                |c: &TargetPools| c
                    .remove_instance()
                    .set_project(&self.settings.project)
                    .set_region(&self.settings.region)
                    .set_target_pool(&tp.name)
                    .set_body(body.clone())
            )?;
        }
        if existing.health_checks != [health_check.to_string()] {
            let check = |link: &str| {
                let mut r = HealthCheckReference::default();
                r.health_check = Some(link.to_string());
                r
            };
            let stale: Vec<HealthCheckReference> = existing
                .health_checks
                .iter()
                .filter(|h| *h != health_check)
                .map(|h| check(h))
                .collect();
            if !stale.is_empty() {
                let mut body = TargetPoolsRemoveHealthCheckRequest::default();
                body.health_checks = stale;
                regional!(
                    self,
                    target_pools,
                    "detaching a health check",
                    |c: &TargetPools| c
                        .remove_health_check()
                        .set_project(&self.settings.project)
                        .set_region(&self.settings.region)
                        .set_target_pool(&tp.name)
                        .set_body(body.clone())
                )?;
            }
            if !existing.health_checks.iter().any(|h| h == health_check) {
                let mut body = TargetPoolsAddHealthCheckRequest::default();
                body.health_checks = vec![check(health_check)];
                regional!(
                    self,
                    target_pools,
                    "attaching the health check",
                    |c: &TargetPools| c
                        .add_health_check()
                        .set_project(&self.settings.project)
                        .set_region(&self.settings.region)
                        .set_target_pool(&tp.name)
                        .set_body(body.clone())
                )?;
            }
        }
        Ok(link)
    }

    /// Forwarding rules are immutable but for their target: one that differs is replaced.
    async fn ensure_forwarding_rule(
        &self,
        spec: &LoadBalancerSpec,
        plan: &ForwardingRulePlan,
        ip: &str,
        target: &str,
    ) -> Result<(), ProviderError> {
        let mut body = ForwardingRule::default();
        body.name = Some(plan.name.clone());
        body.description = Some(names::description(&spec.owner));
        body.ip_address = Some(ip.to_string());
        body.ip_protocol = Some(model::forwarding_rule::IPProtocol::from(
            plan.protocol.as_str(),
        ));
        match &plan.ports {
            Ports::List(ports) => body.ports = ports.clone(),
            Ports::Range(range) => body.port_range = Some(range.clone()),
        }
        body.target = Some(target.to_string());
        body.load_balancing_scheme = Some(model::forwarding_rule::LoadBalancingScheme::from(
            "EXTERNAL",
        ));
        body.network_tier = Some(model::forwarding_rule::NetworkTier::from(
            self.settings.network_tier.as_str(),
        ));
        if let Some(existing) = self.get_forwarding_rule(&plan.name).await? {
            ours(&plan.name, existing.description.as_deref(), &spec.owner)?;
            let same = existing.ip_address == body.ip_address
                && existing.ip_protocol.as_ref().and_then(|p| p.name())
                    == Some(plan.protocol.as_str())
                && existing.ports == body.ports
                && (body.port_range.is_none() || existing.port_range == body.port_range)
                && existing.target.as_deref().map(names::name_of) == Some(names::name_of(target));
            if same {
                return Ok(());
            }
            self.delete_forwarding_rule(&plan.name).await?;
        }
        regional!(
            self,
            forwarding_rules,
            "creating a forwarding rule",
            |c: &ForwardingRules| c
                .insert()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_body(body.clone())
        )
    }

    async fn ensure_firewall(
        &self,
        spec: &LoadBalancerSpec,
        plan: &FirewallPlan,
    ) -> Result<(), ProviderError> {
        let mut body = Firewall::default();
        body.name = Some(plan.name.clone());
        body.description = Some(names::description(&spec.owner));
        body.network = Some(self.network_link());
        body.direction = Some(model::firewall::Direction::from("INGRESS"));
        body.source_ranges = plan.source_ranges.clone();
        body.target_tags = self.settings.node_tags.clone();
        body.allowed = plan
            .allowed
            .iter()
            .map(|(protocol, ports)| {
                let mut a = model::firewall::Allowed::default();
                a.ip_protocol = Some(protocol.to_string());
                a.ports = ports.clone();
                a
            })
            .collect();
        match self.get_firewall(&plan.name).await? {
            None => global!(
                self,
                clients.firewalls,
                "creating a firewall rule",
                |c: &Firewalls| c
                    .insert()
                    .set_project(&self.settings.project)
                    .set_body(body.clone())
            ),
            Some(existing) => {
                ours(&plan.name, existing.description.as_deref(), &spec.owner)?;
                let sorted = |v: &[String]| {
                    let mut v = v.to_vec();
                    v.sort();
                    v
                };
                let same = sorted(&existing.source_ranges) == sorted(&body.source_ranges)
                    && sorted(&existing.target_tags) == sorted(&body.target_tags)
                    && existing.allowed == body.allowed;
                if same {
                    return Ok(());
                }
                global!(
                    self,
                    clients.firewalls,
                    "updating a firewall rule",
                    |c: &Firewalls| c
                        .patch()
                        .set_project(&self.settings.project)
                        .set_firewall(&plan.name)
                        .set_body(body.clone())
                )
            }
        }
    }

    async fn delete_forwarding_rule(&self, name: &str) -> Result<(), ProviderError> {
        regional!(
            self,
            forwarding_rules,
            "deleting a forwarding rule",
            |c: &ForwardingRules| c
                .delete()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_forwarding_rule(name)
        )
    }

    /// Portico's forwarding rules of `lb` except those named in `keep`.
    async fn delete_forwarding_rules(
        &self,
        lb: &LoadBalancerName,
        owner: &Ownership,
        keep: &[String],
    ) -> Result<(), ProviderError> {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let name = names::forwarding_rule(lb, protocol);
            if keep.contains(&name) {
                continue;
            }
            if let Some(existing) = self.get_forwarding_rule(&name).await? {
                ours(&name, existing.description.as_deref(), owner)?;
                self.delete_forwarding_rule(&name).await?;
            }
        }
        Ok(())
    }

    async fn delete_target_pool(&self, name: &str) -> Result<(), ProviderError> {
        regional!(
            self,
            target_pools,
            "deleting the target pool",
            |c: &TargetPools| c
                .delete()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_target_pool(name)
        )
    }

    async fn ensure_network(
        &self,
        spec: &LoadBalancerSpec,
        frontend: &portico_provider::NetworkFrontend,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let plan = network::plan(&spec.name, frontend, &spec.source_ranges)
            .map_err(ProviderError::Invalid)?;
        // The target pool says who owns this load balancer; checked before anything changes.
        if let Some(existing) = self.get_target_pool(&plan.target_pool.name).await? {
            ours(
                &plan.target_pool.name,
                existing.description.as_deref(),
                &spec.owner,
            )?;
        }
        let ip = self.ensure_address(spec).await?;
        let health_check = self.ensure_health_check(spec, &plan.health_check).await?;
        let target = self.ensure_target_pool(spec, &plan, &health_check).await?;
        let wanted: Vec<String> = plan
            .forwarding_rules
            .iter()
            .map(|r| r.name.clone())
            .collect();
        self.delete_forwarding_rules(&spec.name, &spec.owner, &wanted)
            .await?;
        for rule in &plan.forwarding_rules {
            self.ensure_forwarding_rule(spec, rule, &ip, &target)
                .await?;
        }
        self.ensure_firewall(spec, &plan.firewall).await?;
        self.ensure_firewall(spec, &plan.health_check_firewall)
            .await?;
        Ok(LoadBalancerStatus {
            addresses: ip.parse().map(Address::Ip).into_iter().collect(),
            ports: plan
                .forwarding_rules
                .iter()
                .flat_map(|r| {
                    r.serves.iter().map(|port| PortStatus {
                        protocol: r.protocol,
                        port: *port,
                        error: None,
                    })
                })
                .collect(),
        })
    }

    /// What the forwarding rules of `lb` serve, on which IP.
    async fn observed_status(
        &self,
        lb: &LoadBalancerName,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let mut status = LoadBalancerStatus::default();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let Some(rule) = self
                .get_forwarding_rule(&names::forwarding_rule(lb, protocol))
                .await?
            else {
                continue;
            };
            if let Some(ip) = rule.ip_address.as_deref().and_then(|ip| ip.parse().ok()) {
                let address = Address::Ip(ip);
                if !status.addresses.contains(&address) {
                    status.addresses.push(address);
                }
            }
            let mut ports: Vec<u16> = rule.ports.iter().filter_map(|p| p.parse().ok()).collect();
            if let Some((low, high)) = rule.port_range.as_deref().and_then(|r| r.split_once('-'))
                && let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>())
            {
                ports.extend(low..=high);
            }
            status
                .ports
                .extend(ports.into_iter().map(|port| PortStatus {
                    protocol,
                    port,
                    error: None,
                }));
        }
        Ok(status)
    }
}

#[async_trait]
impl Provider for GcpProvider {
    fn name(&self) -> &'static str {
        "gcp"
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        match &spec.frontend {
            Frontend::Network(frontend) => self.ensure_network(spec, frontend).await,
            Frontend::Application(frontend) => self.ensure_application(spec, frontend).await,
        }
    }

    async fn get(
        &self,
        name: &LoadBalancerName,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        if let Some(pool) = self.get_target_pool(&names::base(name)).await? {
            return Ok(match names::owner_from(pool.description.as_deref()) {
                Some(owner) => Some(ObservedLoadBalancer {
                    name: name.clone(),
                    owner,
                    status: self.observed_status(name).await?,
                }),
                None => None,
            });
        }
        match self.url_map_owner(name).await? {
            Some(Some(owner)) => Ok(Some(ObservedLoadBalancer {
                name: name.clone(),
                owner,
                status: self.observed_application(name).await?,
            })),
            _ => Ok(None),
        }
    }

    async fn delete(
        &self,
        name: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<(), ProviderError> {
        self.delete_forwarding_rules(name, owner, &[]).await?;
        let base = names::base(name);
        if let Some(pool) = self.get_target_pool(&base).await? {
            ours(&base, pool.description.as_deref(), owner)?;
            self.delete_target_pool(&base).await?;
        }
        let hc = names::health_check(name);
        if let Some(existing) = self.get_health_check(&hc).await? {
            ours(&hc, existing.description.as_deref(), owner)?;
            global!(
                self,
                clients.health_checks,
                "deleting the health check",
                |c: &HttpHealthChecks| c
                    .delete()
                    .set_project(&self.settings.project)
                    .set_http_health_check(&hc)
            )?;
        }
        for firewall in [base.clone(), hc.clone()] {
            if let Some(existing) = self.get_firewall(&firewall).await? {
                ours(&firewall, existing.description.as_deref(), owner)?;
                global!(
                    self,
                    clients.firewalls,
                    "deleting a firewall rule",
                    |c: &Firewalls| c
                        .delete()
                        .set_project(&self.settings.project)
                        .set_firewall(&firewall)
                )?;
            }
        }
        // Last: the forwarding rules that used it are gone.
        if let Some(existing) = self.get_address(&base).await? {
            ours(&base, existing.description.as_deref(), owner)?;
            regional!(self, addresses, "releasing the address", |c: &Addresses| c
                .delete()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region)
                .set_address(&base))?;
        }
        // An Ingress's load balancer has the same base name; its parts are global.
        self.delete_application(name, owner).await?;
        tracing::info!(lb = %name, "deleted load balancer");
        Ok(())
    }

    async fn list_owned(
        &self,
        cluster_id: &str,
    ) -> Result<Vec<ObservedLoadBalancer>, ProviderError> {
        let c = &self.clients().await?.target_pools;
        let mut pools = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut request = c
                .list()
                .set_project(&self.settings.project)
                .set_region(&self.settings.region);
            if let Some(t) = token.take() {
                request = request.set_page_token(t);
            }
            let page = request
                .send()
                .await
                .map_err(|e| from_gax("listing target pools", e))?;
            pools.extend(page.items);
            token = page.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        let mut owned = Vec::new();
        for (map, owner) in self.url_map_owners().await? {
            // Redirect maps (`<lb>-redirect`) are not load balancers of their own.
            if map.ends_with("-redirect") {
                continue;
            }
            let (Some(owner), Ok(name)) = (owner, LoadBalancerName::try_from(map)) else {
                continue;
            };
            if owner.cluster_id == cluster_id {
                owned.push(ObservedLoadBalancer {
                    status: self.observed_application(&name).await?,
                    name,
                    owner,
                });
            }
        }
        for pool in pools {
            let Some(owner) = names::owner_from(pool.description.as_deref()) else {
                continue;
            };
            if owner.cluster_id != cluster_id {
                continue;
            }
            let Some(name) = pool.name.and_then(|n| LoadBalancerName::try_from(n).ok()) else {
                continue;
            };
            owned.push(ObservedLoadBalancer {
                status: self.observed_status(&name).await?,
                name,
                owner,
            });
        }
        Ok(owned)
    }
}
