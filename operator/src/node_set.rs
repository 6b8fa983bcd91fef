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
use tokio::sync::mpsc;

use crate::service::nodes::{EligibleNode, eligible_nodes};

/// Starts watching Nodes. Returns the cache and a stream that yields once per change of the
/// eligible node set (changes arriving while one is pending are coalesced).
pub fn watch(client: Client) -> (Store<Node>, impl Stream<Item = ()> + Send + 'static) {
    let (store, writer) = reflector::store();
    let (tx, rx) = mpsc::channel::<()>(1);
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
                // Full means a re-sync is already pending; it will see this state too.
                let _ = tx.try_send(());
            }
        }
    });
    let changes =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|()| ((), rx)) },
        );
    (store, changes)
}
