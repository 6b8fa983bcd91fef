//! Each policy's `Accepted` condition: is its target there, is it the one in force, and what
//! of it does not apply to that target. The verdicts are pure; the writer patches a status
//! only when it changed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use portico_crds::backend_policy::SessionAffinityType;
use portico_crds::condition::ACCEPTED;
use portico_crds::{BackendPolicy, Condition, ConditionStatus, FrontendPolicy, FrontendTargetKind};
use serde_json::json;

use super::{Policies, apply, attach};
use crate::error::{Error, Result, kube_call};

/// A target that appears later is noticed within this long.
const RECHECK: Duration = Duration::from_secs(15);

/// What a policy's `Accepted` condition says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    fn no(reason: &'static str, message: String) -> Self {
        Verdict {
            accepted: false,
            reason,
            message,
        }
    }
}

/// `target` is the Service the policy names, if it exists; `in_force` the name of the policy
/// in force on it.
pub fn backend_verdict(
    policy: &BackendPolicy,
    target: Option<&Service>,
    in_force: &str,
) -> Verdict {
    let svc_name = &policy.spec.target_ref.name;
    let Some(svc) = target else {
        return Verdict::no(
            "TargetNotFound",
            format!("Service {svc_name} does not exist"),
        );
    };
    if in_force != policy.name_any() {
        return Verdict::no(
            "Conflicted",
            format!("BackendPolicy {in_force} is older and applies to Service {svc_name}"),
        );
    }
    let mut notes = Vec::new();
    let load_balancer = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
    if load_balancer {
        if policy
            .spec
            .session_affinity
            .as_ref()
            .is_some_and(|a| a.type_ == SessionAffinityType::Cookie)
        {
            notes.push("cookie affinity");
        }
        if policy.spec.timeouts.is_some() {
            notes.push("timeouts");
        }
    }
    let mut message = format!("applies to Service {svc_name}");
    if !notes.is_empty() {
        message.push_str(&format!(
            "; {} apply only where it backs an Ingress, not to its own L4 load balancer",
            notes.join(" and ")
        ));
    }
    Verdict {
        accepted: true,
        reason: "Accepted",
        message,
    }
}

/// `target_exists` and `target_is_lb_service` describe the object the policy names.
pub fn frontend_verdict(policy: &FrontendPolicy, target_exists: bool, in_force: &str) -> Verdict {
    let target = &policy.spec.target_ref;
    let what = format!("{} {}", target.kind, target.name);
    if !target_exists {
        return Verdict::no("TargetNotFound", format!("{what} does not exist"));
    }
    if in_force != policy.name_any() {
        return Verdict::no(
            "Conflicted",
            format!("FrontendPolicy {in_force} is older and applies to {what}"),
        );
    }
    if let Err(bad) = apply::source_ranges(&policy.spec) {
        return Verdict::no("Invalid", bad.join("; "));
    }
    let mut message = format!("applies to {what}");
    if target.kind == FrontendTargetKind::Service
        && (policy.spec.redirect_to_https.is_some() || policy.spec.tls.is_some())
    {
        message.push_str("; redirectToHttps and tls apply only to Ingresses");
    }
    Verdict {
        accepted: true,
        reason: "Accepted",
        message,
    }
}

fn conditions(previous: &[Condition], verdict: Verdict, generation: Option<i64>) -> Vec<Condition> {
    Condition::merge(
        previous,
        Condition {
            type_: ACCEPTED.into(),
            status: if verdict.accepted {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: verdict.reason.into(),
            message: verdict.message,
            observed_generation: generation,
            last_transition_time: jiff::Timestamp::now().to_string(),
        },
    )
}

pub struct Context {
    pub client: Client,
    pub policies: Policies,
}

async fn write_status<K>(api: Api<K>, name: &str, conditions: Vec<Condition>) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    kube_call(
        "writing policy status",
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": conditions } })),
        ),
    )
    .await?;
    Ok(())
}

async fn reconcile_backend(policy: Arc<BackendPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = policy.namespace().unwrap_or_default();
    let target = kube_call(
        "reading a policy's target",
        Api::<Service>::namespaced(ctx.client.clone(), &ns).get_opt(&policy.spec.target_ref.name),
    )
    .await?;
    let all = ctx.policies.backend.state();
    let in_force = attach::backend_in_force(&all, &ns, &policy.spec.target_ref.name)
        .map(|p| p.name_any())
        .unwrap_or_default();
    let verdict = backend_verdict(&policy, target.as_ref(), &in_force);
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let next = conditions(&previous, verdict, policy.metadata.generation);
    if next != previous {
        write_status(
            Api::<BackendPolicy>::namespaced(ctx.client.clone(), &ns),
            &policy.name_any(),
            next,
        )
        .await?;
    }
    Ok(Action::requeue(RECHECK))
}

async fn reconcile_frontend(policy: Arc<FrontendPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = policy.namespace().unwrap_or_default();
    let target = &policy.spec.target_ref;
    let exists = match target.kind {
        FrontendTargetKind::Service => kube_call(
            "reading a policy's target",
            Api::<Service>::namespaced(ctx.client.clone(), &ns).get_opt(&target.name),
        )
        .await?
        .is_some(),
        FrontendTargetKind::Ingress => kube_call(
            "reading a policy's target",
            Api::<Ingress>::namespaced(ctx.client.clone(), &ns).get_opt(&target.name),
        )
        .await?
        .is_some(),
    };
    let all = ctx.policies.frontend.state();
    let in_force = attach::frontend_in_force(&all, &ns, target.kind, &target.name)
        .map(|p| p.name_any())
        .unwrap_or_default();
    let verdict = frontend_verdict(&policy, exists, &in_force);
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let next = conditions(&previous, verdict, policy.metadata.generation);
    if next != previous {
        write_status(
            Api::<FrontendPolicy>::namespaced(ctx.client.clone(), &ns),
            &policy.name_any(),
            next,
        )
        .await?;
    }
    Ok(Action::requeue(RECHECK))
}

fn error_policy<K: ResourceExt>(policy: Arc<K>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(policy = %policy.name_any(), %error, "writing policy status failed");
    Action::requeue(Duration::from_secs(10))
}

/// Keeps every policy's status current.
pub async fn run(ctx: Arc<Context>, shutdown: tokio_util::sync::CancellationToken) {
    let client = ctx.client.clone();
    let backend = Controller::new(
        Api::<BackendPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(reconcile_backend, error_policy, ctx.clone())
    .for_each(|_| async {});
    let frontend = Controller::new(
        Api::<FrontendPolicy>::all(client),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.cancelled_owned())
    .run(reconcile_frontend, error_policy, ctx)
    .for_each(|_| async {});
    tokio::join!(backend, frontend);
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServiceSpec;
    use portico_crds::backend_policy::SessionAffinityPolicy;
    use portico_crds::target_ref::BackendTargetKind;
    use portico_crds::{
        BackendPolicySpec, BackendTargetRef, FrontendPolicySpec, FrontendTargetRef,
    };

    use super::*;

    fn backend(name: &str) -> BackendPolicy {
        BackendPolicy::new(
            name,
            BackendPolicySpec {
                target_ref: BackendTargetRef {
                    kind: BackendTargetKind::Service,
                    name: "web".into(),
                },
                health_check: None,
                session_affinity: Some(SessionAffinityPolicy {
                    type_: SessionAffinityType::Cookie,
                    cookie_name: None,
                    ttl_seconds: None,
                }),
                balancing: None,
                timeouts: None,
                connection_draining: None,
                proxy_protocol: None,
            },
        )
    }

    fn lb_service() -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_policy_whose_service_is_missing_says_so() {
        let v = backend_verdict(&backend("p"), None, "p");
        assert_eq!((v.accepted, v.reason), (false, "TargetNotFound"));
        assert!(v.message.contains("web"));
    }

    #[test]
    fn the_younger_of_two_policies_names_the_one_in_force() {
        let v = backend_verdict(&backend("young"), Some(&lb_service()), "old");
        assert_eq!((v.accepted, v.reason), (false, "Conflicted"));
        assert!(v.message.contains("old"));
    }

    #[test]
    fn cookie_affinity_on_an_l4_service_is_accepted_with_a_note() {
        let v = backend_verdict(&backend("p"), Some(&lb_service()), "p");
        assert!(v.accepted);
        assert!(v.message.contains("cookie affinity"), "{}", v.message);
    }

    #[test]
    fn a_frontend_policy_with_a_range_that_is_not_a_cidr_is_invalid() {
        let policy = FrontendPolicy::new(
            "f",
            FrontendPolicySpec {
                target_ref: FrontendTargetRef {
                    kind: FrontendTargetKind::Service,
                    name: "web".into(),
                },
                redirect_to_https: None,
                tls: None,
                source_ranges: Some(vec!["300.1.1.1/8".into()]),
            },
        );
        let v = frontend_verdict(&policy, true, "f");
        assert_eq!((v.accepted, v.reason), (false, "Invalid"));
        assert!(!frontend_verdict(&policy, false, "f").accepted);
    }
}
