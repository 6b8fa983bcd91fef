//! Each ProviderConfig's status: its cloud, whether it is accepted (and why not), and which
//! IngressClasses name it. Computed by [`desired_status`] (pure) and written only when it
//! changed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::networking::v1::IngressClass;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use portico_crds::condition::ACCEPTED;
use portico_crds::{Condition, ConditionStatus, ProviderConfig, ProviderConfigStatus};
use serde_json::json;

use super::registry::ProviderRegistry;
use super::select::{self, Verdict};
use crate::error::{Error, Result, kube_call};

pub struct Context {
    pub client: Client,
    pub configs: Store<ProviderConfig>,
    pub classes: Store<IngressClass>,
    pub providers: Arc<ProviderRegistry>,
}

/// The status `config` should report. `buildable` is whether its provider can be built.
pub fn desired_status(
    config: &ProviderConfig,
    all: &[Arc<ProviderConfig>],
    classes: &[Arc<IngressClass>],
    buildable: std::result::Result<(), String>,
    now: &str,
) -> ProviderConfigStatus {
    let name = config.name_any();
    let verdict = select::verdicts(all.iter().map(|c| c.as_ref()))
        .remove(&name)
        .unwrap_or(Verdict::Accepted);
    let (status, reason, message) = match (verdict, buildable) {
        (Verdict::Invalid(why), _) => (ConditionStatus::False, "Invalid", why),
        (Verdict::Conflicted { with }, _) => (
            ConditionStatus::False,
            "Conflicted",
            format!(
                "ProviderConfig {with} is older and claims the same {}",
                if config.spec.default && with_is_default(all, &with) {
                    "default".to_string()
                } else {
                    format!(
                        "loadBalancerClass {}",
                        config.spec.load_balancer_class.as_deref().unwrap_or("")
                    )
                }
            ),
        ),
        (Verdict::Accepted, Err(why)) => (ConditionStatus::False, "InvalidSettings", why),
        (Verdict::Accepted, Ok(())) => (
            ConditionStatus::True,
            "Accepted",
            "the provider is ready to serve".to_string(),
        ),
    };
    let previous = config
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = Condition::merge(
        previous,
        Condition {
            type_: ACCEPTED.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: config.metadata.generation,
            last_transition_time: now.into(),
        },
    );
    let mut ingress_classes: Vec<String> = classes
        .iter()
        .filter(|c| {
            c.spec
                .as_ref()
                .and_then(|s| s.parameters.as_ref())
                .is_some_and(|p| {
                    p.api_group.as_deref() == Some(portico_crds::GROUP)
                        && p.kind == "ProviderConfig"
                        && p.name == name
                })
        })
        .map(|c| c.name_any())
        .collect();
    ingress_classes.sort();
    ProviderConfigStatus {
        provider: config.spec.kind().map(|k| k.as_str().to_string()),
        conditions,
        ingress_classes,
    }
}

fn with_is_default(all: &[Arc<ProviderConfig>], name: &str) -> bool {
    all.iter().any(|c| c.name_any() == name && c.spec.default)
}

async fn reconcile(config: Arc<ProviderConfig>, ctx: Arc<Context>) -> Result<Action> {
    let all = ctx.configs.state();
    let classes = ctx.classes.state();
    let buildable = ctx.providers.check(&config);
    let now = jiff::Timestamp::now().to_string();
    let desired = desired_status(&config, &all, &classes, buildable, &now);
    if config.status.as_ref() != Some(&desired) {
        let api: Api<ProviderConfig> = Api::all(ctx.client.clone());
        kube_call(
            "writing ProviderConfig status",
            api.patch_status(
                &config.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": desired })),
            ),
        )
        .await?;
    }
    Ok(Action::await_change())
}

fn error_policy(config: Arc<ProviderConfig>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(config = %config.name_any(), %error, "writing ProviderConfig status failed");
    Action::requeue(Duration::from_secs(10))
}

/// Keeps every ProviderConfig's status current. Any configuration or IngressClass change
/// re-evaluates them all: a conflict is between configurations.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<ProviderConfig>::all(client.clone()),
        watcher::Config::default(),
    );
    let (store_a, store_b) = (controller.store(), controller.store());
    let all = |store: &Store<ProviderConfig>| {
        store
            .state()
            .iter()
            .map(|c| ObjectRef::from_obj(c.as_ref()))
            .collect::<Vec<_>>()
    };
    controller
        .watches(
            Api::<ProviderConfig>::all(client.clone()),
            watcher::Config::default(),
            move |_| all(&store_a),
        )
        .watches(
            Api::<IngressClass>::all(client),
            watcher::Config::default(),
            move |_| all(&store_b),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "provider config status event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{IngressClassParametersReference, IngressClassSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portico_crds::ProviderConfigSpec;
    use portico_crds::provider_config::LocalSettings;

    use super::*;

    fn config(name: &str, age_s: i64) -> Arc<ProviderConfig> {
        let mut c = ProviderConfig::new(
            name,
            ProviderConfigSpec {
                default: true,
                load_balancer_class: None,
                local: Some(LocalSettings {
                    api_address: "127.0.0.1:8900".into(),
                    address_pool: None,
                }),
                aws: None,
                gcp: None,
            },
        );
        c.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + age_s).unwrap(),
        ));
        c.metadata.generation = Some(3);
        Arc::new(c)
    }

    fn class(name: &str, config: &str) -> Arc<IngressClass> {
        Arc::new(IngressClass {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(IngressClassSpec {
                controller: Some("portico.dev/ingress-controller".into()),
                parameters: Some(IngressClassParametersReference {
                    api_group: Some("portico.dev".into()),
                    kind: "ProviderConfig".into(),
                    name: config.into(),
                    ..Default::default()
                }),
            }),
        })
    }

    #[test]
    fn an_accepted_configuration_lists_the_classes_that_name_it() {
        let all = vec![config("local", 0)];
        let status = desired_status(
            &all[0],
            &all,
            &[
                class("b", "local"),
                class("a", "local"),
                class("c", "other"),
            ],
            Ok(()),
            "t",
        );
        assert_eq!(status.provider.as_deref(), Some("local"));
        assert_eq!(status.ingress_classes, ["a", "b"]);
        assert_eq!(status.conditions[0].status, ConditionStatus::True);
        assert_eq!(status.conditions[0].observed_generation, Some(3));
    }

    #[test]
    fn a_second_default_is_conflicted_and_names_the_older_one() {
        let all = vec![config("first", 0), config("second", 5)];
        let status = desired_status(&all[1], &all, &[], Ok(()), "t");
        let accepted = &status.conditions[0];
        assert_eq!(accepted.status, ConditionStatus::False);
        assert_eq!(accepted.reason, "Conflicted");
        assert!(accepted.message.contains("first"), "{}", accepted.message);
    }

    #[test]
    fn settings_the_provider_cannot_use_are_reported() {
        let all = vec![config("local", 0)];
        let status = desired_status(&all[0], &all, &[], Err("bad address".into()), "t");
        assert_eq!(status.conditions[0].reason, "InvalidSettings");
        assert_eq!(status.conditions[0].message, "bad address");
    }

    #[test]
    fn rewriting_the_same_verdict_changes_nothing() {
        let mut config = (*config("local", 0)).clone();
        let all = vec![Arc::new(config.clone())];
        let first = desired_status(&config, &all, &[], Ok(()), "t1");
        config.status = Some(first.clone());
        assert_eq!(desired_status(&config, &all, &[], Ok(()), "t2"), first);
    }
}
