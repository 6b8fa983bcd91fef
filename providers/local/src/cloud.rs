//! The control plane: the load balancers the daemon holds, their addresses and data planes,
//! kept in step with the state file.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use portico_provider::{
    Address, ApplicationFrontend, Frontend, LoadBalancerName, LoadBalancerSpec, LoadBalancerStatus,
    ObservedLoadBalancer, Ownership, Probe, SessionAffinity, TargetPool,
};
use tokio::sync::Mutex;

use crate::dataplane::http::balance::is_valid_cookie_name;
use crate::dataplane::http::tls::CertStore;
use crate::dataplane::{self, Plan};
use crate::metrics;
use crate::pool::{AddressPool, Allocator, PoolError};
use crate::store::{Store, StoreError, StoredLoadBalancer};

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The spec cannot be served as it stands.
    #[error("{0}")]
    Invalid(String),
    #[error("load balancer {name} belongs to {owner}", owner = describe(.owner))]
    NotOwned {
        name: LoadBalancerName,
        owner: Ownership,
    },
    /// The requested address is outside the pool or taken, or the pool is full.
    #[error(transparent)]
    Address(#[from] PoolError),
    #[error("load balancer {0} does not exist")]
    NotFound(LoadBalancerName),
    /// Nothing was changed: the state could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How an owner reads in errors and logs.
pub fn describe(owner: &Ownership) -> String {
    format!(
        "{} (uid {}) of cluster {}",
        owner.object_ref, owner.object_uid, owner.cluster_id
    )
}

pub struct Cloud {
    store: Store,
    inner: Mutex<Registry>,
}

struct Registry {
    allocator: Allocator,
    lbs: BTreeMap<LoadBalancerName, Entry>,
}

struct Entry {
    spec: LoadBalancerSpec,
    address: Ipv4Addr,
    dataplane: dataplane::LoadBalancer,
}

impl Entry {
    fn status(&self) -> LoadBalancerStatus {
        LoadBalancerStatus {
            addresses: vec![Address::Ip(self.address.into())],
            ports: self.dataplane.ports().to_vec(),
        }
    }

    fn observed(&self) -> ObservedLoadBalancer {
        ObservedLoadBalancer {
            name: self.spec.name.clone(),
            owner: self.spec.owner.clone(),
            status: self.status(),
        }
    }

    fn stored(&self) -> StoredLoadBalancer {
        StoredLoadBalancer {
            address: self.address,
            spec: self.spec.clone(),
        }
    }
}

impl Cloud {
    /// Loads the state file and brings every load balancer in it back up on its address.
    pub async fn open(store: Store, pool: AddressPool) -> Result<Arc<Cloud>, StoreError> {
        let state = store.load()?;
        let mut registry = Registry {
            allocator: Allocator::new(pool),
            lbs: BTreeMap::new(),
        };
        for StoredLoadBalancer { address, spec } in state.load_balancers {
            let name = spec.name.clone();
            if registry.lbs.contains_key(&name) {
                tracing::error!(lb = %name, "listed twice in the state file; keeping the first");
                continue;
            }
            if let Err(e) = registry.allocator.claim(address) {
                tracing::error!(lb = %name, %address, error = %e, "cannot restore load balancer");
                continue;
            }
            if !pool.contains(address.into()) {
                tracing::warn!(lb = %name, %address, %pool, "restored on an address outside the pool");
            }
            let plan = match validate(&spec) {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(lb = %name, error = %e, "stored spec is invalid; serving no ports");
                    Plan::Network(Vec::new())
                }
            };
            let mut dataplane = dataplane::LoadBalancer::new(name.as_str(), address.into());
            dataplane.apply_plan(&spec.source_ranges, &plan).await;
            tracing::info!(lb = %name, %address, "restored load balancer");
            registry.lbs.insert(
                name,
                Entry {
                    spec,
                    address,
                    dataplane,
                },
            );
        }
        Ok(Arc::new(Cloud {
            store,
            inner: Mutex::new(registry),
        }))
    }

    /// Creates the load balancer or brings it to `spec`. Idempotent: the same spec again
    /// changes nothing (unless a port failed to bind, which is then retried). A new address
    /// comes from `within` (a part of the pool) when given; an existing load balancer keeps its
    /// address, as after a change of `--pool`.
    pub async fn ensure(
        &self,
        name: &LoadBalancerName,
        spec: LoadBalancerSpec,
        within: Option<AddressPool>,
    ) -> Result<LoadBalancerStatus, CloudError> {
        if spec.name != *name {
            return Err(CloudError::Invalid(format!(
                "the spec names {} but the path {name}",
                spec.name
            )));
        }
        let plan = validate(&spec).map_err(CloudError::Invalid)?;
        let mut guard = self.inner.lock().await;
        let registry = &mut *guard;

        let Some(entry) = registry.lbs.get(name) else {
            return self.create(registry, spec, &plan, within).await;
        };
        if !entry.spec.owner.same_owner(&spec.owner) {
            return Err(CloudError::NotOwned {
                name: name.clone(),
                owner: entry.spec.owner.clone(),
            });
        }
        let moving = spec
            .requested_address
            .is_some_and(|a| a != IpAddr::V4(entry.address));
        if moving {
            return self.move_address(registry, spec, &plan, within).await;
        }
        if entry.spec == spec && !entry.dataplane.has_failed_ports() {
            return Ok(entry.status());
        }
        let address = entry.address;
        self.save(
            registry,
            Some(StoredLoadBalancer {
                address,
                spec: spec.clone(),
            }),
            name,
        )
        .await?;
        let entry = registry.lbs.get_mut(name).expect("checked above");
        entry.dataplane.apply_plan(&spec.source_ranges, &plan).await;
        if entry.spec != spec {
            tracing::info!(lb = %name, %address, "updated load balancer");
        }
        entry.spec = spec;
        Ok(entry.status())
    }

    async fn create(
        &self,
        registry: &mut Registry,
        spec: LoadBalancerSpec,
        plan: &Plan,
        within: Option<AddressPool>,
    ) -> Result<LoadBalancerStatus, CloudError> {
        let name = spec.name.clone();
        let address = registry
            .allocator
            .allocate_within(spec.requested_address, within)?;
        let record = StoredLoadBalancer {
            address,
            spec: spec.clone(),
        };
        if let Err(e) = self.save(registry, Some(record), &name).await {
            registry.allocator.release(address);
            return Err(e.into());
        }
        let mut dataplane = dataplane::LoadBalancer::new(name.as_str(), address.into());
        dataplane.apply_plan(&spec.source_ranges, plan).await;
        tracing::info!(lb = %name, %address, owner = %describe(&spec.owner), "created load balancer");
        let entry = Entry {
            spec,
            address,
            dataplane,
        };
        let status = entry.status();
        registry.lbs.insert(name, entry);
        Ok(status)
    }

    /// A different `requested_address` for an existing load balancer: serve it from the new
    /// address and free the old one. Its connections end, as the address they use is gone.
    async fn move_address(
        &self,
        registry: &mut Registry,
        spec: LoadBalancerSpec,
        plan: &Plan,
        within: Option<AddressPool>,
    ) -> Result<LoadBalancerStatus, CloudError> {
        let name = spec.name.clone();
        let address = registry
            .allocator
            .allocate_within(spec.requested_address, within)?;
        let record = StoredLoadBalancer {
            address,
            spec: spec.clone(),
        };
        if let Err(e) = self.save(registry, Some(record), &name).await {
            registry.allocator.release(address);
            return Err(e.into());
        }
        let old = registry.lbs.remove(&name).expect("the caller found it");
        old.dataplane.shutdown().await;
        registry.allocator.release(old.address);
        let mut dataplane = dataplane::LoadBalancer::new(name.as_str(), address.into());
        dataplane.apply_plan(&spec.source_ranges, plan).await;
        tracing::info!(lb = %name, from = %old.address, to = %address, "moved load balancer");
        let entry = Entry {
            spec,
            address,
            dataplane,
        };
        let status = entry.status();
        registry.lbs.insert(name, entry);
        Ok(status)
    }

    pub async fn get(&self, name: &LoadBalancerName) -> Option<ObservedLoadBalancer> {
        self.inner.lock().await.lbs.get(name).map(Entry::observed)
    }

    /// Every load balancer, or those of one cluster.
    pub async fn list(&self, cluster_id: Option<&str>) -> Vec<ObservedLoadBalancer> {
        self.inner
            .lock()
            .await
            .lbs
            .values()
            .filter(|e| cluster_id.is_none_or(|c| e.spec.owner.cluster_id == c))
            .map(Entry::observed)
            .collect()
    }

    /// Deletes the load balancer when `owner` owns it: its listeners stop, its connections
    /// close and its address is free again.
    pub async fn delete(
        &self,
        name: &LoadBalancerName,
        owner: &Ownership,
    ) -> Result<(), CloudError> {
        let mut guard = self.inner.lock().await;
        let registry = &mut *guard;
        let Some(entry) = registry.lbs.get(name) else {
            return Err(CloudError::NotFound(name.clone()));
        };
        if !entry.spec.owner.same_owner(owner) {
            return Err(CloudError::NotOwned {
                name: name.clone(),
                owner: entry.spec.owner.clone(),
            });
        }
        self.save(registry, None, name).await?;
        let entry = registry.lbs.remove(name).expect("checked above");
        registry.allocator.release(entry.address);
        entry.dataplane.shutdown().await;
        tracing::info!(lb = %name, address = %entry.address, "deleted load balancer");
        Ok(())
    }

    /// Stops every data plane, keeping the state: what a daemon does on its way out.
    pub async fn shutdown(&self) {
        let mut registry = self.inner.lock().await;
        for entry in std::mem::take(&mut registry.lbs).into_values() {
            entry.dataplane.shutdown().await;
        }
    }

    /// The Prometheus text exposition of every load balancer.
    pub async fn metrics(&self) -> String {
        let registry = self.inner.lock().await;
        let pool = registry.allocator.pool();
        let lbs: Vec<_> = registry
            .lbs
            .iter()
            .map(|(name, e)| (name.as_str(), &e.dataplane))
            .collect();
        metrics::render(pool, &lbs)
    }

    /// Saves every load balancer but `name`, plus `record` when given.
    async fn save(
        &self,
        registry: &Registry,
        record: Option<StoredLoadBalancer>,
        name: &LoadBalancerName,
    ) -> Result<(), StoreError> {
        let mut records: Vec<StoredLoadBalancer> = registry
            .lbs
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(_, e)| e.stored())
            .collect();
        records.extend(record);
        records.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        self.store.save_async(records).await
    }
}

/// Checks what the data plane relies on and returns what it is to serve.
pub fn validate(spec: &LoadBalancerSpec) -> Result<Plan, String> {
    if let Some(name) = &spec.requested_address_name {
        return Err(format!(
            "the local cloud holds no named addresses ({name:?}); ask for an IP from its pool \
             instead"
        ));
    }
    let listeners = match &spec.frontend {
        Frontend::Network(network) => &network.listeners,
        Frontend::Application(app) => return validate_application(app),
    };
    let mut ports = HashSet::new();
    for l in listeners {
        let what = format!("listener {:?} ({} {})", l.name, l.protocol, l.port);
        if l.port == 0 {
            return Err(format!("{what}: port 0"));
        }
        if !ports.insert((l.protocol, l.port)) {
            return Err(format!(
                "{what}: a second listener on that protocol and port"
            ));
        }
        if matches!(l.pool.affinity, SessionAffinity::Cookie { .. }) {
            return Err(format!(
                "{what}: cookie affinity needs an HTTP load balancer"
            ));
        }
        validate_pool(&what, &l.pool)?;
    }
    Ok(Plan::Network(listeners.clone()))
}

/// An L7 frontend: ports, routes naming existing backends, pools as for L4, parseable PEM
/// certificates and valid cookie names.
fn validate_application(app: &ApplicationFrontend) -> Result<Plan, String> {
    if app.http_port == 0 {
        return Err("the HTTP port is 0".into());
    }
    if let Some(https) = &app.https {
        if https.port == 0 {
            return Err("the HTTPS port is 0".into());
        }
        if https.port == app.http_port {
            return Err(format!("HTTP and HTTPS both on port {}", app.http_port));
        }
    }
    let mut names = HashSet::new();
    for backend in &app.backends {
        let what = format!("backend {:?}", backend.name);
        if !names.insert(backend.name.as_str()) {
            return Err(format!("{what}: defined twice"));
        }
        validate_pool(&what, &backend.pool)?;
        if let SessionAffinity::Cookie { name, .. } = &backend.pool.affinity
            && !is_valid_cookie_name(name)
        {
            return Err(format!("{what}: {name:?} is not a valid cookie name"));
        }
        if backend.pool.proxy_protocol {
            return Err(format!(
                "{what}: the HTTP proxy does not send PROXY protocol headers"
            ));
        }
    }
    let routed = app
        .routes
        .hosts
        .iter()
        .flat_map(|h| h.paths.iter().map(|p| p.backend.as_str()))
        .chain(app.routes.default_backend.as_deref());
    for backend in routed {
        if !names.contains(backend) {
            return Err(format!(
                "a route names backend {backend:?}, which is not defined"
            ));
        }
    }
    let t = &app.timeouts;
    if t.connect.is_zero() || t.request.is_zero() || t.idle.is_zero() {
        return Err("HTTP timeouts must be positive".into());
    }
    let certificates = match &app.https {
        Some(https) => Some(Arc::new(
            CertStore::build(&https.certificates).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    Ok(Plan::Application(Box::new(dataplane::http::Plan {
        app: app.clone(),
        certificates,
    })))
}

/// Targets and health check of a pool, alike for L4 listeners and L7 backends.
fn validate_pool(what: &str, pool: &TargetPool) -> Result<(), String> {
    for t in &pool.targets {
        if t.port == 0 {
            return Err(format!("{what}: target {} has port 0", t.node));
        }
        // The data plane dials targets and probes them; nothing may leave loopback.
        if !t.address.is_loopback() {
            return Err(format!(
                "{what}: target {} at {} is not a loopback address",
                t.node, t.address
            ));
        }
    }
    let hc = &pool.health_check;
    match &hc.probe {
        Probe::Http { port, path } => {
            if *port == 0 {
                return Err(format!("{what}: health check port 0"));
            }
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "{what}: health check path {path:?} is not an absolute path"
                ));
            }
        }
        Probe::Tcp { port } => {
            if *port == 0 {
                return Err(format!("{what}: health check port 0"));
            }
        }
    }
    if hc.interval.is_zero() || hc.timeout.is_zero() {
        return Err(format!(
            "{what}: health check interval and timeout must be positive"
        ));
    }
    if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
        return Err(format!(
            "{what}: health check thresholds must be at least 1"
        ));
    }
    if let SessionAffinity::ClientIp { timeout } = pool.affinity
        && timeout.is_zero()
    {
        return Err(format!(
            "{what}: client-IP affinity timeout must be positive"
        ));
    }
    Ok(())
}
