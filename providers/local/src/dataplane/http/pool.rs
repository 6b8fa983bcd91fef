//! What the two per-worker pools of target connections share ([`super::direct`]'s raw ones
//! and [`super::upstream`]'s hyper ones): idle connections by target, the most recently used
//! taken first, the oldest dropped first, and a periodic sweep counted in sweeps rather than
//! clock readings, so lending a connection reads no clock.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::thread::LocalKey;
use std::time::Duration;

/// How often each worker sweeps its pools.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Idle connections are closed after this many sweeps idle (75–90 s).
const IDLE_SWEEPS: u64 = 6;
/// Idle connections kept per target and worker; beyond it the oldest is closed.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// A connection that can sit idle in a pool.
pub trait Reusable {
    /// Neither closed by the target nor otherwise unfit for another exchange.
    fn usable(&self) -> bool;
}

struct Idle<C> {
    conn: C,
    /// The sweep count when it went idle.
    since: u64,
}

/// One worker's idle connections (the pools are thread-local: no lock).
pub struct IdlePool<C> {
    by_target: HashMap<SocketAddr, VecDeque<Idle<C>>>,
    sweeps: u64,
}

impl<C> Default for IdlePool<C> {
    fn default() -> Self {
        IdlePool {
            by_target: HashMap::new(),
            sweeps: 0,
        }
    }
}

impl<C> Idle<C> {
    /// Idle for fewer than [`IDLE_SWEEPS`] sweeps, `sweeps` being the pool's count now.
    fn fresh(&self, sweeps: u64) -> bool {
        sweeps - self.since < IDLE_SWEEPS
    }
}

/// Runs `f` on the calling thread's pool in `key`; `None` once the thread is exiting (its
/// pool is gone, so a connection given back just closes).
pub fn with<C: 'static, R>(
    key: &'static LocalKey<RefCell<IdlePool<C>>>,
    f: impl FnOnce(&mut IdlePool<C>) -> R,
) -> Option<R> {
    key.try_with(|pool| f(&mut pool.borrow_mut())).ok()
}

impl<C: Reusable> IdlePool<C> {
    /// The most recently used idle connection to `target` that is still usable.
    pub fn take(&mut self, target: SocketAddr) -> Option<C> {
        let sweeps = self.sweeps;
        let queue = self.by_target.get_mut(&target)?;
        while let Some(idle) = queue.pop_back() {
            if idle.fresh(sweeps) && idle.conn.usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next exchange with `target`.
    pub fn put(&mut self, target: SocketAddr, conn: C) {
        let sweeps = self.sweeps;
        let queue = self.by_target.entry(target).or_default();
        // The oldest are at the front.
        while queue.front().is_some_and(|i| !i.fresh(sweeps)) {
            queue.pop_front();
        }
        if queue.len() >= MAX_IDLE_PER_TARGET {
            queue.pop_front();
        }
        queue.push_back(Idle {
            conn,
            since: sweeps,
        });
    }

    /// Closes the connections that expired or became unusable (their target closed them:
    /// they would otherwise hold a descriptor until the next request to that target, or for
    /// good once nothing routes there).
    pub fn sweep(&mut self) {
        self.sweeps += 1;
        let sweeps = self.sweeps;
        self.by_target.retain(|_, queue| {
            queue.retain(|idle| idle.fresh(sweeps) && idle.conn.usable());
            !queue.is_empty()
        });
    }

    /// Idle connections to `target`.
    #[cfg(test)]
    pub fn idle(&self, target: SocketAddr) -> usize {
        self.by_target.get(&target).map_or(0, VecDeque::len)
    }

    #[cfg(test)]
    pub fn targets(&self) -> usize {
        self.by_target.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError<E> {
    #[error("cannot connect to the target: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Failed(E),
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    struct Fake(Rc<Cell<bool>>);

    impl Reusable for Fake {
        fn usable(&self) -> bool {
            self.0.get()
        }
    }

    #[test]
    fn the_last_returned_is_lent_first_and_unusable_ones_are_skipped() {
        let target: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let mut pool = IdlePool::default();
        let (a, b) = (Rc::new(Cell::new(true)), Rc::new(Cell::new(true)));
        pool.put(target, Fake(a.clone()));
        pool.put(target, Fake(b.clone()));
        let taken = pool.take(target).unwrap();
        assert!(Rc::ptr_eq(&taken.0, &b));
        a.set(false);
        assert!(
            pool.take(target).is_none(),
            "the closed one is dropped, not lent"
        );
        assert_eq!(pool.idle(target), 0);
    }

    #[test]
    fn sweeps_close_unusable_and_expired_connections_and_forget_empty_targets() {
        let (t1, t2): (SocketAddr, SocketAddr) = (
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
        );
        let mut pool = IdlePool::default();
        let closed = Rc::new(Cell::new(true));
        pool.put(t1, Fake(closed.clone()));
        pool.put(t2, Fake(Rc::new(Cell::new(true))));
        pool.sweep();
        assert_eq!((pool.idle(t1), pool.idle(t2)), (1, 1), "open ones stay");
        closed.set(false);
        pool.sweep();
        assert_eq!((pool.idle(t1), pool.targets()), (0, 1));
        for _ in 0..IDLE_SWEEPS {
            pool.sweep();
        }
        assert_eq!(pool.targets(), 0, "idle past its time");
    }
}
