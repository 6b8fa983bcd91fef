//! The proxies' worker threads: each runs its own single-threaded runtime, with its own
//! poller. A connection lives on one worker for its whole life, together with the
//! connections to targets it uses, so forwarding never wakes another thread. On the L7 and
//! L4 benchmarks, tokio's work-stealing runtime spent more CPU per request than this,
//! mostly in cross-thread wake-ups (docs/benchmarks.md).
//!
//! HTTP ports: every worker accepts from the one listening socket (a duplicate descriptor
//! of it, in its own poller). Whichever worker is awake accepts, so a burst of connections
//! would pile up on one: the accepting worker hands each connection to the worker serving
//! the fewest ([`Workers::place`]), since an HTTP connection's requests can be long-lived
//! and uneven.
//!
//! TCP (L4) listeners: each worker has a socket of its own in one `SO_REUSEPORT` group
//! ([`Workers::serve_each`]), so the kernel picks the worker of each connection and only
//! that one wakes. Either way the address is first bound without `SO_REUSEPORT`, so an
//! address taken by another process still fails to bind instead of silently sharing its
//! connections.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle};
use tokio::task::JoinHandle;

static WORKERS: OnceLock<Workers> = OnceLock::new();
/// Set before the first use by [`configure`]; otherwise one worker per CPU.
static WANTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

pub struct Workers {
    handles: Vec<Handle>,
    /// Connections each worker serves (or has been handed and not yet started).
    load: Vec<AtomicUsize>,
}

/// One connection counted against a worker until dropped.
pub struct Placed {
    worker: usize,
}

impl Placed {
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        get().load[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets how many workers to start; only effective before the data plane first serves.
pub fn configure(count: usize) {
    WANTED.store(count, Ordering::Relaxed);
}

/// The workers, started on first use.
pub fn get() -> &'static Workers {
    WORKERS.get_or_init(|| {
        let count = match WANTED.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        Workers::start(count)
    })
}

/// Which worker the calling thread is, if it is one.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

impl Workers {
    fn start(count: usize) -> Workers {
        let handles = (0..count)
            .map(|index| {
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name(format!("portico-proxy-{index}"))
                    .spawn(move || {
                        INDEX.with(|i| i.set(Some(index)));
                        let runtime = Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a proxy worker needs its own runtime (poller and timers)");
                        let _ = tx.send(runtime.handle().clone());
                        // Serves what is spawned on the handle for the life of the process,
                        // and closes idle upstream connections that went stale.
                        runtime.block_on(async {
                            loop {
                                tokio::time::sleep(super::http::SWEEP_IDLE_EVERY).await;
                                super::http::sweep_idle_connections();
                            }
                        });
                    })
                    .expect("starting a proxy worker thread");
                rx.recv().expect("a proxy worker reports its runtime")
            })
            .collect();
        Workers {
            handles,
            load: (0..count).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Counts a new connection against the worker serving the fewest, the calling one on
    /// a tie; returns where it should run.
    pub fn place(&self) -> Placed {
        let here = current();
        let load = |i: usize| self.load[i].load(Ordering::Relaxed);
        let mut best = here.unwrap_or(0);
        for i in 0..self.load.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        self.load[best].fetch_add(1, Ordering::Relaxed);
        Placed { worker: best }
    }

    /// Runs `future` on worker `index`.
    pub fn spawn_on<F>(&self, index: usize, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index].spawn(future)
    }

    /// How many workers there are (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `serve` on every worker, each with its own descriptor of `listener` (set
    /// non-blocking here, for all of them: the flag belongs to the socket). Returns one
    /// handle per worker.
    pub fn serve_on_all<F, Fut>(
        &self,
        listener: StdTcpListener,
        serve: F,
    ) -> io::Result<Vec<JoinHandle<()>>>
    where
        F: Fn(tokio::net::TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true)?;
        let mut copies = Vec::with_capacity(self.handles.len());
        for _ in 1..self.handles.len() {
            copies.push(listener.try_clone()?);
        }
        copies.push(listener);
        self.serve_each(copies, serve)
    }

    /// Runs `serve` on every worker with a listening socket of its own: `listeners` holds
    /// one per worker (non-blocking), in the workers' order. Returns one handle per worker.
    pub fn serve_each<F, Fut>(
        &self,
        listeners: Vec<StdTcpListener>,
        serve: F,
    ) -> io::Result<Vec<JoinHandle<()>>>
    where
        F: Fn(tokio::net::TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        assert_eq!(
            listeners.len(),
            self.handles.len(),
            "one listener per worker"
        );
        let mut tasks = Vec::with_capacity(listeners.len());
        for (handle, listener) in self.handles.iter().zip(listeners) {
            // Registered with the worker's own poller, so it must be converted there.
            let _entered = handle.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.push(handle.spawn(serve(listener)));
        }
        Ok(tasks)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn every_worker_accepts_from_the_one_socket() {
        let workers = get();
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let tasks = workers
            .serve_on_all(listener, |listener| {
                let seen = seen.clone();
                async move {
                    loop {
                        let Ok((mut stream, _)) = listener.accept().await else {
                            return;
                        };
                        let worker = current().expect("accepted on a worker thread");
                        seen.lock().unwrap().insert(worker);
                        let _ = stream.write_all(&[worker as u8]).await;
                    }
                }
            })
            .unwrap();
        assert_eq!(tasks.len(), workers.count());
        // Clients connected while the others are open: all of them are served, by the
        // workers' own threads.
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for client in &mut clients {
            let mut worker = [0u8];
            client.read_exact(&mut worker).await.unwrap();
            assert!(usize::from(worker[0]) < workers.count());
        }
        for task in tasks {
            task.abort();
        }
        assert!(!seen.lock().unwrap().is_empty());
        // The test's own thread is not a worker.
        assert_eq!(current(), None);
    }

    #[test]
    fn new_connections_go_to_the_least_loaded_worker() {
        let workers = get();
        if workers.count() < 2 {
            return;
        }
        let before: Vec<usize> = workers
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        let placed: Vec<Placed> = (0..2 * workers.count()).map(|_| workers.place()).collect();
        let after: Vec<usize> = workers
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        let added: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        // Other tests may hold connections meanwhile; what was added evens the load out.
        let (min, max) = (after.iter().min().unwrap(), after.iter().max().unwrap());
        assert!(
            max - min <= before.iter().max().unwrap() - before.iter().min().unwrap() + 1,
            "{before:?} -> {after:?}"
        );
        assert_eq!(added.iter().sum::<usize>(), placed.len());
        drop(placed);
        let released: Vec<usize> = workers
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        assert!(released.iter().sum::<usize>() <= before.iter().sum::<usize>());
    }
}
