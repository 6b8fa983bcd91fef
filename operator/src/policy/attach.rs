//! Which policy is in force for an object. Pure.
//!
//! A policy attaches to one object in its own namespace. When several attach to the same
//! object, the oldest wins (creation time, then name) and the others report `Conflicted`:
//! a newcomer never silently changes a load balancer someone else configured.

use std::sync::Arc;

use kube::ResourceExt;
use portico_crds::{BackendPolicy, FrontendPolicy, FrontendTargetKind};

fn age_key<K: ResourceExt>(obj: &K) -> (Option<jiff::Timestamp>, String) {
    (
        obj.meta().creation_timestamp.as_ref().map(|t| t.0),
        obj.name_any(),
    )
}

/// The oldest of `candidates`.
fn oldest<'a, K: ResourceExt + 'a>(candidates: impl Iterator<Item = &'a Arc<K>>) -> Option<&'a K> {
    candidates.map(|c| c.as_ref()).min_by_key(|c| age_key(*c))
}

pub fn backend_in_force<'a>(
    all: &'a [Arc<BackendPolicy>],
    namespace: &str,
    service: &str,
) -> Option<&'a BackendPolicy> {
    oldest(all.iter().filter(|p| {
        p.namespace().as_deref() == Some(namespace) && p.spec.target_ref.name == service
    }))
}

pub fn frontend_in_force<'a>(
    all: &'a [Arc<FrontendPolicy>],
    namespace: &str,
    kind: FrontendTargetKind,
    name: &str,
) -> Option<&'a FrontendPolicy> {
    oldest(all.iter().filter(|p| {
        p.namespace().as_deref() == Some(namespace)
            && p.spec.target_ref.kind == kind
            && p.spec.target_ref.name == name
    }))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portico_crds::target_ref::BackendTargetKind;
    use portico_crds::{BackendPolicySpec, BackendTargetRef};

    use super::*;

    fn policy(ns: &str, name: &str, target: &str, age_s: i64) -> Arc<BackendPolicy> {
        let mut p = BackendPolicy::new(
            name,
            BackendPolicySpec {
                target_ref: BackendTargetRef {
                    kind: BackendTargetKind::Service,
                    name: target.into(),
                },
                health_check: None,
                session_affinity: None,
                balancing: None,
                timeouts: None,
                connection_draining: None,
                proxy_protocol: Some(true),
            },
        );
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + age_s).unwrap(),
        ));
        Arc::new(p)
    }

    #[test]
    fn the_oldest_policy_on_a_service_is_in_force() {
        let all = vec![
            policy("shop", "newer", "web", 9),
            policy("shop", "older", "web", 1),
            policy("shop", "other", "db", 0),
        ];
        assert_eq!(
            backend_in_force(&all, "shop", "web").unwrap().name_any(),
            "older"
        );
        assert_eq!(
            backend_in_force(&all, "shop", "db").unwrap().name_any(),
            "other"
        );
        assert!(backend_in_force(&all, "shop", "api").is_none());
    }

    #[test]
    fn a_policy_never_reaches_into_another_namespace() {
        let all = vec![policy("team-a", "p", "web", 0)];
        assert!(backend_in_force(&all, "team-b", "web").is_none());
    }
}
