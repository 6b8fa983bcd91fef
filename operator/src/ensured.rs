//! What each controller last ensured per object, so a reconcile triggered only by its own
//! status write skips the cloud call, and events are sent only when something changed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portico_provider::LoadBalancerSpec;

#[derive(Default)]
pub struct EnsuredSpecs(Mutex<HashMap<String, (LoadBalancerSpec, Instant)>>);

impl EnsuredSpecs {
    /// True unless `spec` is exactly what was last ensured for `uid`.
    pub fn changed(&self, uid: &str, spec: &LoadBalancerSpec) -> bool {
        self.0
            .lock()
            .expect("ensured lock")
            .get(uid)
            .is_none_or(|(last, _)| last != spec)
    }

    /// When `spec` was ensured for `uid` less than `resync` ago, how long until it is due again.
    pub fn due_in(&self, uid: &str, spec: &LoadBalancerSpec, resync: Duration) -> Option<Duration> {
        let ensured = self.0.lock().expect("ensured lock");
        let (last, at) = ensured.get(uid)?;
        let age = at.elapsed();
        (last == spec && age < resync).then(|| resync - age)
    }

    pub fn record(&self, uid: String, spec: LoadBalancerSpec) {
        self.0
            .lock()
            .expect("ensured lock")
            .insert(uid, (spec, Instant::now()));
    }

    pub fn forget(&self, uid: &str) {
        self.0.lock().expect("ensured lock").remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_provider::{Frontend, LoadBalancerName, NetworkFrontend, Ownership};

    fn spec(port_count: usize) -> LoadBalancerSpec {
        LoadBalancerSpec {
            name: LoadBalancerName::for_object_uid("u"),
            owner: Ownership {
                cluster_id: "c".into(),
                object_uid: "u".into(),
                object_ref: "Service/a/b".into(),
            },
            requested_address: None,
            requested_address_name: None,
            source_ranges: Vec::new(),
            frontend: Frontend::Network(NetworkFrontend {
                listeners: Vec::with_capacity(port_count),
            }),
        }
    }

    #[test]
    fn a_spec_is_due_again_only_after_the_resync_period_or_a_change() {
        let ensured = EnsuredSpecs::default();
        assert!(ensured.changed("u", &spec(0)));
        assert_eq!(ensured.due_in("u", &spec(0), Duration::from_secs(60)), None);
        ensured.record("u".into(), spec(0));
        assert!(!ensured.changed("u", &spec(0)));
        assert!(
            ensured
                .due_in("u", &spec(0), Duration::from_secs(60))
                .is_some()
        );
        assert_eq!(
            ensured.due_in("u", &spec(0), Duration::ZERO),
            None,
            "resync elapsed"
        );
        let mut other = spec(0);
        other.source_ranges.push("127.0.0.0/8".parse().unwrap());
        assert!(ensured.changed("u", &other));
        ensured.forget("u");
        assert!(ensured.changed("u", &spec(0)));
    }
}
