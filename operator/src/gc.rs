//! Garbage collection of load balancers whose Service is gone.
//!
//! Finalizers normally make this unnecessary; it catches what they cannot: a finalizer removed
//! by hand, a Service force-deleted while the operator was down.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use portico_provider::ObservedLoadBalancer;

use crate::error::{Result, kube_call};
use crate::provider_config::registry::{ProviderRegistry, Selection};
use crate::service::FINALIZER;

/// Which owned load balancers have no Service that still wants them. Pure.
///
/// `services` must be listed *after* `owned`: a load balancer is created only once its Service
/// exists, so every live owner is then in `services`.
/// `wants` says whether a Service is to be served by the provider that holds `owned`.
pub fn orphans<'a>(
    owned: &'a [ObservedLoadBalancer],
    services: &[Service],
    wants: impl Fn(&Service) -> bool,
) -> Vec<&'a ObservedLoadBalancer> {
    let by_uid: HashMap<String, &Service> = services
        .iter()
        .filter_map(|s| Some((s.uid()?, s)))
        .collect();
    owned
        .iter()
        .filter(|lb| lb.owner.object_ref.starts_with("Service/"))
        .filter(|lb| match by_uid.get(&lb.owner.object_uid) {
            None => true,
            Some(svc) => !wants(svc) && !svc.finalizers().iter().any(|f| f == FINALIZER),
        })
        .collect()
}

/// Owned load balancers of Ingresses that are gone or no longer carry the finalizer. Pure;
/// `ingresses` must be listed after `owned` (a load balancer exists only once its Ingress has
/// the finalizer).
pub fn ingress_orphans<'a>(
    owned: &'a [ObservedLoadBalancer],
    ingresses: &[Ingress],
) -> Vec<&'a ObservedLoadBalancer> {
    let finalized: HashMap<String, bool> = ingresses
        .iter()
        .filter_map(|i| {
            let has = i
                .finalizers()
                .iter()
                .any(|f| f == crate::ingress::FINALIZER);
            Some((i.uid()?, has))
        })
        .collect();
    owned
        .iter()
        .filter(|lb| lb.owner.object_ref.starts_with("Ingress/"))
        .filter(|lb| {
            !finalized
                .get(&lb.owner.object_uid)
                .copied()
                .unwrap_or(false)
        })
        .collect()
}

/// Deletes orphaned load balancers of `cluster_id` from every provider; returns how many.
pub async fn collect(
    client: &Client,
    providers: &ProviderRegistry,
    cluster_id: &str,
) -> Result<usize> {
    let mut deleted = 0;
    for holder in providers.all() {
        let provider = holder.provider.as_ref();
        let owned = provider.list_owned(cluster_id).await?;
        // Listed after `owned`, so every live owner is among them (see `orphans`).
        let (services, ingresses) = list_owners(client).await?;
        let wants = |svc: &Service| matches!(providers.for_service(svc), Selection::Serve(c) if c.source == holder.source);
        let orphaned = orphans(&owned, &services, wants)
            .into_iter()
            .chain(ingress_orphans(&owned, &ingresses));
        for lb in orphaned {
            tracing::info!(load_balancer = %lb.name, owner = %lb.owner.object_ref, provider = provider.name(), "deleting orphaned load balancer");
            provider.delete(&lb.name, &lb.owner).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

async fn list_owners(client: &Client) -> Result<(Vec<Service>, Vec<Ingress>)> {
    let services = kube_call(
        "listing Services for garbage collection",
        Api::<Service>::all(client.clone()).list(&ListParams::default()),
    )
    .await?
    .items;
    let ingresses = kube_call(
        "listing Ingresses for garbage collection",
        Api::<Ingress>::all(client.clone()).list(&ListParams::default()),
    )
    .await?
    .items;
    Ok((services, ingresses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::class::ClassPolicy;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use portico_provider::{LoadBalancerName, LoadBalancerStatus, Ownership};

    fn lb(uid: &str, kind: &str) -> ObservedLoadBalancer {
        ObservedLoadBalancer {
            name: LoadBalancerName::for_object_uid(uid),
            owner: Ownership {
                cluster_id: "c".into(),
                object_uid: uid.into(),
                object_ref: format!("{kind}/ns/x"),
            },
            status: LoadBalancerStatus::default(),
        }
    }

    fn svc(uid: &str, type_: &str, finalized: bool) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                uid: Some(uid.into()),
                finalizers: finalized.then(|| vec![FINALIZER.to_string()]),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn classes() -> ClassPolicy {
        ClassPolicy {
            classes: vec!["portico.dev/local".into()],
            serve_unclassed: true,
        }
    }

    #[test]
    fn load_balancers_of_live_services_are_kept() {
        let owned = [lb("u1", "Service")];
        assert!(
            orphans(&owned, &[svc("u1", "LoadBalancer", true)], |s| classes()
                .wants_load_balancer(s))
            .is_empty()
        );
    }

    #[test]
    fn load_balancers_of_vanished_services_are_orphans() {
        let owned = [lb("u1", "Service"), lb("u2", "Service")];
        let found = orphans(&owned, &[svc("u1", "LoadBalancer", true)], |s| {
            classes().wants_load_balancer(s)
        });
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].owner.object_uid, "u2");
    }

    #[test]
    fn a_service_still_being_cleaned_up_keeps_its_load_balancer_for_the_reconciler() {
        let owned = [lb("u1", "Service")];
        assert!(
            orphans(&owned, &[svc("u1", "ClusterIP", true)], |s| classes()
                .wants_load_balancer(s))
            .is_empty()
        );
        assert_eq!(
            orphans(&owned, &[svc("u1", "ClusterIP", false)], |s| classes()
                .wants_load_balancer(s))
            .len(),
            1
        );
    }

    #[test]
    fn ingress_load_balancers_without_a_finalized_ingress_are_orphans() {
        let owned = [
            lb("i1", "Ingress"),
            lb("i2", "Ingress"),
            lb("i3", "Ingress"),
        ];
        let ingress = |uid: &str, finalized: bool| Ingress {
            metadata: kube::api::ObjectMeta {
                uid: Some(uid.into()),
                finalizers: finalized.then(|| vec![crate::ingress::FINALIZER.to_string()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let found: Vec<&str> =
            ingress_orphans(&owned, &[ingress("i1", true), ingress("i2", false)])
                .iter()
                .map(|l| l.owner.object_uid.as_str())
                .collect();
        assert_eq!(found, ["i2", "i3"]);
    }

    #[test]
    fn load_balancers_of_other_kinds_are_left_to_their_controller() {
        let owned = [lb("u9", "Ingress")];
        assert!(orphans(&owned, &[], |s| classes().wants_load_balancer(s)).is_empty());
    }
}
