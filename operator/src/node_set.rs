//! One cache of Nodes for every controller, and a signal whenever the set of nodes a load
//! balancer may target changes.
//!
//! Nodes heartbeat every few seconds; re-syncing every load balancer on each heartbeat would
//! be pure churn, so the signal fires only when the eligible set (names, addresses, provider
//! IDs) really changes.

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::service::nodes::{EligibleNode, eligible_nodes};

/// Tells every controller when the eligible node set changed.
#[derive(Clone)]
pub struct NodeChanges(watch::Receiver<u64>);

impl NodeChanges {
    /// A stream that yields once per change (changes arriving while one is pending are
    /// coalesced: the re-sync that follows sees the latest state anyway).
    pub fn subscribe(&self) -> impl Stream<Item = ()> + Send + 'static {
        let mut rx = self.0.clone();
        rx.mark_unchanged();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
    }
}

/// Starts watching Nodes. Returns the cache and the change signal.
pub fn watch(client: Client) -> (Store<Node>, NodeChanges) {
    let (store, writer) = reflector::store();
    let (tx, rx) = watch::channel(0u64);
    let reader = store.clone();
    let events = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(async move {
        let mut last: Option<Vec<EligibleNode>> = None;
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "node watch error");
                continue;
            }
            let state = reader.state();
            let now = eligible_nodes(state.iter().map(|n| n.as_ref()));
            if last.as_ref() != Some(&now) {
                tracing::info!(nodes = ?now.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), "eligible nodes changed");
                last = Some(now);
                tx.send_modify(|generation| *generation += 1);
            }
        }
    });
    (store, NodeChanges(rx))
}
