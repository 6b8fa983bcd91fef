//! Client-IP session affinity: which target a client was last sent to, and when.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Expired pins are dropped at most this often (and at least once per affinity timeout), so
/// a table of many clients is not scanned on every connection.
const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct AffinityTable {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    pins: HashMap<IpAddr, Pin>,
    last_sweep: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Pin {
    target: SocketAddr,
    last_seen: Instant,
}

impl Default for AffinityTable {
    fn default() -> Self {
        AffinityTable {
            inner: Mutex::new(Inner {
                pins: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }
}

impl AffinityTable {
    /// Decides a client's target under one lock: `decide` gets the target the client is
    /// pinned to (when it came back within `timeout`) and returns the one to use, which is
    /// pinned from `now` on. `None` from `decide` leaves the table as it was.
    pub fn choose<T>(
        &self,
        client: IpAddr,
        now: Instant,
        timeout: Duration,
        decide: impl FnOnce(Option<SocketAddr>) -> Option<(SocketAddr, T)>,
    ) -> Option<T> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.sweep_if_due(now, timeout);
        let pinned = inner
            .pins
            .get(&client)
            .filter(|pin| now.saturating_duration_since(pin.last_seen) <= timeout)
            .map(|pin| pin.target);
        let (target, chosen) = decide(pinned)?;
        inner.pins.insert(
            client,
            Pin {
                target,
                last_seen: now,
            },
        );
        Some(chosen)
    }

    /// Pins `client` to `target` regardless of an earlier pin (after that one failed).
    pub fn pin(&self, client: IpAddr, target: SocketAddr, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pins.insert(
            client,
            Pin {
                target,
                last_seen: now,
            },
        );
    }

    /// Restarts the timeout of `client`'s pin if it still points at `target`: a connection
    /// that just ended counts as the client's last visit.
    pub fn touch(&self, client: IpAddr, target: SocketAddr, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pin) = inner.pins.get_mut(&client)
            && pin.target == target
        {
            pin.last_seen = pin.last_seen.max(now);
        }
    }

    /// Drops every pin older than `timeout`.
    pub fn sweep(&self, now: Instant, timeout: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.sweep(now, timeout);
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pins
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn sweep_if_due(&mut self, now: Instant, timeout: Duration) {
        if now.saturating_duration_since(self.last_sweep) >= timeout.min(MAX_SWEEP_PERIOD) {
            self.sweep(now, timeout);
        }
    }

    fn sweep(&mut self, now: Instant, timeout: Duration) {
        self.pins
            .retain(|_, pin| now.saturating_duration_since(pin.last_seen) <= timeout);
        self.last_sweep = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn client(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What the table hands `decide` for `c` at `now`, pinning `fallback` when there is no pin.
    fn visit(table: &AffinityTable, c: &str, now: Instant, fallback: &str) -> SocketAddr {
        table
            .choose(client(c), now, TIMEOUT, |pinned| {
                let t = pinned.unwrap_or(addr(fallback));
                Some((t, t))
            })
            .unwrap()
    }

    #[test]
    fn a_client_returning_within_the_timeout_keeps_its_target() {
        let table = AffinityTable::default();
        let t0 = Instant::now();
        assert_eq!(
            visit(&table, "127.90.0.5", t0, "127.0.0.1:1"),
            addr("127.0.0.1:1")
        );
        // Sliding: each visit restarts the timeout, so 3 visits 8 s apart stay pinned.
        let mut now = t0;
        for _ in 0..3 {
            now += Duration::from_secs(8);
            assert_eq!(
                visit(&table, "127.90.0.5", now, "127.0.0.1:2"),
                addr("127.0.0.1:1")
            );
        }
        // Other clients are independent.
        assert_eq!(
            visit(&table, "127.90.0.6", now, "127.0.0.1:2"),
            addr("127.0.0.1:2")
        );
    }

    #[test]
    fn a_pin_expires_after_the_timeout() {
        let table = AffinityTable::default();
        let t0 = Instant::now();
        visit(&table, "127.90.0.5", t0, "127.0.0.1:1");
        let later = t0 + TIMEOUT + Duration::from_millis(1);
        assert_eq!(
            visit(&table, "127.90.0.5", later, "127.0.0.1:2"),
            addr("127.0.0.1:2")
        );
    }

    #[test]
    fn expired_pins_are_swept() {
        let table = AffinityTable::default();
        let t0 = Instant::now();
        visit(&table, "127.90.0.5", t0, "127.0.0.1:1");
        visit(
            &table,
            "127.90.0.6",
            t0 + Duration::from_secs(5),
            "127.0.0.1:1",
        );
        table.sweep(t0 + Duration::from_secs(12), TIMEOUT);
        assert_eq!(table.len(), 1);
        // Choosing also sweeps once the sweep period has passed.
        visit(
            &table,
            "127.90.0.7",
            t0 + Duration::from_secs(30),
            "127.0.0.1:1",
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn touching_restarts_the_timeout_of_the_same_target_only() {
        let table = AffinityTable::default();
        let t0 = Instant::now();
        visit(&table, "127.90.0.5", t0, "127.0.0.1:1");
        table.touch(
            client("127.90.0.5"),
            addr("127.0.0.1:9"),
            t0 + Duration::from_secs(9),
        );
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(
            visit(&table, "127.90.0.5", t1, "127.0.0.1:2"),
            addr("127.0.0.1:2")
        );
        table.touch(
            client("127.90.0.5"),
            addr("127.0.0.1:2"),
            t1 + Duration::from_secs(9),
        );
        let t2 = t1 + Duration::from_secs(15);
        assert_eq!(
            visit(&table, "127.90.0.5", t2, "127.0.0.1:3"),
            addr("127.0.0.1:2")
        );
    }
}
