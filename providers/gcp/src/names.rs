//! Names of the Compute Engine resources of one load balancer, instance links from node
//! provider IDs, and the ownership record every resource carries in its description.
//!
//! Names derive from the load balancer's (`a` + the object UID, 32 characters), so an
//! interrupted reconcile finds what it created; all fit GCE's 63-character limit.

use portico_provider::{LoadBalancerName, Ownership, Protocol};
use serde::{Deserialize, Serialize};

pub const API: &str = "https://www.googleapis.com/compute/v1";

/// The address, target pool and client firewall rule share the load balancer's name.
pub fn base(lb: &LoadBalancerName) -> String {
    lb.as_str().to_string()
}

pub fn forwarding_rule(lb: &LoadBalancerName, protocol: Protocol) -> String {
    format!("{lb}-{}", protocol.as_str().to_ascii_lowercase())
}

/// The legacy HTTP health check and the firewall rule that lets Google's checkers reach it.
pub fn health_check(lb: &LoadBalancerName) -> String {
    format!("{lb}-hc")
}

/// The instance link of a node's `spec.providerID` (`gce://project/zone/instance`).
pub fn instance_link(provider_id: &str) -> Option<String> {
    let rest = provider_id.strip_prefix("gce://")?;
    let mut parts = rest.split('/');
    let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [project, zone, name].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(format!(
        "{API}/projects/{project}/zones/{zone}/instances/{name}"
    ))
}

/// The link of a regional resource in `collection` (`targetPools`, `addresses`, …).
pub fn regional_link(project: &str, region: &str, collection: &str, name: &str) -> String {
    format!("{API}/projects/{project}/regions/{region}/{collection}/{name}")
}

pub fn global_link(project: &str, collection: &str, name: &str) -> String {
    format!("{API}/projects/{project}/global/{collection}/{name}")
}

/// The last segment of a resource link, which is its name.
pub fn name_of(link: &str) -> &str {
    link.rsplit('/').next().unwrap_or(link)
}

/// What Portico writes into every description: who owns the resource.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    #[serde(rename = "portico.dev/cluster-id")]
    cluster_id: String,
    #[serde(rename = "portico.dev/object-uid")]
    object_uid: String,
    #[serde(rename = "portico.dev/object-ref", default)]
    object_ref: String,
}

pub fn description(owner: &Ownership) -> String {
    serde_json::to_string(&Record {
        cluster_id: owner.cluster_id.clone(),
        object_uid: owner.object_uid.clone(),
        object_ref: owner.object_ref.clone(),
    })
    .expect("strings serialize")
}

/// The owner a description records, if it is one Portico wrote.
pub fn owner_from(description: Option<&str>) -> Option<Ownership> {
    let record: Record = serde_json::from_str(description?).ok()?;
    Some(Ownership {
        cluster_id: record.cluster_id,
        object_uid: record.object_uid,
        object_ref: record.object_ref,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_links_come_only_from_gce_provider_ids() {
        assert_eq!(
            instance_link("gce://shop-prod/europe-west1-b/node-1").as_deref(),
            Some(
                "https://www.googleapis.com/compute/v1/projects/shop-prod/zones/europe-west1-b/instances/node-1"
            )
        );
        assert_eq!(instance_link("aws:///eu-west-1a/i-0123"), None);
        assert_eq!(instance_link("gce://p/z"), None);
        assert_eq!(instance_link("gce://p//n"), None);
    }

    #[test]
    fn ownership_round_trips_through_the_description_and_foreign_text_is_nobodys() {
        let owner = Ownership {
            cluster_id: "c1".into(),
            object_uid: "u1".into(),
            object_ref: "Service/default/web".into(),
        };
        assert_eq!(owner_from(Some(&description(&owner))), Some(owner));
        assert_eq!(owner_from(Some("created by hand")), None);
        assert_eq!(owner_from(None), None);
    }

    #[test]
    fn names_fit_gce_limits() {
        let lb = LoadBalancerName::for_object_uid("4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10");
        for name in [
            base(&lb),
            forwarding_rule(&lb, Protocol::Udp),
            health_check(&lb),
        ] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.starts_with(|c: char| c.is_ascii_lowercase()));
        }
        assert_eq!(forwarding_rule(&lb, Protocol::Tcp), format!("{lb}-tcp"));
    }
}
