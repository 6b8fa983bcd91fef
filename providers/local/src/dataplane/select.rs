//! Picking a target for a new connection (or UDP flow): round robin over the healthy ones,
//! with optional client-IP affinity.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::affinity::AffinityTable;
use super::health::{Health, HealthCell};
use super::source_ranges::SourceRanges;

/// A target as the data plane sees it.
#[derive(Debug)]
pub struct Backend {
    pub node: String,
    pub addr: SocketAddr,
    pub health: Arc<HealthCell>,
}

/// Everything a listener needs to route one connection; replaced as a whole on update, so a
/// connection sees either the old configuration or the new one, never a mix.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    pub backends: Vec<Backend>,
    /// The client-IP affinity timeout, when affinity is on.
    pub affinity: Option<Duration>,
    pub proxy_protocol: bool,
    pub preserve_client_ip: bool,
    pub source_ranges: SourceRanges,
    /// How long connections to a target that left the pool may go on; `None`: until they end.
    pub drain_timeout: Option<Duration>,
}

impl PoolSnapshot {
    /// True when the target at `i` may get traffic now (what a pinned client needs to stay).
    pub fn usable(&self, i: usize) -> bool {
        self.with_healths(|healths| healths.get(i) == Some(&routable(healths)))
    }

    /// Runs `f` on one reading of every target's health, each read once, in the targets'
    /// order. A decision made from one reading stays consistent while verdicts land: read
    /// twice, a first probe passing (unknown to healthy) between the reads left the pick
    /// with no target at all, and its connection was reset.
    fn with_healths<R>(&self, f: impl FnOnce(&[Health]) -> R) -> R {
        // Pools this size fit on the stack; larger ones (more nodes) pay one allocation.
        const ON_STACK: usize = 64;
        let n = self.backends.len();
        if n <= ON_STACK {
            let mut healths = [Health::Unknown; ON_STACK];
            for (h, b) in healths.iter_mut().zip(&self.backends) {
                *h = b.health.get();
            }
            f(&healths[..n])
        } else {
            let healths: Vec<Health> = self.backends.iter().map(|b| b.health.get()).collect();
            f(&healths)
        }
    }
}

/// The health a target needs to be routed to: healthy when any target is, otherwise
/// not-yet-probed (fail open until the first verdicts). Never unhealthy: a target failing
/// its check (a node without local endpoints) must get nothing.
fn routable(healths: &[Health]) -> Health {
    if healths.contains(&Health::Healthy) {
        Health::Healthy
    } else {
        Health::Unknown
    }
}

/// A listener's routing state that outlives configuration updates.
#[derive(Debug, Default)]
pub struct Selector {
    next: AtomicUsize,
    affinity: AffinityTable,
}

impl Selector {
    /// The index in `pool.backends` of the target for a connection from `client`, skipping
    /// the `tried` ones (earlier attempts of the same connection that failed to connect);
    /// `None` when no target may be used.
    pub fn pick(&self, pool: &PoolSnapshot, client: IpAddr, tried: &[usize]) -> Option<usize> {
        pool.with_healths(|healths| {
            let Some(timeout) = pool.affinity else {
                return self.round_robin(healths, tried);
            };
            let now = Instant::now();
            if !tried.is_empty() {
                let i = self.round_robin(healths, tried)?;
                self.affinity.pin(client, pool.backends[i].addr, now);
                return Some(i);
            }
            self.affinity.choose(client, now, timeout, |pinned| {
                let routable = routable(healths);
                let kept = pinned.and_then(|addr| {
                    pool.backends
                        .iter()
                        .zip(healths)
                        .position(|(b, &h)| b.addr == addr && h == routable)
                });
                let i = kept.or_else(|| self.round_robin(healths, &[]))?;
                Some((pool.backends[i].addr, i))
            })
        })
    }

    /// Records that a connection of `client` to `target` just ended, so the affinity timeout
    /// runs from the client's last activity rather than from its connection's start.
    pub fn release(&self, pool: &PoolSnapshot, client: IpAddr, target: SocketAddr) {
        self.release_at(pool, client, target, Instant::now());
    }

    /// [`Self::release`] for activity that ended at `at` (an idle UDP flow's last datagram).
    pub fn release_at(&self, pool: &PoolSnapshot, client: IpAddr, target: SocketAddr, at: Instant) {
        if pool.affinity.is_some() {
            self.affinity.touch(client, target, at);
        }
    }

    /// The next of the routable targets not yet `tried`, in turn; `healths` is one reading.
    fn round_robin(&self, healths: &[Health], tried: &[usize]) -> Option<usize> {
        let routable = routable(healths);
        let eligible = |(i, h): &(usize, &Health)| **h == routable && !tried.contains(i);
        let count = healths.iter().enumerate().filter(eligible).count();
        if count == 0 {
            return None;
        }
        let nth = self.next.fetch_add(1, Ordering::Relaxed) % count;
        healths
            .iter()
            .enumerate()
            .filter(eligible)
            .nth(nth)
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(states: &[Health]) -> PoolSnapshot {
        PoolSnapshot {
            backends: states
                .iter()
                .enumerate()
                .map(|(i, h)| Backend {
                    node: format!("n{i}"),
                    addr: SocketAddr::from(([127, 90, 9, 100 + i as u8], 8000)),
                    health: Arc::new(HealthCell::with(*h)),
                })
                .collect(),
            ..PoolSnapshot::default()
        }
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::from([127, 90, 9, last])
    }

    fn picks(selector: &Selector, pool: &PoolSnapshot, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| selector.pick(pool, client(1), &[]).unwrap())
            .collect()
    }

    use Health::*;

    #[test]
    fn round_robin_goes_through_the_healthy_targets_in_turn() {
        let pool = pool(&[Healthy, Unhealthy, Healthy, Healthy]);
        let selector = Selector::default();
        assert_eq!(picks(&selector, &pool, 6), vec![0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn pools_larger_than_the_stack_reading_go_round_the_same_way() {
        let states: Vec<Health> = (0..70)
            .map(|i| if i % 7 == 3 { Unhealthy } else { Healthy })
            .collect();
        let pool = pool(&states);
        let healthy: Vec<usize> = (0..70).filter(|i| i % 7 != 3).collect();
        let selector = Selector::default();
        assert_eq!(picks(&selector, &pool, 60), healthy);
        assert!(pool.usable(0) && !pool.usable(3) && !pool.usable(70));
    }

    #[test]
    fn unknown_targets_are_used_only_while_none_is_healthy() {
        let selector = Selector::default();
        let fresh = pool(&[Unknown, Unknown, Unhealthy]);
        assert_eq!(picks(&selector, &fresh, 4), vec![0, 1, 0, 1]);

        let one_verdict = pool(&[Unknown, Healthy, Unhealthy]);
        assert_eq!(picks(&selector, &one_verdict, 3), vec![1, 1, 1]);
    }

    #[test]
    fn a_verdict_landing_during_a_pick_never_leaves_it_without_a_target() {
        // The first probe passing (unknown -> healthy) as a connection arrives: whichever
        // state the pick reads, the one target is routable.
        let pool = Arc::new(pool(&[Unknown]));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    pool.backends[0].health.set(Healthy);
                    pool.backends[0].health.set(Unknown);
                }
            })
        };
        let selector = Selector::default();
        let empty = (0..200_000)
            .filter(|_| selector.pick(&pool, client(1), &[]).is_none())
            .count();
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(empty, 0, "picks that found no target");
    }

    #[test]
    fn no_target_is_picked_when_all_are_unhealthy() {
        let selector = Selector::default();
        assert_eq!(
            selector.pick(&pool(&[Unhealthy, Unhealthy]), client(1), &[]),
            None
        );
        assert_eq!(selector.pick(&pool(&[]), client(1), &[]), None);
    }

    #[test]
    fn retries_skip_the_targets_already_tried() {
        let selector = Selector::default();
        let pool = pool(&[Healthy, Healthy, Healthy]);
        for _ in 0..5 {
            let i = selector.pick(&pool, client(1), &[0, 2]).unwrap();
            assert_eq!(i, 1);
        }
        assert_eq!(selector.pick(&pool, client(1), &[0, 1, 2]), None);
    }

    #[test]
    fn affinity_pins_a_client_until_its_target_turns_unhealthy() {
        let selector = Selector::default();
        let mut pool = pool(&[Healthy, Healthy, Healthy]);
        pool.affinity = Some(Duration::from_secs(60));
        let first = selector.pick(&pool, client(7), &[]).unwrap();
        for _ in 0..5 {
            assert_eq!(selector.pick(&pool, client(7), &[]), Some(first));
        }
        // Another client is spread independently.
        let other = selector.pick(&pool, client(8), &[]).unwrap();
        assert_ne!(other, first);

        pool.backends[first].health.set(Unhealthy);
        let moved = selector.pick(&pool, client(7), &[]).unwrap();
        assert_ne!(moved, first);
        // The client sticks to its new target, even once the old one recovers.
        pool.backends[first].health.set(Healthy);
        assert_eq!(selector.pick(&pool, client(7), &[]), Some(moved));
    }

    #[test]
    fn affinity_follows_a_target_to_its_new_index_after_an_update() {
        let selector = Selector::default();
        let mut before = pool(&[Healthy, Healthy]);
        before.affinity = Some(Duration::from_secs(60));
        let i = selector.pick(&before, client(7), &[]).unwrap();
        let pinned = before.backends[i].addr;

        let mut after = pool(&[Healthy, Healthy, Healthy]);
        after.affinity = before.affinity;
        after.backends.reverse();
        let j = selector.pick(&after, client(7), &[]).unwrap();
        assert_eq!(after.backends[j].addr, pinned);
    }
}
