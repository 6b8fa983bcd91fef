//! Ownership tags on every resource Portico creates: which cluster and object it serves.
//! A resource without them, or with another owner's, is never changed or deleted.

use aws_sdk_elasticloadbalancingv2::types::Tag;
use portico_provider::{LoadBalancerName, Ownership, ProviderError};

pub const CLUSTER: &str = "portico.dev/cluster-id";
pub const OBJECT_UID: &str = "portico.dev/object-uid";
pub const OBJECT_REF: &str = "portico.dev/object-ref";
pub const LOAD_BALANCER: &str = "portico.dev/load-balancer";

pub fn ownership(owner: &Ownership, lb: &LoadBalancerName) -> [(&'static str, String); 4] {
    [
        (CLUSTER, owner.cluster_id.clone()),
        (OBJECT_UID, owner.object_uid.clone()),
        (OBJECT_REF, owner.object_ref.clone()),
        (LOAD_BALANCER, lb.to_string()),
    ]
}

/// The owner `tags` name, when they carry Portico's cluster and object tags.
pub fn owner_from(tags: &[Tag]) -> Option<Ownership> {
    let get = |key: &str| {
        tags.iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(String::from)
    };
    Some(Ownership {
        cluster_id: get(CLUSTER)?,
        object_uid: get(OBJECT_UID)?,
        object_ref: get(OBJECT_REF).unwrap_or_default(),
    })
}

pub fn describe(owner: &Ownership) -> String {
    format!(
        "cluster {} object {} ({})",
        owner.cluster_id, owner.object_uid, owner.object_ref
    )
}

/// The refusal for resource `name`, whose tags name `found` (or no Portico owner at all).
pub fn not_owned(name: &str, found: Option<Ownership>) -> ProviderError {
    ProviderError::NotOwned {
        name: name.to_string(),
        owner: found.map_or("someone else (no Portico tags)".into(), |o| describe(&o)),
    }
}
