//! The AWS provider: reads what exists (found by name, owned by tags), changes only what
//! differs from the plan, and never touches a load balancer whose tags name another owner.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Listener as AwsListener, LoadBalancer, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, ProtocolEnum, Tag, TargetDescription, TargetGroup, TargetGroupAttribute,
    TargetTypeEnum,
};
use portico_provider::{
    Address, ApplicationFrontend, Frontend, LoadBalancerName, LoadBalancerSpec, LoadBalancerStatus,
    NetworkFrontend, ObservedLoadBalancer, Ownership, PortStatus, Protocol, Provider,
    ProviderError,
};
use tokio::sync::OnceCell;

use crate::error::from_sdk;
use crate::network::{self, ListenerPlan, NetworkPlan, TargetGroupPlan};
use crate::{application, tags};

mod application_listeners;
mod imported_certificates;

/// The plan's health check on a CreateTargetGroup or ModifyTargetGroup request (two builder
/// types with the same setters).
macro_rules! with_health_check {
    ($request:expr, $hc:expr) => {{
        let hc: &crate::network::HealthCheckPlan = $hc;
        $request
            .health_check_protocol(ProtocolEnum::from(hc.protocol))
            .health_check_port(&hc.port)
            .set_health_check_path(hc.path.clone())
            .set_matcher(hc.matcher.map(|m| {
                aws_sdk_elasticloadbalancingv2::types::Matcher::builder()
                    .http_code(m)
                    .build()
            }))
            .health_check_interval_seconds(hc.interval_seconds)
            .health_check_timeout_seconds(hc.timeout_seconds)
            .healthy_threshold_count(hc.healthy_threshold)
            .unhealthy_threshold_count(hc.unhealthy_threshold)
    }};
}

/// Where load balancers go, from the ProviderConfig's `aws` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AwsSettings {
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    /// `internet-facing` (default) or `internal`.
    pub internal: bool,
    /// The VPC of the target groups.
    pub vpc_id: Option<String>,
    /// Extra tags on everything created (the ownership tags are always added).
    pub tags: BTreeMap<String, String>,
}

pub struct AwsProvider {
    client: OnceCell<Client>,
    /// ACM, where TLS Secrets are imported for ALBs; `None` when not configured.
    acm: OnceCell<Option<aws_sdk_acm::Client>>,
    /// Region and endpoint for clients made on first use.
    chain: Option<(String, Option<String>)>,
    sdk_config: OnceCell<aws_config::SdkConfig>,
    settings: AwsSettings,
}

impl AwsProvider {
    pub fn new(client: Client, settings: AwsSettings) -> Self {
        AwsProvider {
            client: OnceCell::new_with(Some(client)),
            acm: OnceCell::new_with(Some(None)),
            chain: None,
            sdk_config: OnceCell::new(),
            settings,
        }
    }

    /// Imports TLS Secrets into ACM through `acm` (without it, ALBs serve ACM certificates
    /// named by ARN only).
    pub fn with_acm(mut self, acm: aws_sdk_acm::Client) -> Self {
        self.acm = OnceCell::new_with(Some(Some(acm)));
        self
    }

    /// A provider whose client comes from the standard AWS chain (environment, profile, IRSA,
    /// instance role) for `region`, optionally at another endpoint (an emulator, a VPC
    /// endpoint). The chain is read on first use, so a configuration can be built without
    /// waiting on it.
    pub fn from_chain(region: &str, endpoint_url: Option<&str>, settings: AwsSettings) -> Self {
        AwsProvider {
            client: OnceCell::new(),
            acm: OnceCell::new(),
            chain: Some((region.to_string(), endpoint_url.map(String::from))),
            sdk_config: OnceCell::new(),
            settings,
        }
    }

    async fn sdk_config(&self) -> &aws_config::SdkConfig {
        self.sdk_config
            .get_or_init(|| async {
                let (region, endpoint) = self.chain.clone().unwrap_or_default();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_config::Region::new(region));
                if let Some(url) = endpoint {
                    loader = loader.endpoint_url(url);
                }
                loader.load().await
            })
            .await
    }

    async fn elb(&self) -> &Client {
        self.client
            .get_or_init(|| async { Client::new(self.sdk_config().await) })
            .await
    }

    async fn acm(&self) -> Option<&aws_sdk_acm::Client> {
        self.acm
            .get_or_init(|| async { Some(aws_sdk_acm::Client::new(self.sdk_config().await)) })
            .await
            .as_ref()
    }

    /// The certificates the HTTPS listeners of `lb_arn` serve.
    async fn served_certificates(&self, lb_arn: &str) -> Result<Vec<String>, ProviderError> {
        let mut arns = Vec::new();
        for listener in self.listeners_of(lb_arn).await? {
            if listener.protocol() != Some(&ProtocolEnum::Https) {
                continue;
            }
            let out = self
                .elb()
                .await
                .describe_listener_certificates()
                .listener_arn(listener.listener_arn().unwrap_or_default())
                .send()
                .await
                .map_err(|e| from_sdk("reading listener certificates", e))?;
            arns.extend(
                out.certificates()
                    .iter()
                    .filter_map(|c| c.certificate_arn().map(String::from)),
            );
        }
        Ok(arns)
    }

    fn all_tags(&self, owner: &Ownership, lb: &LoadBalancerName) -> Vec<Tag> {
        let mut all: BTreeMap<String, String> = self.settings.tags.clone();
        for (k, v) in tags::ownership(owner, lb) {
            all.insert(k.to_string(), v);
        }
        all.into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }

    async fn find_load_balancer(
        &self,
        name: &LoadBalancerName,
    ) -> Result<Option<LoadBalancer>, ProviderError> {
        match self
            .elb()
            .await
            .describe_load_balancers()
            .names(name.as_str())
            .send()
            .await
        {
            Ok(out) => Ok(out.load_balancers().first().cloned()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_load_balancer_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(from_sdk("describing the load balancer", e)),
        }
    }

    async fn tags_of(&self, arns: &[String]) -> Result<HashMap<String, Vec<Tag>>, ProviderError> {
        let mut all = HashMap::new();
        // DescribeTags takes at most 20 resources a call.
        for chunk in arns.chunks(20) {
            let out = self
                .elb()
                .await
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| from_sdk("reading tags", e))?;
            for d in out.tag_descriptions() {
                if let Some(arn) = d.resource_arn() {
                    all.insert(arn.to_string(), d.tags().to_vec());
                }
            }
        }
        Ok(all)
    }

    /// The owner recorded in `lb`'s tags, if it has Portico's.
    async fn owner_of(&self, lb: &LoadBalancer) -> Result<Option<Ownership>, ProviderError> {
        let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        let tags = self.tags_of(std::slice::from_ref(&arn)).await?;
        Ok(tags.get(&arn).and_then(|t| tags::owner_from(t)))
    }

    async fn find_target_group(&self, name: &str) -> Result<Option<TargetGroup>, ProviderError> {
        match self
            .elb()
            .await
            .describe_target_groups()
            .names(name)
            .send()
            .await
        {
            Ok(out) => Ok(out.target_groups().first().cloned()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_target_group_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(from_sdk("describing a target group", e)),
        }
    }

    async fn listeners_of(&self, lb_arn: &str) -> Result<Vec<AwsListener>, ProviderError> {
        let out = self
            .elb()
            .await
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map_err(|e| from_sdk("describing listeners", e))?;
        Ok(out.listeners().to_vec())
    }

    async fn create_load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        kind: LoadBalancerTypeEnum,
    ) -> Result<LoadBalancer, ProviderError> {
        if self.settings.subnets.is_empty() {
            return Err(ProviderError::Invalid(
                "the aws provider needs subnets for its load balancers".into(),
            ));
        }
        let scheme = if self.settings.internal {
            LoadBalancerSchemeEnum::Internal
        } else {
            LoadBalancerSchemeEnum::InternetFacing
        };
        let mut request = self
            .elb()
            .await
            .create_load_balancer()
            .name(spec.name.as_str())
            .r#type(kind.clone())
            .scheme(scheme)
            .set_subnets(Some(self.settings.subnets.clone()))
            .set_tags(Some(self.all_tags(&spec.owner, &spec.name)));
        if !self.settings.security_groups.is_empty() {
            request = request.set_security_groups(Some(self.settings.security_groups.clone()));
        }
        let out = request
            .send()
            .await
            .map_err(|e| from_sdk("creating the load balancer", e))?;
        tracing::info!(lb = %spec.name, kind = %kind, "created load balancer");
        out.load_balancers()
            .first()
            .cloned()
            .ok_or_else(|| ProviderError::Unavailable("CreateLoadBalancer returned none".into()))
    }

    /// The target group of `plan`, created or brought to it: health check, attributes and
    /// registered targets.
    async fn ensure_target_group(
        &self,
        spec: &LoadBalancerSpec,
        plan: &TargetGroupPlan,
    ) -> Result<String, ProviderError> {
        let arn = match self.find_target_group(&plan.name).await? {
            Some(existing) => {
                let arn = existing.target_group_arn().unwrap_or_default().to_string();
                self.check_target_group_owner(spec, &arn).await?;
                if needs_health_check_update(&existing, plan) {
                    let request = self
                        .elb()
                        .await
                        .modify_target_group()
                        .target_group_arn(&arn);
                    with_health_check!(request, &plan.health_check)
                        .send()
                        .await
                        .map_err(|e| from_sdk("updating a health check", e))?;
                }
                arn
            }
            None => {
                let vpc = self.settings.vpc_id.clone().ok_or_else(|| {
                    ProviderError::Invalid("the aws provider needs vpcId for target groups".into())
                })?;
                let request = self
                    .elb()
                    .await
                    .create_target_group()
                    .name(&plan.name)
                    .protocol(ProtocolEnum::from(plan.protocol))
                    .port(i32::from(plan.targets.iter().next().map_or(1, |t| t.1)))
                    .vpc_id(vpc)
                    .target_type(TargetTypeEnum::from(plan.target_type.as_str()))
                    .set_tags(Some(self.all_tags(&spec.owner, &spec.name)));
                let out = with_health_check!(request, &plan.health_check)
                    .send()
                    .await
                    .map_err(|e| from_sdk("creating a target group", e))?;
                out.target_groups()
                    .first()
                    .and_then(|t| t.target_group_arn())
                    .map(String::from)
                    .ok_or_else(|| {
                        ProviderError::Unavailable("CreateTargetGroup returned none".into())
                    })?
            }
        };
        self.ensure_attributes(&arn, plan).await?;
        self.ensure_targets(&arn, plan).await?;
        Ok(arn)
    }

    async fn check_target_group_owner(
        &self,
        spec: &LoadBalancerSpec,
        arn: &str,
    ) -> Result<(), ProviderError> {
        let tags = self.tags_of(&[arn.to_string()]).await?;
        match tags.get(arn).and_then(|t| tags::owner_from(t)) {
            Some(owner) if owner.same_owner(&spec.owner) => Ok(()),
            other => Err(tags::not_owned(arn, other)),
        }
    }

    async fn ensure_attributes(
        &self,
        arn: &str,
        plan: &TargetGroupPlan,
    ) -> Result<(), ProviderError> {
        let current = self
            .elb()
            .await
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| from_sdk("reading target group attributes", e))?;
        let current: HashMap<&str, &str> = current
            .attributes()
            .iter()
            .filter_map(|a| Some((a.key()?, a.value()?)))
            .collect();
        let changed: Vec<TargetGroupAttribute> = plan
            .attributes
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(&v.as_str()))
            .map(|(k, v)| TargetGroupAttribute::builder().key(*k).value(v).build())
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        self.elb()
            .await
            .modify_target_group_attributes()
            .target_group_arn(arn)
            .set_attributes(Some(changed))
            .send()
            .await
            .map_err(|e| from_sdk("setting target group attributes", e))?;
        Ok(())
    }

    async fn ensure_targets(&self, arn: &str, plan: &TargetGroupPlan) -> Result<(), ProviderError> {
        let health = self
            .elb()
            .await
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| from_sdk("reading registered targets", e))?;
        let current: BTreeSet<(String, u16)> = health
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some((t.id()?.to_string(), u16::try_from(t.port()?).ok()?))
            })
            .collect();
        let describe = |set: Vec<&(String, u16)>| -> Vec<TargetDescription> {
            set.into_iter()
                .map(|(id, port)| {
                    TargetDescription::builder()
                        .id(id)
                        .port(i32::from(*port))
                        .build()
                })
                .collect()
        };
        let missing = describe(plan.targets.difference(&current).collect());
        let extra = describe(current.difference(&plan.targets).collect());
        if !missing.is_empty() {
            self.elb()
                .await
                .register_targets()
                .target_group_arn(arn)
                .set_targets(Some(missing))
                .send()
                .await
                .map_err(|e| from_sdk("registering targets", e))?;
        }
        if !extra.is_empty() {
            self.elb()
                .await
                .deregister_targets()
                .target_group_arn(arn)
                .set_targets(Some(extra))
                .send()
                .await
                .map_err(|e| from_sdk("deregistering targets", e))?;
        }
        Ok(())
    }

    /// Listeners as planned: each forwards to its target group; listeners of ports no longer
    /// served go, and so do their target groups.
    async fn ensure_listeners(
        &self,
        lb_arn: &str,
        plan: &NetworkPlan,
        groups: &HashMap<u16, String>,
    ) -> Result<(), ProviderError> {
        let existing = self.listeners_of(lb_arn).await?;
        let forward = |tg: &str| {
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(tg)
                .build()
        };
        let mut stale_groups = BTreeSet::new();
        for listener in &existing {
            let port = listener.port().and_then(|p| u16::try_from(p).ok());
            let wanted = plan.listeners.iter().find(|l| Some(l.port) == port);
            let current_tg = forwarded_group(listener);
            match wanted {
                Some(w) if listener.protocol().map(|p| p.as_str()) == Some(w.protocol) => {
                    let tg = &groups[&w.port];
                    if current_tg.as_deref() != Some(tg.as_str()) {
                        self.elb()
                            .await
                            .modify_listener()
                            .listener_arn(listener.listener_arn().unwrap_or_default())
                            .default_actions(forward(tg))
                            .send()
                            .await
                            .map_err(|e| from_sdk("updating a listener", e))?;
                        stale_groups.extend(current_tg);
                    }
                }
                _ => {
                    self.delete_listener(listener.listener_arn().unwrap_or_default())
                        .await?;
                    stale_groups.extend(current_tg);
                }
            }
        }
        for wanted in &plan.listeners {
            let served = existing.iter().any(|l| {
                l.port() == Some(i32::from(wanted.port))
                    && l.protocol().map(|p| p.as_str()) == Some(wanted.protocol)
            });
            if !served {
                self.elb()
                    .await
                    .create_listener()
                    .load_balancer_arn(lb_arn)
                    .port(i32::from(wanted.port))
                    .protocol(ProtocolEnum::from(wanted.protocol))
                    .default_actions(forward(&groups[&wanted.port]))
                    .send()
                    .await
                    .map_err(|e| from_sdk("creating a listener", e))?;
            }
        }
        let in_use: BTreeSet<&String> = groups.values().collect();
        for tg in stale_groups.iter().filter(|tg| !in_use.contains(tg)) {
            self.delete_target_group(tg).await?;
        }
        Ok(())
    }

    async fn delete_target_group(&self, arn: &str) -> Result<(), ProviderError> {
        match self
            .elb()
            .await
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if crate::error::code(&e) == Some("TargetGroupNotFound") => Ok(()),
            Err(e) => Err(from_sdk("deleting a target group", e)),
        }
    }

    /// Target groups of load balancer `name` by their deterministic names, attached or not
    /// (a reconcile interrupted between creating a group and its listener leaves one behind).
    async fn own_target_groups(
        &self,
        name: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<Vec<String>, ProviderError> {
        let prefix = format!("{}-", name.as_str().chars().take(24).collect::<String>());
        let mut found = Vec::new();
        let mut marker = None;
        loop {
            let out = self
                .elb()
                .await
                .describe_target_groups()
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| from_sdk("listing target groups", e))?;
            found.extend(
                out.target_groups()
                    .iter()
                    .filter(|t| {
                        t.target_group_name()
                            .is_some_and(|n| n.starts_with(&prefix))
                    })
                    .filter_map(|t| t.target_group_arn().map(String::from)),
            );
            marker = out.next_marker().map(String::from);
            if marker.is_none() {
                break;
            }
        }
        let tags = self.tags_of(&found).await?;
        Ok(found
            .into_iter()
            .filter(|arn| {
                tags.get(arn)
                    .and_then(|t| tags::owner_from(t))
                    .is_some_and(|o| o.same_owner(owner))
            })
            .collect())
    }

    /// Load balancer `spec.name` of type `kind`: found (and checked to be ours) or created.
    async fn load_balancer(
        &self,
        spec: &LoadBalancerSpec,
        kind: LoadBalancerTypeEnum,
    ) -> Result<LoadBalancer, ProviderError> {
        let Some(lb) = self.find_load_balancer(&spec.name).await? else {
            return self.create_load_balancer(spec, kind).await;
        };
        match self.owner_of(&lb).await? {
            Some(owner) if owner.same_owner(&spec.owner) => {}
            other => return Err(tags::not_owned(spec.name.as_str(), other)),
        }
        if lb.r#type() != Some(&kind) {
            return Err(ProviderError::Invalid(format!(
                "load balancer {} is of type {}, not {kind}",
                spec.name,
                lb.r#type().map_or("unknown", |t| t.as_str())
            )));
        }
        Ok(lb)
    }

    async fn ensure_network(
        &self,
        spec: &LoadBalancerSpec,
        frontend: &NetworkFrontend,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        if spec.requested_address.is_some() {
            return Err(ProviderError::Invalid(
                "loadBalancerIP is not supported by network load balancers here (use Elastic \
                 IPs per subnet)"
                    .into(),
            ));
        }
        let plan = network::plan(&spec.name, frontend).map_err(ProviderError::Invalid)?;
        let lb = self
            .load_balancer(spec, LoadBalancerTypeEnum::Network)
            .await?;
        let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        let mut groups = HashMap::new();
        for listener in &plan.listeners {
            let ListenerPlan {
                port, target_group, ..
            } = listener;
            groups.insert(*port, self.ensure_target_group(spec, target_group).await?);
        }
        self.ensure_listeners(&lb_arn, &plan, &groups).await?;
        Ok(Self::status(&lb, &plan))
    }

    async fn ensure_application(
        &self,
        spec: &LoadBalancerSpec,
        frontend: &ApplicationFrontend,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        // Checked before anything is created or imported; TLS Secrets count as imported.
        if self.acm().await.is_some() {
            let pending =
                imported_certificates::with_references(frontend, |n| format!("import:{n}"));
            application::plan(&spec.name, &pending).map_err(ProviderError::Invalid)?;
        }
        let lb = self
            .load_balancer(spec, LoadBalancerTypeEnum::Application)
            .await?;
        let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        let served = match self.acm().await {
            Some(_) => self.served_certificates(&lb_arn).await?,
            None => Vec::new(),
        };
        let (frontend, unused_imports) = self.import_certificates(spec, frontend, &served).await?;
        let plan = application::plan(&spec.name, &frontend).map_err(ProviderError::Invalid)?;
        let mut groups = HashMap::new();
        for (backend, target_group) in &plan.target_groups {
            groups.insert(
                backend.clone(),
                self.ensure_target_group(spec, target_group).await?,
            );
        }
        self.ensure_application_listeners(&lb_arn, &plan, &groups)
            .await?;
        // No listener serves them any more.
        self.delete_imports(&unused_imports).await?;
        let ports = std::iter::once(plan.http_port)
            .chain(plan.https.as_ref().map(|h| h.port))
            .map(|port| PortStatus {
                protocol: Protocol::Tcp,
                port,
                error: None,
            })
            .collect();
        Ok(LoadBalancerStatus {
            addresses: Self::addresses(&lb),
            ports,
        })
    }

    async fn delete_listener(&self, arn: &str) -> Result<(), ProviderError> {
        self.elb()
            .await
            .delete_listener()
            .listener_arn(arn)
            .send()
            .await
            .map_err(|e| from_sdk("deleting a listener", e))?;
        Ok(())
    }

    fn addresses(lb: &LoadBalancer) -> Vec<Address> {
        lb.dns_name()
            .map(|d| vec![Address::Hostname(d.to_string())])
            .unwrap_or_default()
    }

    fn status(lb: &LoadBalancer, plan: &NetworkPlan) -> LoadBalancerStatus {
        LoadBalancerStatus {
            addresses: Self::addresses(lb),
            ports: plan
                .listeners
                .iter()
                .flat_map(|l| {
                    l.serves.iter().map(|p| PortStatus {
                        protocol: *p,
                        port: l.port,
                        error: None,
                    })
                })
                .collect(),
        }
    }

    fn observed_status(lb: &LoadBalancer, listeners: &[AwsListener]) -> LoadBalancerStatus {
        let ports = listeners
            .iter()
            .flat_map(|l| {
                let port = l.port().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
                let protocols: &[Protocol] = match l.protocol().map(|p| p.as_str()) {
                    Some("UDP") => &[Protocol::Udp],
                    Some("TCP_UDP") => &[Protocol::Tcp, Protocol::Udp],
                    _ => &[Protocol::Tcp],
                };
                protocols.iter().map(move |p| PortStatus {
                    protocol: *p,
                    port,
                    error: None,
                })
            })
            .collect();
        LoadBalancerStatus {
            addresses: Self::addresses(lb),
            ports,
        }
    }
}

fn forwarded_group(listener: &AwsListener) -> Option<String> {
    listener
        .default_actions()
        .iter()
        .find_map(|a| a.target_group_arn().map(String::from))
}

fn needs_health_check_update(existing: &TargetGroup, plan: &TargetGroupPlan) -> bool {
    let hc = &plan.health_check;
    existing.health_check_protocol().map(|p| p.as_str()) != Some(hc.protocol)
        || existing.health_check_port() != Some(hc.port.as_str())
        || (hc.path.is_some() && existing.health_check_path() != hc.path.as_deref())
        || (hc.matcher.is_some() && existing.matcher().and_then(|m| m.http_code()) != hc.matcher)
        || existing.health_check_interval_seconds() != Some(hc.interval_seconds)
        || existing.health_check_timeout_seconds() != Some(hc.timeout_seconds)
        || existing.healthy_threshold_count() != Some(hc.healthy_threshold)
        || existing.unhealthy_threshold_count() != Some(hc.unhealthy_threshold)
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError> {
        if let Some(name) = &spec.requested_address_name {
            return Err(ProviderError::Invalid(format!(
                "a named address ({name:?}) is a GCP notion; AWS load balancers here take none"
            )));
        }
        if !spec.source_ranges.is_empty() {
            // Enforcing them means security-group rules, and so the EC2 API, which this build
            // leaves out; serving everyone instead would be a silent hole.
            return Err(ProviderError::Invalid(
                "source ranges are not enforced by the aws provider (it manages no security \
                 groups); restrict the security groups named in the ProviderConfig instead"
                    .into(),
            ));
        }
        match &spec.frontend {
            Frontend::Network(frontend) => self.ensure_network(spec, frontend).await,
            Frontend::Application(frontend) => self.ensure_application(spec, frontend).await,
        }
    }

    async fn get(
        &self,
        name: &LoadBalancerName,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError> {
        let Some(lb) = self.find_load_balancer(name).await? else {
            return Ok(None);
        };
        let Some(owner) = self.owner_of(&lb).await? else {
            return Ok(None);
        };
        let listeners = self
            .listeners_of(lb.load_balancer_arn().unwrap_or_default())
            .await?;
        Ok(Some(ObservedLoadBalancer {
            name: name.clone(),
            owner,
            status: Self::observed_status(&lb, &listeners),
        }))
    }

    async fn delete(
        &self,
        name: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<(), ProviderError> {
        let lb = self.find_load_balancer(name).await?;
        // Only an application load balancer (or one already gone) may have imports.
        let may_have_imports = lb
            .as_ref()
            .is_none_or(|lb| lb.r#type() == Some(&LoadBalancerTypeEnum::Application));
        if let Some(lb) = lb {
            match self.owner_of(&lb).await? {
                Some(found) if found.same_owner(owner) => {}
                other => return Err(tags::not_owned(name.as_str(), other)),
            }
            let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
            for listener in self.listeners_of(&arn).await? {
                self.delete_listener(listener.listener_arn().unwrap_or_default())
                    .await?;
            }
            self.elb()
                .await
                .delete_load_balancer()
                .load_balancer_arn(&arn)
                .send()
                .await
                .map_err(|e| from_sdk("deleting the load balancer", e))?;
            tracing::info!(lb = %name, "deleted load balancer");
        }
        // Target groups go last: AWS refuses (ResourceInUse, retried later) while a load
        // balancer still uses them.
        for tg in self.own_target_groups(name, owner).await? {
            self.delete_target_group(&tg).await?;
        }
        if may_have_imports {
            self.delete_all_imports(owner).await?;
        }
        Ok(())
    }

    async fn list_owned(
        &self,
        cluster_id: &str,
    ) -> Result<Vec<ObservedLoadBalancer>, ProviderError> {
        let mut all = Vec::new();
        let mut marker = None;
        loop {
            let out = self
                .elb()
                .await
                .describe_load_balancers()
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| from_sdk("listing load balancers", e))?;
            all.extend(out.load_balancers().iter().cloned());
            marker = out.next_marker().map(String::from);
            if marker.is_none() {
                break;
            }
        }
        let arns: Vec<String> = all
            .iter()
            .filter_map(|lb| lb.load_balancer_arn().map(String::from))
            .collect();
        let tags = self.tags_of(&arns).await?;
        let mut owned = Vec::new();
        for lb in all {
            let arn = lb.load_balancer_arn().unwrap_or_default();
            let Some(owner) = tags.get(arn).and_then(|t| tags::owner_from(t)) else {
                continue;
            };
            let Some(name) = lb
                .load_balancer_name()
                .and_then(|n| LoadBalancerName::try_from(n.to_string()).ok())
            else {
                continue;
            };
            if owner.cluster_id != cluster_id {
                continue;
            }
            let listeners = self.listeners_of(arn).await?;
            owned.push(ObservedLoadBalancer {
                name,
                owner,
                status: Self::observed_status(&lb, &listeners),
            });
        }
        Ok(owned)
    }
}
