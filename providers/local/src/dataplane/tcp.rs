//! TCP listeners: accept, admit, pick a target, connect, optionally announce the client with
//! a PROXY header, then copy both ways until both sides are done.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::proxy_protocol;
use super::select::{PoolSnapshot, Selector};
use super::{ActiveGuard, ListenerContext, Stats};

const BACKLOG: u32 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Targets tried for one connection before it is given up.
const MAX_ATTEMPTS: usize = 3;
/// Per direction. 16 KiB (haproxy's size) stays in cache: on the bulk benchmark 64 KiB cost
/// half as much CPU again per byte, its fewer system calls outweighed by cache misses.
const COPY_BUFFER: usize = 16 * 1024;

/// A listening socket, not yet registered with any runtime: the HTTP ports hand it to the
/// proxy workers ([`super::workers`]).
pub(super) fn bind(local: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    // A restarted daemon must get its ports back while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    // Linux copies it to every accepted connection: one system call per listener instead of
    // one per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&local.into())?;
    socket.listen(BACKLOG as i32)?;
    // Tokio polls it; every descriptor duplicated from it shares this flag.
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What every connection of a listener shares, behind one `Arc` per connection.
struct Shared {
    lb: Arc<str>,
    local: SocketAddr,
    selector: Arc<Selector>,
    stats: Arc<Stats>,
    connections: CancellationToken,
    /// The pool's configuration, for connections that must end when their target is drained.
    config: watch::Receiver<Arc<PoolSnapshot>>,
}

pub(super) async fn serve(listener: TcpListener, mut ctx: ListenerContext) {
    let shared = Arc::new(Shared {
        lb: ctx.lb.clone(),
        local: ctx.local,
        selector: ctx.selector.clone(),
        stats: ctx.stats.clone(),
        connections: ctx.connections.clone(),
        config: ctx.config.clone(),
    });
    let mut pool = ctx.config.borrow_and_update().clone();
    // Built once: a fresh `cancelled()` per accept would register a waiter each time.
    let stop = ctx.stop.clone();
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    backoff_after_accept_error(&shared.lb, shared.local, e).await;
                    continue;
                }
            },
        };
        ctx.current(&mut pool);
        if !pool.source_ranges.allows(peer.ip()) {
            Stats::add(&shared.stats.rejected_source, 1);
            tracing::debug!(lb = %shared.lb, client = %peer, "client outside the source ranges");
            reset(stream);
            continue;
        }
        tokio::spawn(shared.clone().handle(stream, peer, pool.clone()));
    }
}

impl Shared {
    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, pool: Arc<PoolSnapshot>) {
        let _active = ActiveGuard::new(&self.stats);
        set_nodelay_unless_inherited(&client);
        tokio::select! {
            biased;
            _ = self.connections.cancelled() => {}
            _ = self.proxy(client, peer, &pool) => {}
        }
    }

    async fn proxy(&self, mut client: TcpStream, peer: SocketAddr, pool: &PoolSnapshot) {
        let client_ip = peer.ip().to_canonical();
        let source = pool.preserve_client_ip.then_some(client_ip);
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut attempts = 0;
        let (mut upstream, target) = loop {
            let Some(i) = self.selector.pick(pool, client_ip, &tried[..attempts]) else {
                Stats::add(&self.stats.rejected_no_target, 1);
                tracing::debug!(lb = %self.lb, client = %peer, attempts, "no usable target");
                reset(client);
                return;
            };
            let backend = &pool.backends[i];
            match connect(backend.addr, source).await {
                Ok(upstream) => break (upstream, backend.addr),
                Err(e) => {
                    tracing::debug!(lb = %self.lb, node = %backend.node, target = %backend.addr,
                        error = %e, "cannot connect to target");
                    tried[attempts] = i;
                    attempts += 1;
                    if attempts == MAX_ATTEMPTS {
                        Stats::add(&self.stats.rejected_no_target, 1);
                        reset(client);
                        return;
                    }
                }
            }
        };
        Stats::add(&self.stats.accepted, 1);
        if pool.proxy_protocol {
            let header = proxy_protocol::Header::tcp(peer, self.local);
            if upstream.write_all(header.as_bytes()).await.is_err() {
                return;
            }
        }
        let (mut to_target, mut to_client) = (0, 0);
        let copy = copy_both_ways(&mut client, &mut upstream, &mut to_target, &mut to_client);
        // Only pools with a drain timeout pay for watching their configuration.
        let result = match pool.drain_timeout {
            None => copy.await,
            Some(_) => tokio::select! {
                r = copy => r,
                _ = drained(self.config.clone(), target) => {
                    tracing::debug!(lb = %self.lb, client = %peer, %target, "target drained: connection closed");
                    Ok(())
                }
            },
        };
        Stats::add(&self.stats.bytes_in, to_target);
        Stats::add(&self.stats.bytes_out, to_client);
        if let Err(e) = result {
            tracing::trace!(lb = %self.lb, client = %peer, error = %e, "connection ended");
        }
        self.selector.release(pool, client_ip, target);
    }
}

/// Completes once `target` has been out of the pool for the pool's drain timeout (counted from
/// when it left); never while it stays in, or when the pool keeps connections until they end.
async fn drained(mut config: watch::Receiver<Arc<PoolSnapshot>>, target: SocketAddr) {
    let mut gone_since: Option<tokio::time::Instant> = None;
    loop {
        let deadline = {
            let pool = config.borrow_and_update();
            let present = pool.backends.iter().any(|b| b.addr == target);
            if present {
                gone_since = None;
                None
            } else {
                let since = *gone_since.get_or_insert_with(tokio::time::Instant::now);
                pool.drain_timeout.map(|t| since + t)
            }
        };
        let changed = async {
            if config.changed().await.is_err() {
                // The load balancer is gone; `connections` ends this connection.
                std::future::pending::<()>().await;
            }
        };
        match deadline {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = changed => {}
            },
            None => changed.await,
        }
    }
}

/// Copies both ways until both directions have ended, passing the first end of stream on as
/// a half-close. The first error ends both directions.
///
/// Used instead of `tokio::io::copy_bidirectional`, whose buffers are allocated zeroed: at
/// 2 x 64 KiB per connection (the size then) that memset showed up as the largest user-space
/// cost of short connections. Here the buffers are read into uninitialised, and the second
/// end of stream is not passed on by a `shutdown` since closing both sockets next sends the
/// FIN anyway (one syscall, and a loopback round of softirq work, less per connection).
async fn copy_both_ways(
    a: &mut TcpStream,
    b: &mut TcpStream,
    a_to_b: &mut u64,
    b_to_a: &mut u64,
) -> io::Result<()> {
    let (a_read, a_write) = a.split();
    let (b_read, b_write) = b.split();
    let one_done = AtomicBool::new(false);
    tokio::try_join!(
        pump(a_read, b_write, a_to_b, &one_done),
        pump(b_read, a_write, b_to_a, &one_done)
    )?;
    Ok(())
}

async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    copied: &mut u64,
    one_done: &AtomicBool,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(COPY_BUFFER);
    loop {
        buf.clear();
        if from.read_buf(&mut buf).await? == 0 {
            if !one_done.swap(true, Ordering::Relaxed) {
                // The peer may be gone already; the other direction reports that if it
                // matters.
                let _ = to.shutdown().await;
            }
            return Ok(());
        }
        to.write_all(&buf).await?;
        *copied += buf.len() as u64;
    }
}

/// A connection to `target`, from `source` (any port) when given and of the same family.
///
/// Connected by hand rather than with `TcpSocket::connect`, which asks the kernel for the
/// socket's error (`getsockopt`) once it is writable: the readiness event already tells a
/// failed handshake (error or hang-up) from a completed one, so the error is only fetched
/// when there is one.
async fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(SocketProtocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source.filter(|s| s.is_ipv4() == target.is_ipv4()) {
        // Without it, bind() would reserve an ephemeral port for the source address alone and
        // the range would run out after ~28k connections per client address; with it the
        // port is chosen at connect() time, per 4-tuple.
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let handshake = stream.ready(Interest::WRITABLE | Interest::ERROR);
    let ready = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(ready) => ready?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionRefused, "connection failed")
        }));
    }
    Ok(stream)
}

/// Accepted connections inherit `TCP_NODELAY` from the listener ([`bind`]) on Linux only.
pub(super) fn set_nodelay_unless_inherited(stream: &TcpStream) {
    if cfg!(not(target_os = "linux")) {
        let _ = stream.set_nodelay(true);
    }
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes with a RST, so a refused client learns at once instead of seeing a clean EOF.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Out of descriptors or memory, accept fails at once every time; pausing keeps the loop from
/// spinning while connections close.
async fn backoff_after_accept_error(lb: &str, local: SocketAddr, e: io::Error) {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!(%lb, %local, error = %e, "accept failed; pausing");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        _ => tracing::debug!(%lb, %local, error = %e, "accept failed"),
    }
}
