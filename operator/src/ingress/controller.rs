//! The Ingress controller: reconcile and error policy.
//!
//! The desired load balancer comes from [`super::translate`] (pure); this module reads what the
//! Ingress refers to, calls the provider and writes the outcome back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::ObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;

use crate::events::EventSink;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use portico_crds::FrontendTargetKind;
use portico_provider::ProviderError;
use serde_json::json;

use super::class::{IngressClasses, class_of};
use super::translate::{self, Referenced, referenced_secrets, referenced_services};
use super::{FINALIZER, status};
use crate::backoff::Backoff;
use crate::ensured::EnsuredSpecs;
use crate::error::{Error, Result, kube_call};
use crate::metrics::Metrics;
use crate::object;
use crate::policy::Policies;
use crate::provider_config::registry::{
    Chosen, PROVIDER_ANNOTATION, ProviderRegistry, Selection, recorded_source,
};
use crate::service::nodes::eligible_nodes;

const CONTROLLER: &str = "ingress";
/// How long an Ingress whose provider cannot be used waits before it is looked at again.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(30);

pub struct Context {
    pub client: Client,
    pub providers: Arc<ProviderRegistry>,
    pub nodes: Store<Node>,
    pub policies: Policies,
    pub classes: Store<IngressClass>,
    pub cluster_id: String,
    pub events: EventSink,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    pub resync: Duration,
    ensured: EnsuredSpecs,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        providers: Arc<ProviderRegistry>,
        nodes: Store<Node>,
        policies: Policies,
        classes: Store<IngressClass>,
        cluster_id: String,
        events: EventSink,
        metrics: Arc<Metrics>,
        resync: Duration,
    ) -> Self {
        Context {
            client,
            providers,
            nodes,
            policies,
            classes,
            cluster_id,
            events,
            metrics,
            backoff: Backoff::default(),
            resync,
            ensured: EnsuredSpecs::default(),
        }
    }
}

pub async fn reconcile(ingress: Arc<Ingress>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_ingress(&ingress, &ctx).await;
    ctx.metrics.reconciled(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.backoff.reset(&object::key(ingress.as_ref()));
    }
    result
}

pub fn error_policy(ingress: Arc<Ingress>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(ingress = %object::key(ingress.as_ref()), %error, "reconcile failed");
    match error {
        // A Service or Secret appearing triggers a reconcile through the watches.
        Error::InvalidIngress(_) => Action::await_change(),
        Error::Provider(e) if e.retry_after().is_some() => {
            Action::requeue(e.retry_after().unwrap_or(crate::backoff::BASE))
        }
        Error::Provider(e) if e.is_permanent() => Action::requeue(crate::backoff::MAX),
        _ => Action::requeue(ctx.backoff.next_delay(&object::key(ingress.as_ref()))),
    }
}

async fn reconcile_ingress(ingress: &Ingress, ctx: &Context) -> Result<Action> {
    let all_classes = ctx.classes.state();
    let classes = IngressClasses::from_classes(all_classes.iter().map(|c| c.as_ref()));
    let wants = classes.is_ours(ingress) && ingress.meta().deletion_timestamp.is_none();
    let has_finalizer = object::has_finalizer(ingress, FINALIZER);
    if !wants {
        return if has_finalizer {
            cleanup(ingress, ctx).await
        } else {
            Ok(Action::await_change())
        };
    }
    match ctx
        .providers
        .for_ingress_class(class_of(ingress, &all_classes))
    {
        Selection::Serve(chosen) => {
            // Its class now points at another cloud: free the old load balancer first.
            if has_finalizer
                && let Some(recorded) = recorded_source(ingress)
                && recorded != chosen.source
            {
                delete_load_balancer(ingress, ctx).await?;
            }
            ensure(ingress, ctx, chosen).await
        }
        Selection::NotOurs => Ok(Action::await_change()),
        Selection::Unavailable { config, reason } => {
            let message = format!("no usable provider ({config}): {reason}");
            object::publish(
                &ctx.events,
                ingress,
                EventType::Warning,
                "ProviderUnavailable",
                &message,
            )
            .await;
            Ok(Action::requeue(UNAVAILABLE_RETRY))
        }
    }
}

/// Reads the Services and TLS Secrets the Ingress names, fresh from the API.
async fn read_referenced(ingress: &Ingress, ctx: &Context) -> Result<Referenced> {
    let ns = ingress.namespace().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut referenced = Referenced::default();
    for name in referenced_services(ingress) {
        if let Some(svc) = kube_call("reading a backend Service", services.get_opt(&name)).await? {
            referenced.services.insert(name, svc);
        }
    }
    for name in referenced_secrets(ingress) {
        if let Some(secret) = kube_call("reading a TLS Secret", secrets.get_opt(&name)).await? {
            referenced.secrets.insert(name, secret);
        }
    }
    Ok(referenced)
}

async fn ensure(ingress: &Ingress, ctx: &Context, chosen: Chosen) -> Result<Action> {
    let uid = ingress.uid().unwrap_or_default();
    let referenced = read_referenced(ingress, ctx).await?;
    let nodes = eligible_nodes(ctx.nodes.state().iter().map(|n| n.as_ref()));
    let policies = ctx.policies.for_ingress(
        ingress.namespace().as_deref().unwrap_or_default(),
        &ingress.name_any(),
        &referenced_services(ingress),
    );
    let desired = match translate::desired_load_balancer(
        &ctx.cluster_id,
        ingress,
        &referenced,
        &nodes,
        &policies,
    ) {
        Ok(d) => d,
        Err(invalid) => {
            object::publish(
                &ctx.events,
                ingress,
                EventType::Warning,
                "SyncLoadBalancerFailed",
                &format!("Error syncing load balancer: {invalid}"),
            )
            .await;
            return Err(Error::InvalidIngress(invalid));
        }
    };

    let changed = ctx.ensured.changed(&uid, &desired);
    if let Some(due) = ctx.ensured.due_in(&uid, &desired, ctx.resync)
        && ingress
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .is_some_and(|i| !i.is_empty())
    {
        return Ok(Action::requeue(due));
    }

    // Before anything exists in the cloud, so deleting the Ingress cannot leak it.
    let source = chosen.source.annotation_value();
    object::claim(
        &ctx.client,
        ingress,
        FINALIZER,
        (PROVIDER_ANNOTATION, &source),
    )
    .await?;
    if changed {
        object::publish(
            &ctx.events,
            ingress,
            EventType::Normal,
            "EnsuringLoadBalancer",
            "Ensuring load balancer",
        )
        .await;
    }
    let outcome = chosen.provider.ensure(&desired).await;
    ctx.metrics
        .provider_call(chosen.provider.name(), "ensure", outcome.is_ok());
    match outcome {
        Ok(lb) => {
            let desired_status = status::load_balancer_status(&lb);
            if !status::matches(ingress, &desired_status) {
                object::patch_status(
                    &ctx.client,
                    ingress,
                    json!({ "status": { "loadBalancer": desired_status } }),
                )
                .await?;
            }
            if changed {
                object::publish(
                    &ctx.events,
                    ingress,
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
            if !matches!(e, ProviderError::RetryAfter { .. }) {
                object::publish(
                    &ctx.events,
                    ingress,
                    EventType::Warning,
                    "SyncLoadBalancerFailed",
                    &format!("Error syncing load balancer: {e}"),
                )
                .await;
            }
            Err(Error::Provider(e))
        }
    }
}

/// Deletes the Ingress's load balancer from the cloud that holds it (the recorded provider;
/// without a record, every provider, since deleting what is not there is a no-op).
async fn delete_load_balancer(ingress: &Ingress, ctx: &Context) -> Result<()> {
    let name = translate::load_balancer_name(ingress);
    let owner = translate::ownership(&ctx.cluster_id, ingress);
    object::publish(
        &ctx.events,
        ingress,
        EventType::Normal,
        "DeletingLoadBalancer",
        "Deleting load balancer",
    )
    .await;
    let holders = match recorded_source(ingress) {
        Some(source) => match ctx.providers.by_source(&source) {
            Some(chosen) => vec![chosen],
            None => {
                let message = format!(
                    "the provider holding its load balancer ({}) is gone; restore it so the load balancer can be deleted",
                    source.annotation_value()
                );
                object::publish(
                    &ctx.events,
                    ingress,
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
            object::publish(
                &ctx.events,
                ingress,
                EventType::Warning,
                "DeleteLoadBalancerFailed",
                &format!("Error deleting load balancer: {e}"),
            )
            .await;
            return Err(Error::Provider(e));
        }
    }
    ctx.ensured.forget(&ingress.uid().unwrap_or_default());
    object::publish(
        &ctx.events,
        ingress,
        EventType::Normal,
        "DeletedLoadBalancer",
        "Deleted load balancer",
    )
    .await;
    Ok(())
}

async fn cleanup(ingress: &Ingress, ctx: &Context) -> Result<Action> {
    delete_load_balancer(ingress, ctx).await?;
    // An Ingress that stays (its class changed) must not keep advertising a dead address.
    if ingress.meta().deletion_timestamp.is_none() {
        object::patch_status(
            &ctx.client,
            ingress,
            json!({ "status": { "loadBalancer": { "ingress": null } } }),
        )
        .await?;
    }
    object::remove_finalizer(&ctx.client, ingress, FINALIZER).await?;
    Ok(Action::await_change())
}

/// The Ingresses in `store` whose namespace is `meta`'s and that `refers` to its name.
fn referring(
    store: &Store<Ingress>,
    meta: &ObjectMeta,
    refers: fn(&Ingress) -> Vec<String>,
) -> Vec<ObjectRef<Ingress>> {
    let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|i| i.namespace().as_deref() == Some(ns) && refers(i).iter().any(|r| r == name))
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// Runs the Ingress controller until shutdown. Changes to referenced Services and TLS
/// Secrets, to IngressClasses, and to the eligible node set re-reconcile what they affect.
pub async fn run(
    ctx: Arc<Context>,
    node_changes: impl futures::Stream<Item = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<Ingress>::all(client.clone()),
        watcher::Config::default(),
    );
    let (by_service, by_secret, by_class, by_policy) = (
        controller.store(),
        controller.store(),
        controller.store(),
        controller.store(),
    );
    // A FrontendPolicy on an Ingress, or a BackendPolicy on a Service it routes to.
    let policy_changes = ctx.policies.changes().flat_map(move |a| {
        let refs = match a.kind {
            FrontendTargetKind::Ingress => {
                vec![ObjectRef::<Ingress>::new(&a.name).within(&a.namespace)]
            }
            FrontendTargetKind::Service => {
                let meta = ObjectMeta {
                    name: Some(a.name),
                    namespace: Some(a.namespace),
                    ..Default::default()
                };
                referring(&by_policy, &meta, referenced_services)
            }
        };
        futures::stream::iter(refs)
    });
    controller
        .reconcile_on(policy_changes)
        .watches(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            move |svc| referring(&by_service, &svc.metadata, referenced_services),
        )
        .watches(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().fields("type=kubernetes.io/tls"),
            move |secret| referring(&by_secret, &secret.metadata, referenced_secrets),
        )
        .watches(
            Api::<IngressClass>::all(client),
            watcher::Config::default(),
            move |_| {
                by_class
                    .state()
                    .iter()
                    .map(|i| ObjectRef::from_obj(i.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(node_changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "ingress controller event");
            }
        })
        .await;
}
