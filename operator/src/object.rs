//! Writes every controller makes to the objects it serves: finalizers, status, events. Each
//! is a single API call under [`crate::error::API_TIMEOUT`].

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource, ResourceExt};
use portico_provider::{LoadBalancerName, Ownership};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{Error, Result, kube_call};
use crate::events::EventSink;

/// A namespaced object a controller writes to.
pub trait Served:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Served for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

fn api<K: Served>(client: &Client, obj: &K) -> Api<K> {
    Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default())
}

fn ignore_not_found<T>(result: Result<T>) -> Result<()> {
    match result {
        Err(Error::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// `namespace/name`, for logs and per-object bookkeeping.
pub fn key<K: Served>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The owner recorded on the load balancer of `obj` (of kind `kind`).
pub fn ownership<K: Resource>(cluster_id: &str, kind: &str, obj: &K) -> Ownership {
    let meta = obj.meta();
    Ownership {
        cluster_id: cluster_id.to_string(),
        object_uid: meta.uid.clone().unwrap_or_default(),
        object_ref: format!(
            "{kind}/{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        ),
    }
}

/// The load balancer name of `obj`: deterministic from its UID, so it is found again after a
/// restart or an interrupted reconcile.
pub fn load_balancer_name<K: Resource>(obj: &K) -> LoadBalancerName {
    LoadBalancerName::for_object_uid(obj.meta().uid.as_deref().unwrap_or_default())
}

pub fn has_finalizer<K: Served>(obj: &K, finalizer: &str) -> bool {
    obj.finalizers().iter().any(|f| f == finalizer)
}

/// Finalizer lists are written whole with the resourceVersion read, so a concurrent change
/// fails with a conflict instead of being overwritten.
async fn write_finalizers<K: Served>(
    client: &Client,
    obj: &K,
    finalizers: Vec<String>,
) -> Result<()> {
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }
    });
    kube_call(
        "writing finalizers",
        api(client, obj).patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await?;
    Ok(())
}

/// Marks `obj` as served: adds `finalizer` and records `(annotation, value)` (which provider
/// holds its load balancer) in one write, before anything exists in the cloud. No write when
/// both are already there.
pub async fn claim<K: Served>(
    client: &Client,
    obj: &K,
    finalizer: &str,
    (annotation, value): (&str, &str),
) -> Result<()> {
    let recorded = obj.annotations().get(annotation).map(String::as_str) == Some(value);
    if has_finalizer(obj, finalizer) && recorded {
        return Ok(());
    }
    let mut finalizers = obj.finalizers().to_vec();
    if !has_finalizer(obj, finalizer) {
        finalizers.push(finalizer.to_string());
    }
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "annotations": { annotation: value },
            "resourceVersion": obj.resource_version(),
        }
    });
    kube_call(
        "claiming the object",
        api(client, obj).patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await?;
    Ok(())
}

/// Removing it from an object that is already gone is a success.
pub async fn remove_finalizer<K: Served>(client: &Client, obj: &K, finalizer: &str) -> Result<()> {
    let finalizers = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    ignore_not_found(write_finalizers(client, obj, finalizers).await)
}

/// A merge patch of the status subresource; an object that is gone needs no status.
pub async fn patch_status<K: Served>(
    client: &Client,
    obj: &K,
    patch: serde_json::Value,
) -> Result<()> {
    ignore_not_found(
        kube_call(
            "patching status",
            api(client, obj).patch_status(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await,
    )
}

/// Events are best effort: failing to record one must not fail the reconcile, and recording
/// one must not delay it either, so it is written off the reconcile's path (with its own
/// timeout). Their timestamps, not their arrival, order them.
pub async fn publish<K: Served>(
    events: &EventSink,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: "SyncLoadBalancer".into(),
        secondary: None,
    };
    events.publish(event, obj.object_ref(&()), key(obj));
}
