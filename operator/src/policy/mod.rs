//! BackendPolicies and FrontendPolicies: which one applies to an object ([`attach`], pure),
//! what it changes in a load balancer ([`apply`], pure), and the status each policy reports
//! ([`status`]).

pub mod apply;
pub mod attach;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use portico_crds::{
    BackendPolicy, BackendPolicySpec, FrontendPolicy, FrontendPolicySpec, FrontendTargetKind,
};
use tokio::sync::broadcast;

/// The policies in force for one load balancer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attached {
    /// By Service name: the Service's own (for a Service's load balancer), or each backend
    /// Service's (for an Ingress).
    pub backend: BTreeMap<String, BackendPolicySpec>,
    pub frontend: Option<FrontendPolicySpec>,
}

/// An object whose load balancer a policy change may alter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Affected {
    pub namespace: String,
    pub kind: FrontendTargetKind,
    pub name: String,
}

/// The cached policies of the cluster, and a feed of the objects their changes affect.
#[derive(Clone)]
pub struct Policies {
    pub backend: Store<BackendPolicy>,
    pub frontend: Store<FrontendPolicy>,
    changes: broadcast::Sender<Affected>,
}

/// Caches every BackendPolicy and FrontendPolicy. A change is announced only after the cache
/// holds it, so a reconcile it triggers never reads the old policy.
pub fn watch(client: Client) -> Policies {
    let (changes, _) = broadcast::channel(1024);
    let backend = cache::<BackendPolicy>(client.clone(), changes.clone(), |p| Affected {
        namespace: p.namespace().unwrap_or_default(),
        kind: FrontendTargetKind::Service,
        name: p.spec.target_ref.name.clone(),
    });
    let frontend = cache::<FrontendPolicy>(client, changes.clone(), |p| Affected {
        namespace: p.namespace().unwrap_or_default(),
        kind: p.spec.target_ref.kind,
        name: p.spec.target_ref.name.clone(),
    });
    Policies {
        backend,
        frontend,
        changes,
    }
}

fn cache<K>(
    client: Client,
    changes: broadcast::Sender<Affected>,
    affected: fn(&K) -> Affected,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(Api::<K>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(events.for_each(move |event| {
        if let Ok(
            watcher::Event::Apply(obj)
            | watcher::Event::Delete(obj)
            | watcher::Event::InitApply(obj),
        ) = &event
        {
            // Nobody listening yet (start-up) is fine: controllers list everything first.
            let _ = changes.send(affected(obj));
        }
        async {}
    }));
    store
}

impl Policies {
    /// Waits until both caches hold the cluster's policies.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.backend.wait_until_ready().await?;
        self.frontend.wait_until_ready().await
    }

    /// The objects each later policy change affects.
    pub fn changes(&self) -> impl Stream<Item = Affected> + Send + 'static {
        futures::stream::unfold(self.changes.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(affected) => return Some((affected, rx)),
                    // Missed some: the periodic resync repairs what they would have done.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// The BackendPolicy in force for Service `namespace/name`, if any.
    pub fn backend_for(&self, namespace: &str, name: &str) -> Option<BackendPolicySpec> {
        let all: Vec<Arc<BackendPolicy>> = self.backend.state();
        attach::backend_in_force(&all, namespace, name).map(|p| p.spec.clone())
    }

    /// The FrontendPolicy in force for the `kind` object `namespace/name`, if any.
    pub fn frontend_for(
        &self,
        namespace: &str,
        kind: FrontendTargetKind,
        name: &str,
    ) -> Option<FrontendPolicySpec> {
        let all: Vec<Arc<FrontendPolicy>> = self.frontend.state();
        attach::frontend_in_force(&all, namespace, kind, name).map(|p| p.spec.clone())
    }

    /// What applies to Service `namespace/name`'s own load balancer.
    pub fn for_service(&self, namespace: &str, name: &str) -> Attached {
        Attached {
            backend: self
                .backend_for(namespace, name)
                .map(|p| (name.to_string(), p))
                .into_iter()
                .collect(),
            frontend: self.frontend_for(namespace, FrontendTargetKind::Service, name),
        }
    }

    /// What applies to Ingress `namespace/name`, whose backends are `services`.
    pub fn for_ingress(&self, namespace: &str, name: &str, services: &[String]) -> Attached {
        Attached {
            backend: services
                .iter()
                .filter_map(|s| Some((s.clone(), self.backend_for(namespace, s)?)))
                .collect(),
            frontend: self.frontend_for(namespace, FrontendTargetKind::Ingress, name),
        }
    }
}
