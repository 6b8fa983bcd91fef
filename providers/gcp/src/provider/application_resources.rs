//! Applying an [`ApplicationPlan`]: a global address, per backend a health check, zonal
//! network endpoint groups and a backend service, the URL map (and a redirecting one), target
//! proxies, certificates and global forwarding rules. Each is read first and changed only
//! where it differs; what the new state no longer uses is deleted once nothing points at it.
//! Deletion goes the other way: forwarding rules, proxies, URL maps, backend services,
//! endpoint groups, health checks, certificates, firewall, address.

use std::collections::{BTreeMap, BTreeSet};

use google_cloud_compute_v1::client::{
    BackendServices, GlobalAddresses, GlobalForwardingRules, HealthChecks, NetworkEndpointGroups,
    SslCertificates, SslPolicies, TargetHttpProxies, TargetHttpsProxies, UrlMaps,
};
use google_cloud_compute_v1::model::{
    self, Address as GceAddress, BackendService, ForwardingRule, HealthCheck, HostRule,
    NetworkEndpoint, NetworkEndpointGroup, NetworkEndpointGroupsAttachEndpointsRequest,
    NetworkEndpointGroupsDetachEndpointsRequest, PathMatcher, PathRule, SslCertificate,
    TargetHttpProxy, TargetHttpsProxy, UrlMap, UrlMapReference,
};
use portico_provider::{
    Address, ApplicationFrontend, LoadBalancerName, LoadBalancerSpec, LoadBalancerStatus,
    Ownership, PortStatus, Protocol, ProviderError,
};

use super::{GcpProvider, found, ours};
use crate::application::{self, ApplicationPlan, BackendPlan, Route};
use crate::error::from_gax;
use crate::names;
use crate::operation::wait;

pub(super) struct L7Clients {
    addresses: GlobalAddresses,
    health_checks: HealthChecks,
    endpoint_groups: NetworkEndpointGroups,
    backend_services: BackendServices,
    url_maps: UrlMaps,
    http_proxies: TargetHttpProxies,
    https_proxies: TargetHttpsProxies,
    certificates: SslCertificates,
    ssl_policies: SslPolicies,
    forwarding_rules: GlobalForwardingRules,
}

impl L7Clients {
    pub(super) async fn build(settings: &super::GcpSettings) -> Result<L7Clients, ProviderError> {
        Ok(L7Clients {
            addresses: client!(GlobalAddresses, settings),
            health_checks: client!(HealthChecks, settings),
            endpoint_groups: client!(NetworkEndpointGroups, settings),
            backend_services: client!(BackendServices, settings),
            url_maps: client!(UrlMaps, settings),
            http_proxies: client!(TargetHttpProxies, settings),
            https_proxies: client!(TargetHttpsProxies, settings),
            certificates: client!(SslCertificates, settings),
            ssl_policies: client!(SslPolicies, settings),
            forwarding_rules: client!(GlobalForwardingRules, settings),
        })
    }
}

fn http_rule(lb: &LoadBalancerName) -> String {
    format!("{lb}-http")
}

fn https_rule(lb: &LoadBalancerName) -> String {
    format!("{lb}-https")
}

fn redirect_map(lb: &LoadBalancerName) -> String {
    format!("{lb}-redirect")
}

impl GcpProvider {
    fn global(&self, collection: &str, name: &str) -> String {
        names::global_link(&self.settings.project, collection, name)
    }

    fn zonal(&self, zone: &str, collection: &str, name: &str) -> String {
        format!(
            "{}/projects/{}/zones/{zone}/{collection}/{name}",
            names::API,
            self.settings.project
        )
    }

    pub(super) async fn ensure_application(
        &self,
        spec: &LoadBalancerSpec,
        frontend: &ApplicationFrontend,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let plan = application::plan(&spec.name, frontend, &spec.source_ranges)
            .map_err(ProviderError::Invalid)?;
        let lb = &spec.name;
        let owner = &spec.owner;
        // The URL map says who owns this load balancer; checked before anything changes.
        let existing_map = self.get_url_map(&plan.url_map.name).await?;
        if let Some(m) = &existing_map {
            ours(&plan.url_map.name, m.description.as_deref(), owner)?;
        }
        let ip = self.ensure_global_address(spec).await?;
        self.ensure_firewall(spec, &plan.firewall).await?;
        let mut services = BTreeMap::new();
        for (name, backend) in &plan.backends {
            services.insert(name.clone(), self.ensure_backend(spec, backend).await?);
        }
        let (map, map_changed) = self
            .ensure_url_map(spec, &plan, &services, existing_map)
            .await?;
        let redirect = redirect_map(lb);
        let http_map = if plan.redirect_to_https {
            self.ensure_redirect_map(spec, &redirect).await?
        } else {
            map.clone()
        };
        let http_proxy = self.ensure_http_proxy(spec, &http_map).await?;
        self.ensure_global_rule(spec, &http_rule(lb), &ip, plan.http_port, &http_proxy)
            .await?;
        match &plan.https {
            Some(https) => {
                let proxy = self.ensure_https_proxy(spec, &map, https).await?;
                self.ensure_global_rule(spec, &https_rule(lb), &ip, https.port, &proxy)
                    .await?;
            }
            None => self.delete_https(lb, owner, false).await?,
        }
        if !plan.redirect_to_https {
            self.delete_url_map(&redirect, owner).await?;
        }
        // Backends no route uses any more, now that the URL map no longer points at them. Only
        // a changed map can have let go of one; listing the project's backends every
        // reconcile would cost three list calls for nothing. (One left by a reconcile killed
        // between the map update and this sweep goes at the next change or with the Ingress.)
        if map_changed {
            let wanted: BTreeSet<&str> = plan.backends.values().map(|b| b.name.as_str()).collect();
            self.delete_backends(lb, owner, &wanted).await?;
        }
        let ports = std::iter::once(plan.http_port)
            .chain(plan.https.as_ref().map(|h| h.port))
            .map(|port| PortStatus {
                protocol: Protocol::Tcp,
                port,
                error: None,
            })
            .collect();
        Ok(LoadBalancerStatus {
            addresses: ip.parse().map(Address::Ip).into_iter().collect(),
            ports,
        })
    }

    async fn get_url_map(&self, name: &str) -> Result<Option<UrlMap>, ProviderError> {
        read!(self, l7.url_maps, "reading the URL map", |c: &UrlMaps| c
            .get()
            .set_url_map(name))
    }

    async fn ensure_global_address(
        &self,
        spec: &LoadBalancerSpec,
    ) -> Result<String, ProviderError> {
        if let Some(ip) = spec.requested_address {
            return Ok(ip.to_string());
        }
        if let Some(held) = &spec.requested_address_name {
            // The user's address: used as it is, never created or released here.
            let address = read!(
                self,
                l7.addresses,
                "reading the named global address",
                |c: &GlobalAddresses| c.get().set_address(held)
            )?;
            return address.and_then(|a| a.address).ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "there is no global address {held:?} in project {}",
                    self.settings.project
                ))
            });
        }
        let name = names::base(&spec.name);
        let read = || async {
            read!(
                self,
                l7.addresses,
                "reading the global address",
                |c: &GlobalAddresses| c.get().set_address(&name)
            )
        };
        match read().await? {
            Some(a) => ours(&name, a.description.as_deref(), &spec.owner)?,
            None => {
                let mut body = GceAddress::default();
                body.name = Some(name.clone());
                body.description = Some(names::description(&spec.owner));
                body.address_type = Some(model::address::AddressType::from("EXTERNAL"));
                global!(
                    self,
                    l7.addresses,
                    "reserving the global address",
                    |c: &GlobalAddresses| c.insert().set_body(body.clone())
                )?;
            }
        }
        read()
            .await?
            .and_then(|a| a.address)
            .ok_or_else(|| ProviderError::RetryAfter {
                after: crate::error::RETRY_AFTER,
                reason: "the global address has no IP yet".into(),
            })
    }

    /// The backend's health check, endpoint groups and backend service; returns the
    /// service's link.
    async fn ensure_backend(
        &self,
        spec: &LoadBalancerSpec,
        plan: &BackendPlan,
    ) -> Result<String, ProviderError> {
        let owner = &spec.owner;
        let hc = &plan.health_check;
        let mut check = HealthCheck::default();
        check.name = Some(plan.name.clone());
        check.description = Some(names::description(owner));
        check.r#type = Some(model::health_check::Type::from("HTTP"));
        let mut http = model::HTTPHealthCheck::default();
        http.port = Some(hc.port);
        http.request_path = Some(hc.request_path.clone());
        check.http_health_check = Some(http);
        check.check_interval_sec = Some(hc.check_interval_sec);
        check.timeout_sec = Some(hc.timeout_sec);
        check.healthy_threshold = Some(hc.healthy_threshold);
        check.unhealthy_threshold = Some(hc.unhealthy_threshold);
        match read!(
            self,
            l7.health_checks,
            "reading a health check",
            |c: &HealthChecks| c.get().set_health_check(&plan.name)
        )? {
            None => global!(
                self,
                l7.health_checks,
                "creating a health check",
                |c: &HealthChecks| c.insert().set_body(check.clone())
            )?,
            Some(existing) => {
                ours(&plan.name, existing.description.as_deref(), owner)?;
                let same = existing.http_health_check == check.http_health_check
                    && existing.check_interval_sec == check.check_interval_sec
                    && existing.timeout_sec == check.timeout_sec
                    && existing.healthy_threshold == check.healthy_threshold
                    && existing.unhealthy_threshold == check.unhealthy_threshold;
                if !same {
                    global!(
                        self,
                        l7.health_checks,
                        "updating a health check",
                        |c: &HealthChecks| c
                            .patch()
                            .set_health_check(&plan.name)
                            .set_body(check.clone())
                    )?;
                }
            }
        }

        let mut groups = Vec::new();
        for (zone, group) in &plan.endpoint_groups {
            self.ensure_endpoint_group(spec, zone, group).await?;
            groups.push(self.zonal(zone, "networkEndpointGroups", &group.name));
        }

        let mut body = BackendService::default();
        body.name = Some(plan.name.clone());
        body.description = Some(names::description(owner));
        body.protocol = Some(model::backend_service::Protocol::from("HTTP"));
        body.load_balancing_scheme = Some(model::backend_service::LoadBalancingScheme::from(
            "EXTERNAL_MANAGED",
        ));
        body.health_checks = vec![self.global("healthChecks", &plan.name)];
        body.session_affinity = Some(model::backend_service::SessionAffinity::from(
            plan.session_affinity,
        ));
        body.affinity_cookie_ttl_sec = plan.affinity_cookie_ttl_sec;
        body.timeout_sec = Some(plan.timeout_sec);
        let mut draining = model::ConnectionDraining::default();
        draining.draining_timeout_sec = Some(plan.draining_timeout_sec);
        body.connection_draining = Some(draining);
        body.backends = groups
            .iter()
            .map(|g| {
                let mut b = model::Backend::default();
                b.group = Some(g.clone());
                b.balancing_mode = Some(model::backend::BalancingMode::from("RATE"));
                b.max_rate_per_endpoint = Some(1000.0);
                b
            })
            .collect();
        let existing = read!(
            self,
            l7.backend_services,
            "reading a backend service",
            |c: &BackendServices| c.get().set_backend_service(&plan.name)
        )?;
        match existing {
            None => global!(
                self,
                l7.backend_services,
                "creating a backend service",
                |c: &BackendServices| c.insert().set_body(body.clone())
            )?,
            Some(existing) => {
                ours(&plan.name, existing.description.as_deref(), owner)?;
                let groups_of = |s: &BackendService| -> BTreeSet<String> {
                    s.backends.iter().filter_map(|b| b.group.clone()).collect()
                };
                let same = groups_of(&existing) == groups_of(&body)
                    && existing.health_checks == body.health_checks
                    && existing.session_affinity == body.session_affinity
                    && existing.affinity_cookie_ttl_sec == body.affinity_cookie_ttl_sec
                    && existing.timeout_sec == body.timeout_sec
                    && existing.connection_draining == body.connection_draining;
                if !same {
                    body.fingerprint = existing.fingerprint.clone();
                    global!(
                        self,
                        l7.backend_services,
                        "updating a backend service",
                        |c: &BackendServices| c
                            .patch()
                            .set_backend_service(&plan.name)
                            .set_body(body.clone())
                    )?;
                    // Endpoint groups of zones the service no longer uses.
                    for stale in groups_of(&existing).difference(&groups_of(&body)) {
                        self.delete_endpoint_group_link(stale).await?;
                    }
                }
            }
        }
        Ok(self.global("backendServices", &plan.name))
    }

    async fn ensure_endpoint_group(
        &self,
        spec: &LoadBalancerSpec,
        zone: &str,
        group: &application::EndpointGroupPlan,
    ) -> Result<(), ProviderError> {
        let c = &self.l7().await?.endpoint_groups;
        let project = &self.settings.project;
        let zonal_wait = |what: &'static str, started| {
            wait(what, self.operation_timeout, started, move |op| {
                c.get_operation()
                    .set_project(project)
                    .set_zone(zone)
                    .set_operation(op)
                    .send()
            })
        };
        let existing = found(
            "reading an endpoint group",
            c.get()
                .set_project(project)
                .set_zone(zone)
                .set_network_endpoint_group(&group.name)
                .send()
                .await,
        )?;
        match existing {
            Some(e) => ours(&group.name, e.description.as_deref(), &spec.owner)?,
            None => {
                let mut body = NetworkEndpointGroup::default();
                body.name = Some(group.name.clone());
                body.description = Some(names::description(&spec.owner));
                body.network = Some(self.network_link());
                body.network_endpoint_type = Some(
                    model::network_endpoint_group::NetworkEndpointType::from("GCE_VM_IP_PORT"),
                );
                zonal_wait(
                    "creating an endpoint group",
                    c.insert()
                        .set_project(project)
                        .set_zone(zone)
                        .set_body(body)
                        .send()
                        .await,
                )
                .await?;
            }
        }
        let listed = c
            .list_network_endpoints()
            .set_project(project)
            .set_zone(zone)
            .set_network_endpoint_group(&group.name)
            .set_body(model::NetworkEndpointGroupsListEndpointsRequest::default())
            .send()
            .await
            .map_err(|e| from_gax("listing endpoints", e))?;
        let current: BTreeSet<(String, String, u16)> = listed
            .items
            .iter()
            .filter_map(|i| {
                let e = i.network_endpoint.as_ref()?;
                Some((
                    names::name_of(e.instance.as_deref()?).to_string(),
                    e.ip_address.clone()?,
                    u16::try_from(e.port?).ok()?,
                ))
            })
            .collect();
        let endpoint = |(instance, ip, port): &(String, String, u16)| {
            let mut e = NetworkEndpoint::default();
            e.instance = Some(instance.clone());
            e.ip_address = Some(ip.clone());
            e.port = Some(i32::from(*port));
            e
        };
        let missing: Vec<NetworkEndpoint> =
            group.endpoints.difference(&current).map(endpoint).collect();
        let extra: Vec<NetworkEndpoint> =
            current.difference(&group.endpoints).map(endpoint).collect();
        if !missing.is_empty() {
            let mut body = NetworkEndpointGroupsAttachEndpointsRequest::default();
            body.network_endpoints = missing;
            zonal_wait(
                "attaching endpoints",
                c.attach_network_endpoints()
                    .set_project(project)
                    .set_zone(zone)
                    .set_network_endpoint_group(&group.name)
                    .set_body(body)
                    .send()
                    .await,
            )
            .await?;
        }
        if !extra.is_empty() {
            let mut body = NetworkEndpointGroupsDetachEndpointsRequest::default();
            body.network_endpoints = extra;
            zonal_wait(
                "detaching endpoints",
                c.detach_network_endpoints()
                    .set_project(project)
                    .set_zone(zone)
                    .set_network_endpoint_group(&group.name)
                    .set_body(body)
                    .send()
                    .await,
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes the endpoint group at `link` (`…/zones/{zone}/networkEndpointGroups/{name}`).
    async fn delete_endpoint_group_link(&self, link: &str) -> Result<(), ProviderError> {
        let mut parts = link.rsplit('/');
        let (Some(name), Some(_), Some(zone)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(());
        };
        let c = &self.l7().await?.endpoint_groups;
        let project = &self.settings.project;
        wait(
            "deleting an endpoint group",
            self.operation_timeout,
            c.delete()
                .set_project(project)
                .set_zone(zone)
                .set_network_endpoint_group(name)
                .send()
                .await,
            |op| {
                c.get_operation()
                    .set_project(project)
                    .set_zone(zone)
                    .set_operation(op)
                    .send()
            },
        )
        .await
    }

    /// The URL map as planned; its link, and whether it was created or changed.
    async fn ensure_url_map(
        &self,
        spec: &LoadBalancerSpec,
        plan: &ApplicationPlan,
        services: &BTreeMap<String, String>,
        existing: Option<UrlMap>,
    ) -> Result<(String, bool), ProviderError> {
        let plan_map = &plan.url_map;
        // URL maps need a service even where every request is refused.
        let any_service = services.values().next().cloned().unwrap_or_default();
        let not_found = || {
            let mut abort = model::HttpFaultAbort::default();
            abort.http_status = Some(404);
            abort.percentage = Some(100.0);
            let mut fault = model::HttpFaultInjection::default();
            fault.abort = Some(abort);
            let mut action = model::HttpRouteAction::default();
            action.fault_injection_policy = Some(fault);
            action
        };
        let route = |r: &Route| match r {
            Route::Backend(b) => (Some(services[b].clone()), None),
            Route::NotFound => (Some(any_service.clone()), Some(not_found())),
        };
        let mut body = UrlMap::default();
        body.name = Some(plan_map.name.clone());
        body.description = Some(names::description(&spec.owner));
        (body.default_service, body.default_route_action) = route(&plan_map.default);
        body.host_rules = plan_map
            .host_rules
            .iter()
            .map(|h| {
                let mut rule = HostRule::default();
                rule.hosts = h.hosts.clone();
                rule.path_matcher = Some(h.path_matcher.clone());
                rule
            })
            .collect();
        body.path_matchers = plan_map
            .path_matchers
            .iter()
            .map(|m| {
                let mut matcher = PathMatcher::default();
                matcher.name = Some(m.name.clone());
                (matcher.default_service, matcher.default_route_action) = route(&m.default);
                matcher.path_rules = m
                    .path_rules
                    .iter()
                    .map(|(paths, backend)| {
                        let mut rule = PathRule::default();
                        rule.paths = paths.clone();
                        rule.service = Some(services[backend].clone());
                        rule
                    })
                    .collect();
                matcher
            })
            .collect();
        match existing {
            None => {
                global!(self, l7.url_maps, "creating the URL map", |c: &UrlMaps| c
                    .insert()
                    .set_body(body.clone()))?;
                Ok((self.global("urlMaps", &plan_map.name), true))
            }
            Some(existing) => {
                let same = existing.default_service == body.default_service
                    && existing.default_route_action == body.default_route_action
                    && existing.host_rules == body.host_rules
                    && existing.path_matchers == body.path_matchers;
                if !same {
                    body.fingerprint = existing.fingerprint.clone();
                    global!(self, l7.url_maps, "updating the URL map", |c: &UrlMaps| c
                        .update()
                        .set_url_map(&plan_map.name)
                        .set_body(body.clone()))?;
                }
                Ok((self.global("urlMaps", &plan_map.name), !same))
            }
        }
    }

    async fn ensure_redirect_map(
        &self,
        spec: &LoadBalancerSpec,
        name: &str,
    ) -> Result<String, ProviderError> {
        match self.get_url_map(name).await? {
            Some(existing) => ours(name, existing.description.as_deref(), &spec.owner)?,
            None => {
                let mut redirect = model::HttpRedirectAction::default();
                redirect.https_redirect = Some(true);
                redirect.redirect_response_code =
                    Some(model::http_redirect_action::RedirectResponseCode::from(
                        "MOVED_PERMANENTLY_DEFAULT",
                    ));
                let mut body = UrlMap::default();
                body.name = Some(name.to_string());
                body.description = Some(names::description(&spec.owner));
                body.default_url_redirect = Some(redirect);
                global!(
                    self,
                    l7.url_maps,
                    "creating the redirect URL map",
                    |c: &UrlMaps| c.insert().set_body(body.clone())
                )?;
            }
        }
        Ok(self.global("urlMaps", name))
    }

    async fn ensure_http_proxy(
        &self,
        spec: &LoadBalancerSpec,
        map: &str,
    ) -> Result<String, ProviderError> {
        let name = names::base(&spec.name);
        let existing = read!(
            self,
            l7.http_proxies,
            "reading the HTTP proxy",
            |c: &TargetHttpProxies| c.get().set_target_http_proxy(&name)
        )?;
        match existing {
            None => {
                let mut body = TargetHttpProxy::default();
                body.name = Some(name.clone());
                body.description = Some(names::description(&spec.owner));
                body.url_map = Some(map.to_string());
                global!(
                    self,
                    l7.http_proxies,
                    "creating the HTTP proxy",
                    |c: &TargetHttpProxies| c.insert().set_body(body.clone())
                )?;
            }
            Some(existing) => {
                ours(&name, existing.description.as_deref(), &spec.owner)?;
                if existing.url_map.as_deref() != Some(map) {
                    let mut reference = UrlMapReference::default();
                    reference.url_map = Some(map.to_string());
                    global!(
                        self,
                        l7.http_proxies,
                        "pointing the HTTP proxy at its URL map",
                        |c: &TargetHttpProxies| c
                            .set_url_map()
                            .set_target_http_proxy(&name)
                            .set_body(reference.clone())
                    )?;
                }
            }
        }
        Ok(self.global("targetHttpProxies", &name))
    }

    async fn ensure_https_proxy(
        &self,
        spec: &LoadBalancerSpec,
        map: &str,
        https: &application::HttpsPlan,
    ) -> Result<String, ProviderError> {
        let owner = &spec.owner;
        for cert in &https.certificates {
            let existing = read!(
                self,
                l7.certificates,
                "reading a certificate",
                |c: &SslCertificates| c.get().set_ssl_certificate(&cert.name)
            )?;
            match existing {
                Some(e) => ours(&cert.name, e.description.as_deref(), owner)?,
                None => {
                    let mut body = SslCertificate::default();
                    body.name = Some(cert.name.clone());
                    body.description = Some(names::description(owner));
                    body.certificate = Some(cert.chain.clone());
                    body.private_key = Some(cert.key.clone());
                    global!(
                        self,
                        l7.certificates,
                        "creating a certificate",
                        |c: &SslCertificates| c.insert().set_body(body.clone())
                    )?;
                }
            }
        }
        let wanted: Vec<String> = https
            .certificates
            .iter()
            .map(|c| c.name.as_str())
            .chain(https.pre_shared.iter().map(String::as_str))
            .map(|n| self.global("sslCertificates", n))
            .collect();
        let name = names::base(&spec.name);
        let policy = self.ensure_ssl_policy(spec, https).await?;
        let existing = read!(
            self,
            l7.https_proxies,
            "reading the HTTPS proxy",
            |c: &TargetHttpsProxies| c.get().set_target_https_proxy(&name)
        )?;
        let mut replaced = Vec::new();
        match existing {
            None => {
                let mut body = TargetHttpsProxy::default();
                body.name = Some(name.clone());
                body.description = Some(names::description(owner));
                body.url_map = Some(map.to_string());
                body.ssl_certificates = wanted.clone();
                body.ssl_policy = Some(policy.clone());
                global!(
                    self,
                    l7.https_proxies,
                    "creating the HTTPS proxy",
                    |c: &TargetHttpsProxies| c.insert().set_body(body.clone())
                )?;
            }
            Some(existing) => {
                ours(&name, existing.description.as_deref(), owner)?;
                if existing.ssl_certificates != wanted {
                    let mut body = model::TargetHttpsProxiesSetSslCertificatesRequest::default();
                    body.ssl_certificates = wanted.clone();
                    global!(
                        self,
                        l7.https_proxies,
                        "swapping the HTTPS proxy's certificates",
                        |c: &TargetHttpsProxies| c
                            .set_ssl_certificates()
                            .set_target_https_proxy(&name)
                            .set_body(body.clone())
                    )?;
                    replaced = existing
                        .ssl_certificates
                        .iter()
                        .filter(|c| !wanted.contains(c))
                        .cloned()
                        .collect();
                }
                if existing.ssl_policy.as_deref() != Some(policy.as_str()) {
                    let mut reference = model::SslPolicyReference::default();
                    reference.ssl_policy = Some(policy.clone());
                    global!(
                        self,
                        l7.https_proxies,
                        "setting the HTTPS proxy's SSL policy",
                        |c: &TargetHttpsProxies| c
                            .set_ssl_policy()
                            .set_target_https_proxy(&name)
                            .set_body(reference.clone())
                    )?;
                }
                if existing.url_map.as_deref() != Some(map) {
                    let mut reference = UrlMapReference::default();
                    reference.url_map = Some(map.to_string());
                    global!(
                        self,
                        l7.https_proxies,
                        "pointing the HTTPS proxy at its URL map",
                        |c: &TargetHttpsProxies| c
                            .set_url_map()
                            .set_target_https_proxy(&name)
                            .set_body(reference.clone())
                    )?;
                }
            }
        }
        // The certificates a rotation replaced, now that the proxy no longer serves them.
        for link in replaced {
            self.delete_certificate(names::name_of(&link), owner)
                .await?;
        }
        Ok(self.global("targetHttpsProxies", &name))
    }

    /// The SSL policy `<lb>` with the plan's lowest TLS version; returns its link.
    async fn ensure_ssl_policy(
        &self,
        spec: &LoadBalancerSpec,
        https: &application::HttpsPlan,
    ) -> Result<String, ProviderError> {
        let name = names::base(&spec.name);
        let mut body = model::SslPolicy::default();
        body.name = Some(name.clone());
        body.description = Some(names::description(&spec.owner));
        body.profile = Some(model::ssl_policy::Profile::from(https.ssl_profile));
        body.min_tls_version = Some(model::ssl_policy::MinTlsVersion::from(
            https.min_tls_version,
        ));
        let existing = read!(
            self,
            l7.ssl_policies,
            "reading the SSL policy",
            |c: &SslPolicies| c.get().set_ssl_policy(&name)
        )?;
        match existing {
            None => global!(
                self,
                l7.ssl_policies,
                "creating the SSL policy",
                |c: &SslPolicies| c.insert().set_body(body.clone())
            )?,
            Some(existing) => {
                ours(&name, existing.description.as_deref(), &spec.owner)?;
                if existing.min_tls_version != body.min_tls_version
                    || existing.profile != body.profile
                {
                    body.fingerprint = existing.fingerprint.clone();
                    global!(
                        self,
                        l7.ssl_policies,
                        "updating the SSL policy",
                        |c: &SslPolicies| c.patch().set_ssl_policy(&name).set_body(body.clone())
                    )?;
                }
            }
        }
        Ok(self.global("sslPolicies", &name))
    }

    async fn ensure_global_rule(
        &self,
        spec: &LoadBalancerSpec,
        name: &str,
        ip: &str,
        port: u16,
        target: &str,
    ) -> Result<(), ProviderError> {
        let mut body = ForwardingRule::default();
        body.name = Some(name.to_string());
        body.description = Some(names::description(&spec.owner));
        body.ip_address = Some(ip.to_string());
        body.ip_protocol = Some(model::forwarding_rule::IPProtocol::from("TCP"));
        body.port_range = Some(port.to_string());
        body.target = Some(target.to_string());
        body.load_balancing_scheme = Some(model::forwarding_rule::LoadBalancingScheme::from(
            "EXTERNAL_MANAGED",
        ));
        let existing = self.get_global_rule(name).await?;
        if let Some(existing) = existing {
            ours(name, existing.description.as_deref(), &spec.owner)?;
            if existing.ip_address == body.ip_address
                && existing.port_range == body.port_range
                && existing.target == body.target
            {
                return Ok(());
            }
            self.delete_global_rule(name).await?;
        }
        global!(
            self,
            l7.forwarding_rules,
            "creating a global forwarding rule",
            |c: &GlobalForwardingRules| c.insert().set_body(body.clone())
        )
    }

    async fn get_global_rule(&self, name: &str) -> Result<Option<ForwardingRule>, ProviderError> {
        read!(
            self,
            l7.forwarding_rules,
            "reading a global forwarding rule",
            |c: &GlobalForwardingRules| c.get().set_forwarding_rule(name)
        )
    }

    async fn delete_global_rule(&self, name: &str) -> Result<(), ProviderError> {
        global!(
            self,
            l7.forwarding_rules,
            "deleting a global forwarding rule",
            |c: &GlobalForwardingRules| c.delete().set_forwarding_rule(name)
        )
    }

    /// The HTTPS forwarding rule, proxy, SSL policy and Portico's certificates of `lb`: those
    /// the proxy served, or with `sweep` every one of `lb`'s in the project (also those a
    /// reconcile created and was killed before attaching).
    async fn delete_https(
        &self,
        lb: &LoadBalancerName,
        owner: &Ownership,
        sweep: bool,
    ) -> Result<(), ProviderError> {
        let rule = https_rule(lb);
        if let Some(existing) = self.get_global_rule(&rule).await? {
            ours(&rule, existing.description.as_deref(), owner)?;
            self.delete_global_rule(&rule).await?;
        }
        let name = names::base(lb);
        let proxy = read!(
            self,
            l7.https_proxies,
            "reading the HTTPS proxy",
            |c: &TargetHttpsProxies| c.get().set_target_https_proxy(&name)
        )?;
        let mut served = Vec::new();
        if let Some(proxy) = proxy {
            ours(&name, proxy.description.as_deref(), owner)?;
            global!(
                self,
                l7.https_proxies,
                "deleting the HTTPS proxy",
                |c: &TargetHttpsProxies| c.delete().set_target_https_proxy(&name)
            )?;
            served = proxy.ssl_certificates;
        }
        let policy = read!(
            self,
            l7.ssl_policies,
            "reading the SSL policy",
            |c: &SslPolicies| c.get().set_ssl_policy(&name)
        )?;
        if let Some(policy) = policy {
            ours(&name, policy.description.as_deref(), owner)?;
            global!(
                self,
                l7.ssl_policies,
                "deleting the SSL policy",
                |c: &SslPolicies| c.delete().set_ssl_policy(&name)
            )?;
        }
        if !sweep {
            for link in &served {
                self.delete_certificate(names::name_of(link), owner).await?;
            }
            return Ok(());
        }
        let listed = self
            .l7()
            .await?
            .certificates
            .list()
            .set_project(&self.settings.project)
            .send()
            .await
            .map_err(|e| from_gax("listing certificates", e))?;
        let prefix = format!("{lb}-");
        for cert in listed.items {
            let Some(cert_name) = cert.name.as_deref().filter(|n| n.starts_with(&prefix)) else {
                continue;
            };
            if names::owner_from(cert.description.as_deref()).is_some_and(|o| o.same_owner(owner)) {
                self.delete_certificate(cert_name, owner).await?;
            }
        }
        Ok(())
    }

    async fn delete_certificate(&self, name: &str, owner: &Ownership) -> Result<(), ProviderError> {
        let existing = read!(
            self,
            l7.certificates,
            "reading a certificate",
            |c: &SslCertificates| c.get().set_ssl_certificate(name)
        )?;
        // Pre-shared certificates are not ours to delete.
        let Some(existing) = existing else {
            return Ok(());
        };
        if !names::owner_from(existing.description.as_deref()).is_some_and(|o| o.same_owner(owner))
        {
            return Ok(());
        }
        global!(
            self,
            l7.certificates,
            "deleting a certificate",
            |c: &SslCertificates| c.delete().set_ssl_certificate(name)
        )
    }

    async fn delete_url_map(&self, name: &str, owner: &Ownership) -> Result<(), ProviderError> {
        if let Some(existing) = self.get_url_map(name).await? {
            ours(name, existing.description.as_deref(), owner)?;
            global!(self, l7.url_maps, "deleting a URL map", |c: &UrlMaps| c
                .delete()
                .set_url_map(name))?;
        }
        Ok(())
    }

    /// Portico's backend services of `lb` (with their endpoint groups and health checks)
    /// except those named in `keep`; found by listing, so a reconcile killed before its URL
    /// map referenced them leaves nothing behind.
    async fn delete_backends(
        &self,
        lb: &LoadBalancerName,
        owner: &Ownership,
        keep: &BTreeSet<&str>,
    ) -> Result<(), ProviderError> {
        let clients = self.l7().await?;
        let prefix = format!("{lb}-");
        let mine = |name: Option<&str>, description: Option<&str>| {
            name.filter(|n| n.starts_with(&prefix) && !keep.contains(n))
                .filter(|_| names::owner_from(description).is_some_and(|o| o.same_owner(owner)))
                .map(String::from)
        };
        let services = clients
            .backend_services
            .list()
            .set_project(&self.settings.project)
            .send()
            .await
            .map_err(|e| from_gax("listing backend services", e))?;
        for service in services.items {
            let Some(name) = mine(service.name.as_deref(), service.description.as_deref()) else {
                continue;
            };
            global!(
                self,
                l7.backend_services,
                "deleting a backend service",
                |c: &BackendServices| c.delete().set_backend_service(&name)
            )?;
        }
        let groups = clients
            .endpoint_groups
            .aggregated_list()
            .set_project(&self.settings.project)
            .send()
            .await
            .map_err(|e| from_gax("listing endpoint groups", e))?;
        for scoped in groups.items.values() {
            for group in &scoped.network_endpoint_groups {
                // `<service name>-<zone>`: kept while its service is.
                let kept = group
                    .name
                    .as_deref()
                    .is_some_and(|n| keep.iter().any(|k| n.starts_with(&format!("{k}-"))));
                if kept || mine(group.name.as_deref(), group.description.as_deref()).is_none() {
                    continue;
                }
                if let Some(link) = &group.self_link {
                    self.delete_endpoint_group_link(link).await?;
                }
            }
        }
        let checks = clients
            .health_checks
            .list()
            .set_project(&self.settings.project)
            .send()
            .await
            .map_err(|e| from_gax("listing health checks", e))?;
        for check in checks.items {
            let Some(name) = mine(check.name.as_deref(), check.description.as_deref()) else {
                continue;
            };
            global!(
                self,
                l7.health_checks,
                "deleting a health check",
                |c: &HealthChecks| c.delete().set_health_check(&name)
            )?;
        }
        Ok(())
    }

    /// Everything of application load balancer `lb`, in dependency order; true when it had
    /// a URL map (it was one).
    pub(super) async fn delete_application(
        &self,
        lb: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<bool, ProviderError> {
        let base = names::base(lb);
        let existed = match self.get_url_map(&base).await? {
            Some(m) => {
                ours(&base, m.description.as_deref(), owner)?;
                true
            }
            None => false,
        };
        let rule = http_rule(lb);
        if let Some(existing) = self.get_global_rule(&rule).await? {
            ours(&rule, existing.description.as_deref(), owner)?;
            self.delete_global_rule(&rule).await?;
        }
        self.delete_https(lb, owner, true).await?;
        let proxy = read!(
            self,
            l7.http_proxies,
            "reading the HTTP proxy",
            |c: &TargetHttpProxies| c.get().set_target_http_proxy(&base)
        )?;
        if let Some(proxy) = proxy {
            ours(&base, proxy.description.as_deref(), owner)?;
            global!(
                self,
                l7.http_proxies,
                "deleting the HTTP proxy",
                |c: &TargetHttpProxies| c.delete().set_target_http_proxy(&base)
            )?;
        }
        self.delete_url_map(&redirect_map(lb), owner).await?;
        self.delete_url_map(&base, owner).await?;
        self.delete_backends(lb, owner, &BTreeSet::new()).await?;
        let address = read!(
            self,
            l7.addresses,
            "reading the global address",
            |c: &GlobalAddresses| c.get().set_address(&base)
        )?;
        if let Some(address) = address {
            ours(&base, address.description.as_deref(), owner)?;
            global!(
                self,
                l7.addresses,
                "releasing the global address",
                |c: &GlobalAddresses| c.delete().set_address(&base)
            )?;
        }
        Ok(existed)
    }

    /// What the global forwarding rules of `lb` serve, on which IP.
    pub(super) async fn observed_application(
        &self,
        lb: &LoadBalancerName,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let mut status = LoadBalancerStatus::default();
        for name in [http_rule(lb), https_rule(lb)] {
            let Some(rule) = self.get_global_rule(&name).await? else {
                continue;
            };
            if let Some(ip) = rule.ip_address.as_deref().and_then(|ip| ip.parse().ok()) {
                let address = Address::Ip(ip);
                if !status.addresses.contains(&address) {
                    status.addresses.push(address);
                }
            }
            if let Some(port) = rule
                .port_range
                .as_deref()
                .and_then(|p| p.split('-').next()?.parse().ok())
            {
                status.ports.push(PortStatus {
                    protocol: Protocol::Tcp,
                    port,
                    error: None,
                });
            }
        }
        Ok(status)
    }

    /// The owners of this project's URL maps (application load balancers) by name.
    pub(super) async fn url_map_owners(
        &self,
    ) -> Result<Vec<(String, Option<Ownership>)>, ProviderError> {
        let maps = self
            .l7()
            .await?
            .url_maps
            .list()
            .set_project(&self.settings.project)
            .send()
            .await
            .map_err(|e| from_gax("listing URL maps", e))?;
        Ok(maps
            .items
            .into_iter()
            .filter_map(|m| {
                let name = m.name?;
                Some((name, names::owner_from(m.description.as_deref())))
            })
            .collect())
    }

    pub(super) async fn url_map_owner(
        &self,
        lb: &LoadBalancerName,
    ) -> Result<Option<Option<Ownership>>, ProviderError> {
        Ok(self
            .get_url_map(&names::base(lb))
            .await?
            .map(|m| names::owner_from(m.description.as_deref())))
    }
}
