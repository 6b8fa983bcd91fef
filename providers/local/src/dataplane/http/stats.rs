//! Request counters of the L7 data plane, bumped lock-free per request and read by /metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

/// The status classes counted, in [`RequestCounters::get`] order.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Responses by status class.
#[derive(Debug, Default)]
pub struct RequestCounters([AtomicU64; 5]);

impl RequestCounters {
    pub fn count(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of `CLASSES[class]`.
    pub fn get(&self, class: usize) -> u64 {
        self.0[class].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_by_class() {
        let c = RequestCounters::default();
        for s in [200, 204, 308, 404, 502, 503, 101] {
            c.count(StatusCode::from_u16(s).unwrap());
        }
        let counts: Vec<u64> = (0..5).map(|i| c.get(i)).collect();
        assert_eq!(counts, vec![1, 2, 1, 1, 2]);
    }
}
