//! The agent's view of the cluster: one reflector per watched kind, a change signal per kind,
//! and the set of our nodes that users removed from the cluster.

use std::{collections::BTreeSet, fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::error::AgentError;
use crate::address_plan::AddressPlan;

/// Objects as the watches deliver them: a malformed one is kept as an error (with its
/// metadata) instead of breaking the whole watch.
pub(crate) type Guarded<K> = DeserializeGuard<K>;

/// A reflector store plus a counter that ticks after every change to it.
pub(crate) struct Watched<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<Guarded<K>>,
    changes: watch::Receiver<u64>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Watched<K> {
    /// A receiver that wakes up on the next change to this kind.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The well-formed objects.
    pub fn valid(&self) -> Vec<Arc<Guarded<K>>> {
        self.store
            .state()
            .into_iter()
            .filter(|g| g.0.is_ok())
            .collect()
    }

    /// Every object, malformed or not (for "is it still there?" questions).
    pub fn all(&self) -> Vec<Arc<Guarded<K>>> {
        self.store.state()
    }

    pub fn get(&self, namespace: Option<&str>, name: &str) -> Option<Arc<Guarded<K>>> {
        let mut key = ObjectRef::<Guarded<K>>::new(name);
        if let Some(ns) = namespace {
            key = key.within(ns);
        }
        self.store.get(&key)
    }

    pub async fn ready(&self) -> Result<(), AgentError> {
        self.store
            .wait_until_ready()
            .await
            .map_err(|_| AgentError::WatchEnded(std::any::type_name::<K>()))
    }
}

/// The object inside a guard, if it deserialized.
pub(crate) fn ok<K>(guard: &Guarded<K>) -> Option<&K> {
    guard.0.as_ref().ok()
}

/// Everything the components share.
pub(crate) struct Cluster {
    pub client: Client,
    pub plan: AddressPlan,
    pub node_count: u8,
    pub provider_id_prefix: Option<String>,
    pub nodes: Watched<Node>,
    pub pods: Watched<Pod>,
    pub services: Watched<Service>,
    pub endpoints: Watched<Endpoints>,
    /// Our nodes whose Node object a user deleted: no longer members of the cluster.
    removed: std::sync::Mutex<BTreeSet<u8>>,
    /// Ticks whenever `removed` grows.
    removals: watch::Sender<u64>,
    pub shutdown: CancellationToken,
}

impl Cluster {
    /// Starts the watches; they run until `shutdown` is cancelled.
    pub fn start(
        client: Client,
        plan: AddressPlan,
        node_count: u8,
        provider_id_prefix: Option<String>,
        shutdown: CancellationToken,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            nodes: spawn_watch(Api::all(client.clone()), &shutdown),
            pods: spawn_watch(Api::all(client.clone()), &shutdown),
            services: spawn_watch(Api::all(client.clone()), &shutdown),
            endpoints: spawn_watch(Api::all(client.clone()), &shutdown),
            removed: std::sync::Mutex::new(BTreeSet::new()),
            removals: watch::channel(0).0,
            client,
            plan,
            node_count,
            provider_id_prefix,
            shutdown,
        })
    }

    /// `k` for our node `node-k`; `None` for any other name.
    pub fn node_index(&self, name: &str) -> Option<u8> {
        let k: u8 = name.strip_prefix("node-")?.parse().ok()?;
        ((1..=self.node_count).contains(&k) && self.plan.node_name(k) == name).then_some(k)
    }

    pub fn is_removed(&self, k: u8) -> bool {
        self.removed
            .lock()
            .expect("removed-nodes lock")
            .contains(&k)
    }

    /// Records that a user deleted our node `k`; returns whether that is news.
    pub fn mark_removed(&self, k: u8) -> bool {
        let new = self.removed.lock().expect("removed-nodes lock").insert(k);
        if new {
            self.removals.send_modify(|n| *n = n.wrapping_add(1));
        }
        new
    }

    /// A receiver that wakes up when a node is removed.
    pub fn subscribe_removals(&self) -> watch::Receiver<u64> {
        self.removals.subscribe()
    }

    pub fn node(&self, k: u8) -> Option<Arc<Guarded<Node>>> {
        self.nodes.get(None, &self.plan.node_name(k))
    }
}

fn spawn_watch<K>(api: Api<Guarded<K>>, shutdown: &CancellationToken) -> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let (tx, changes) = watch::channel(0u64);
    let shutdown = shutdown.clone();
    let kind = K::kind(&());
    tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            // Nobody here reads managed fields; they are most of an object's size.
            .modify(|obj| obj.managed_fields_mut().clear())
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    match &event {
                        watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                            if let Err(invalid) = &obj.0 {
                                warn!(
                                    kind = %kind,
                                    object = %describe(&invalid.metadata),
                                    error = %invalid.error,
                                    "ignoring a malformed object"
                                );
                            }
                        }
                        _ => {}
                    }
                    // During a (re)list the store only swaps its contents at InitDone.
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                Some(Err(error)) => warn!(kind = %kind, %error, "watch failed; retrying"),
                None => break,
            }
        }
        debug!(kind = %kind, "watch stopped");
    });
    Watched { store, changes }
}

fn describe(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "<unnamed>".into(),
    }
}

/// Waits until one of `receivers` reports a change or `resync` elapses, then lets a burst of
/// changes settle so one reconcile covers them. Returns `false` once the agent stops.
pub(crate) async fn next_round(
    receivers: &mut [&mut watch::Receiver<u64>],
    resync: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let changed = futures::future::select_all(
        receivers
            .iter_mut()
            .map(|rx| Box::pin(async move { rx.changed().await.is_ok() })),
    );
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = changed => {}
        _ = tokio::time::sleep(resync) => {}
    }
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(20)) => {
            for rx in receivers.iter_mut() {
                rx.mark_unchanged();
            }
            true
        }
    }
}
