//! Per-object exponential backoff for failed reconciles, as the upstream service controller
//! does it: 5 s doubling to 300 s, reset by a success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub const BASE: Duration = Duration::from_secs(5);
pub const MAX: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before the next try.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("backoff lock");
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = BASE.saturating_mul(1u32 << (*n).min(16)).min(MAX);
        *n = n.saturating_add(1);
        delay
    }

    pub fn reset(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_five_seconds_up_to_five_minutes() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay("a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn success_resets_and_objects_are_independent() {
        let b = Backoff::default();
        b.next_delay("a");
        b.next_delay("a");
        assert_eq!(b.next_delay("b"), BASE);
        b.reset("a");
        assert_eq!(b.next_delay("a"), BASE);
    }
}
