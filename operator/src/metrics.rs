//! Prometheus metrics: reconciles, their errors and durations, provider calls, leadership.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: &'static str,
    pub operation: &'static str,
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub provider_calls: Family<ProviderLabels, Counter>,
    pub leader: Gauge,
    pub garbage_collected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portico");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
            });
        let provider_calls = Family::<ProviderLabels, Counter>::default();
        let leader = Gauge::default();
        let garbage_collected = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take",
            reconcile_duration.clone(),
        );
        registry.register(
            "provider_calls",
            "Calls to the cloud provider",
            provider_calls.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "garbage_collected_load_balancers",
            "Owned load balancers deleted because their object was gone",
            garbage_collected.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            provider_calls,
            leader,
            garbage_collected,
        }
    }
}

impl Metrics {
    pub fn reconciled(
        &self,
        controller: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels { controller, reason })
                .inc();
        }
    }

    pub fn provider_call(&self, provider: &'static str, operation: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.provider_calls
            .get_or_create(&ProviderLabels {
                provider,
                operation,
                outcome,
            })
            .inc();
    }

    /// The text exposition format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_errors_are_exported() {
        let m = Metrics::default();
        m.reconciled("service", Duration::from_millis(3), None);
        m.reconciled(
            "service",
            Duration::from_millis(3),
            Some("ProviderUnavailable"),
        );
        m.provider_call("local", "ensure", true);
        let text = m.encode();
        assert!(
            text.contains("portico_reconciles_total{controller=\"service\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "portico_reconcile_errors_total{controller=\"service\",reason=\"ProviderUnavailable\"} 1"
        ));
        assert!(
            text.contains("portico_reconcile_duration_seconds_count{controller=\"service\"} 2")
        );
        assert!(text.contains(
            "portico_provider_calls_total{provider=\"local\",operation=\"ensure\",outcome=\"ok\"} 1"
        ));
    }
}
