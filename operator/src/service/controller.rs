//! The Service controller: reconcile and error policy, in the shape of kube-rs controllers.
//!
//! Desired state comes from pure code ([`super::translate`], [`super::status`]); this module
//! only reads the caches, calls the provider and writes the results back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;

use crate::events::EventSink;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use portico_crds::FrontendTargetKind;
use portico_provider::ProviderError;
use serde_json::json;

use super::FINALIZER;
use super::nodes::eligible_nodes;
use super::status;
use super::translate::{desired_load_balancer, load_balancer_name, ownership};
use crate::backoff::Backoff;
use crate::ensured::EnsuredSpecs;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::object;
use crate::policy::Policies;
use crate::provider_config::registry::{
    Chosen, PROVIDER_ANNOTATION, ProviderRegistry, Selection, recorded_source,
};

const CONTROLLER: &str = "service";
/// How long an ensure may run before the Service says it is provisioning; fast providers
/// finish first and save the extra status write.
const PROGRESS_AFTER: Duration = Duration::from_millis(500);

/// How long a Service whose provider cannot be used waits before it is looked at again (a
/// ProviderConfig change does not trigger its reconcile).
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(30);

/// How the controller behaves, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster_id: String,
    /// How often a served load balancer is ensured again even if nothing changed, to repair
    /// drift on the provider's side.
    pub resync: Duration,
}

/// What the controller needs, shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub providers: Arc<ProviderRegistry>,
    pub nodes: Store<Node>,
    pub policies: Policies,
    pub cluster_id: String,
    pub events: EventSink,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    ensured: EnsuredSpecs,
    /// How often a served load balancer is ensured again even if nothing changed, to repair
    /// drift on the provider's side.
    pub resync: Duration,
}

impl Context {
    pub fn new(
        client: Client,
        providers: Arc<ProviderRegistry>,
        nodes: Store<Node>,
        policies: Policies,
        events: EventSink,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Context {
            client,
            providers,
            nodes,
            policies,
            cluster_id: settings.cluster_id,
            events,
            metrics,
            backoff: Backoff::default(),
            ensured: EnsuredSpecs::default(),
            resync: settings.resync,
        }
    }
}

fn key(svc: &Service) -> String {
    object::key(svc)
}

fn has_finalizer(svc: &Service) -> bool {
    object::has_finalizer(svc, FINALIZER)
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_service(&svc, &ctx).await;
    ctx.metrics.reconciled(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.backoff.reset(&key(&svc));
    }
    result
}

/// Provider-requested delays are honoured; invalid input waits for a change (with a slow
/// resync in case the cause lies elsewhere); anything else backs off exponentially.
pub fn error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(service = %key(&svc), %error, "reconcile failed");
    match error {
        Error::InvalidService(_) => Action::await_change(),
        Error::Provider(e) if e.retry_after().is_some() => {
            Action::requeue(e.retry_after().unwrap_or(crate::backoff::BASE))
        }
        Error::Provider(e) if e.is_permanent() => Action::requeue(crate::backoff::MAX),
        _ => Action::requeue(ctx.backoff.next_delay(&key(&svc))),
    }
}

async fn reconcile_service(svc: &Service, ctx: &Context) -> Result<Action> {
    if svc.meta().deletion_timestamp.is_some() {
        return if has_finalizer(svc) {
            cleanup(svc, ctx).await
        } else {
            Ok(Action::await_change())
        };
    }
    match ctx.providers.for_service(svc) {
        Selection::Serve(chosen) => {
            // Its class now points at another cloud: free the old load balancer first.
            if has_finalizer(svc)
                && let Some(recorded) = recorded_source(svc)
                && recorded != chosen.source
            {
                delete_load_balancer(svc, ctx).await?;
            }
            ensure(svc, ctx, chosen).await
        }
        Selection::NotOurs if has_finalizer(svc) => cleanup(svc, ctx).await,
        // Not ours, or nothing left to clean: never touch it.
        Selection::NotOurs => Ok(Action::await_change()),
        Selection::Unavailable { config, reason } => {
            let message = format!("ProviderConfig {config} cannot be used: {reason}");
            publish(
                ctx,
                svc,
                EventType::Warning,
                "ProviderUnavailable",
                &message,
            )
            .await;
            set_condition(ctx, svc, "False", "ProviderUnavailable", &message).await?;
            Ok(Action::requeue(UNAVAILABLE_RETRY))
        }
    }
}

async fn ensure(svc: &Service, ctx: &Context, chosen: Chosen) -> Result<Action> {
    let uid = svc.uid().unwrap_or_default();
    let nodes = eligible_nodes(ctx.nodes.state().iter().map(|n| n.as_ref()));
    let policies = ctx.policies.for_service(
        svc.namespace().as_deref().unwrap_or_default(),
        &svc.name_any(),
    );
    let desired = match desired_load_balancer(&ctx.cluster_id, svc, &nodes, &policies) {
        Ok(d) => d,
        Err(invalid) => {
            // Reported, not retried hot: the same spec would fail the same way.
            publish(
                ctx,
                svc,
                EventType::Warning,
                "SyncLoadBalancerFailed",
                &format!("Error syncing load balancer: {invalid}"),
            )
            .await;
            set_condition(ctx, svc, "False", "InvalidService", &invalid.to_string()).await?;
            return Err(Error::InvalidService(invalid));
        }
    };

    // Ensured (and its status written) moments ago: this reconcile was triggered by our own
    // writes, whose watch events may arrive before the cache shows them. Another cloud call
    // would change nothing.
    if let Some(wait) = ctx.ensured.due_in(&uid, &desired, ctx.resync) {
        return Ok(Action::requeue(wait));
    }

    // Before anything exists in the cloud, so a deleted Service can never leak it.
    let source = chosen.source.annotation_value();
    object::claim(&ctx.client, svc, FINALIZER, (PROVIDER_ANNOTATION, &source)).await?;

    let changed = ctx.ensured.changed(&uid, &desired);
    if changed {
        publish(
            ctx,
            svc,
            EventType::Normal,
            "EnsuringLoadBalancer",
            "Ensuring load balancer",
        )
        .await;
        if nodes.is_empty() {
            publish(
                ctx,
                svc,
                EventType::Warning,
                "UnAvailableLoadBalancer",
                "There are no available nodes for LoadBalancer",
            )
            .await;
        }
    }

    let provider = chosen.provider.name();
    let outcome = {
        let ensure = chosen.provider.ensure(&desired);
        tokio::pin!(ensure);
        tokio::select! {
            r = &mut ensure => r,
            _ = tokio::time::sleep(PROGRESS_AFTER) => {
                let message = format!("ensuring load balancer {} with the {provider} provider", desired.name);
                set_condition(ctx, svc, "Unknown", "Provisioning", &message).await?;
                ensure.await
            }
        }
    };
    ctx.metrics
        .provider_call(provider, "ensure", outcome.is_ok());

    match outcome {
        Ok(lb_status) => {
            let desired_status = status::load_balancer_status(&lb_status);
            let addresses: Vec<String> = desired_status
                .ingress
                .iter()
                .flatten()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect();
            let message = format!(
                "load balancer {} serves {} port(s) at {}",
                desired.name,
                lb_status.ports.len(),
                addresses.join(", ")
            );
            write_status(
                ctx,
                svc,
                Some(&desired_status),
                Some(("True", "Ensured", &message)),
            )
            .await?;
            if changed {
                publish(
                    ctx,
                    svc,
                    EventType::Normal,
                    "EnsuredLoadBalancer",
                    "Ensured load balancer",
                )
                .await;
            }
            ctx.ensured.record(uid, desired);
            Ok(Action::requeue(ctx.resync))
        }
        Err(e) => {
            ctx.ensured.forget(&uid);
            let (cond_status, reason) = match &e {
                ProviderError::RetryAfter { .. } => ("Unknown", "Provisioning"),
                other => ("False", other.reason()),
            };
            if !matches!(e, ProviderError::RetryAfter { .. }) {
                publish(
                    ctx,
                    svc,
                    EventType::Warning,
                    "SyncLoadBalancerFailed",
                    &format!("Error syncing load balancer: {e}"),
                )
                .await;
            }
            set_condition(ctx, svc, cond_status, reason, &e.to_string()).await?;
            Err(Error::Provider(e))
        }
    }
}

/// Deletes the Service's load balancer from the cloud that holds it (the recorded provider;
/// without a record, every provider, since deleting what is not there is a no-op).
async fn delete_load_balancer(svc: &Service, ctx: &Context) -> Result<()> {
    let name = load_balancer_name(svc);
    let owner = ownership(&ctx.cluster_id, svc);
    publish(
        ctx,
        svc,
        EventType::Normal,
        "DeletingLoadBalancer",
        "Deleting load balancer",
    )
    .await;
    let holders = match recorded_source(svc) {
        Some(source) => match ctx.providers.by_source(&source) {
            Some(chosen) => vec![chosen],
            None => {
                let message = format!(
                    "the provider holding its load balancer ({}) is gone; restore it so the load balancer can be deleted",
                    source.annotation_value()
                );
                publish(
                    ctx,
                    svc,
                    EventType::Warning,
                    "DeleteLoadBalancerFailed",
                    &message,
                )
                .await;
                return Err(Error::Provider(ProviderError::Unavailable(message)));
            }
        },
        None => ctx.providers.all(),
    };
    for holder in holders {
        let deleted = holder.provider.delete(&name, &owner).await;
        ctx.metrics
            .provider_call(holder.provider.name(), "delete", deleted.is_ok());
        if let Err(e) = deleted {
            publish(
                ctx,
                svc,
                EventType::Warning,
                "DeleteLoadBalancerFailed",
                &format!("Error deleting load balancer: {e}"),
            )
            .await;
            return Err(Error::Provider(e));
        }
    }
    ctx.ensured.forget(&svc.uid().unwrap_or_default());
    publish(
        ctx,
        svc,
        EventType::Normal,
        "DeletedLoadBalancer",
        "Deleted load balancer",
    )
    .await;
    Ok(())
}

async fn cleanup(svc: &Service, ctx: &Context) -> Result<Action> {
    delete_load_balancer(svc, ctx).await?;
    // A Service that stays (its type changed) must not keep advertising a dead address.
    if svc.meta().deletion_timestamp.is_none() {
        write_status(ctx, svc, Some(&Default::default()), None).await?;
        if let Some(conditions) = status::conditions_without_ours(svc) {
            patch_status(ctx, svc, json!({ "status": { "conditions": conditions } })).await?;
        }
    }
    object::remove_finalizer(&ctx.client, svc, FINALIZER).await?;
    Ok(Action::await_change())
}

/// Writes `.status.loadBalancer` and Portico's condition, each only when it differs from
/// what the Service already says; one patch at most.
async fn write_status(
    ctx: &Context,
    svc: &Service,
    load_balancer: Option<&k8s_openapi::api::core::v1::LoadBalancerStatus>,
    condition: Option<(&str, &str, &str)>,
) -> Result<()> {
    let mut status = serde_json::Map::new();
    if let Some(lb) = load_balancer
        && !status::load_balancer_status_matches(svc, lb)
    {
        // `null` removes the list under a merge patch; an empty list would linger.
        let ingress = match lb.ingress.as_deref() {
            Some(list) if !list.is_empty() => serde_json::to_value(list).expect("serializable"),
            _ => serde_json::Value::Null,
        };
        status.insert("loadBalancer".into(), json!({ "ingress": ingress }));
    }
    if let Some((s, reason, message)) = condition
        && let Some(conditions) =
            status::conditions_with(svc, s, reason, message, Time(jiff::Timestamp::now()))
    {
        status.insert(
            "conditions".into(),
            serde_json::to_value(conditions).expect("serializable"),
        );
    }
    if status.is_empty() {
        return Ok(());
    }
    patch_status(ctx, svc, json!({ "status": status })).await
}

async fn set_condition(
    ctx: &Context,
    svc: &Service,
    s: &str,
    reason: &str,
    message: &str,
) -> Result<()> {
    write_status(ctx, svc, None, Some((s, reason, message))).await
}

async fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: &str) {
    object::publish(&ctx.events, svc, type_, reason, note).await
}

async fn patch_status(ctx: &Context, svc: &Service, patch: serde_json::Value) -> Result<()> {
    object::patch_status(&ctx.client, svc, patch).await
}

/// Runs the Service controller until shutdown. `node_changes` fires whenever the set of
/// eligible nodes (or their addresses) changes, re-syncing every Service.
pub async fn run(
    ctx: Arc<Context>,
    node_changes: impl futures::Stream<Item = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let services: Api<Service> = Api::all(ctx.client.clone());
    let policy_changes = ctx.policies.changes().filter_map(|a| async move {
        (a.kind == FrontendTargetKind::Service)
            .then(|| ObjectRef::<Service>::new(&a.name).within(&a.namespace))
    });
    Controller::new(services, watcher::Config::default())
        .reconcile_on(policy_changes)
        .reconcile_all_on(node_changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "service controller event");
            }
        })
        .await;
}
