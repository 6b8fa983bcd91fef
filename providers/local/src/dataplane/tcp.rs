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
    listen(local, false)
}

/// `count` listening sockets on `local` in one `SO_REUSEPORT` group, one per proxy worker:
/// the kernel hands each new connection to one of them by its addresses' hash.
///
/// The address is bound once without `SO_REUSEPORT` first, so one that another socket holds
/// (even in a reuse-port group of its own) fails to bind as before instead of being shared
/// with it; that also settles port 0 to one port for the whole group.
pub(super) fn bind_group(
    local: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    if count <= 1 {
        return Ok(vec![listen(local, false)?]);
    }
    let probe = listening_socket(local)?;
    probe.bind(&local.into())?;
    let local = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an internet address"))?;
    drop(probe);
    (0..count).map(|_| listen(local, true)).collect()
}

/// A TCP socket to bind `local` with.
fn listening_socket(local: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    // A restarted daemon must get its ports back while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    Ok(socket)
}

fn listen(local: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = listening_socket(local)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
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
    /// This accept loop's own child of the load balancer's token: every connection waits on
    /// it, and a token's waiters sit behind one lock, which the workers would otherwise all
    /// take for every connection.
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
        connections: ctx.connections.child_token(),
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
    let mut buf = super::spare_buffers::take(COPY_BUFFER);
    let result = pump_with(&mut from, &mut to, &mut buf, copied, one_done).await;
    super::spare_buffers::give_back(buf);
    result
}

async fn pump_with(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buf: &mut Vec<u8>,
    copied: &mut u64,
    one_done: &AtomicBool,
) -> io::Result<()> {
    loop {
        buf.clear();
        if from.read_buf(buf).await? == 0 {
            break;
        }
        let ended = short_read_then_end(from, buf);
        if matches!(ended, Ok(true)) && !one_done.swap(true, Ordering::Relaxed) {
            write_then_end(to, buf).await?;
            *copied += buf.len() as u64;
            return Ok(());
        }
        to.write_all(buf).await?;
        *copied += buf.len() as u64;
        if ended? {
            // The other direction ended first; closing both sockets next sends the FIN.
            return Ok(());
        }
        // A read that fills the buffer is a bulk transfer: the rest of this direction moves
        // inside the kernel. Without a pipe (out of descriptors) it goes on copying.
        #[cfg(target_os = "linux")]
        if buf.len() == buf.capacity()
            && let Ok(pipe) = super::splice::Pipe::new()
        {
            super::splice::copy(from.as_ref(), to.as_ref(), &pipe, copied).await?;
            break;
        }
    }
    if !one_done.swap(true, Ordering::Relaxed) {
        // The peer may be gone already; the other direction reports that if it matters.
        let _ = to.shutdown().await;
    }
    Ok(())
}

/// After a read that did not fill `buf`: whether the peer's end of stream is already here,
/// right behind what was read. The reader's readiness says when something (more data or the
/// end of stream) has arrived since; only then is the socket read again, into what is left
/// of `buf`, so that an end of stream can be passed on together with the data before it.
/// Otherwise the answer is `false` without a system call. A read error is returned after
/// the data is forwarded, as the next read would have returned it.
fn short_read_then_end(from: &ReadHalf<'_>, buf: &mut Vec<u8>) -> io::Result<bool> {
    if buf.len() == buf.capacity() {
        return Ok(false);
    }
    // Polled with a waker that does nothing: the next read registers the real one.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if from.as_ref().poll_read_ready(&mut cx).is_pending() {
        return Ok(false);
    }
    match from.try_read_buf(buf) {
        Ok(n) => Ok(n == 0),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes the last of a direction's data and passes its end of stream on. On Linux the FIN
/// rides on the last data segment (sent with `MSG_MORE`, which holds it until the shutdown
/// pushes both): one segment, and one wake-up of the receiver, instead of two each.
async fn write_then_end(to: &mut WriteHalf<'_>, data: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    send_all(to.as_ref(), data, libc::MSG_MORE).await?;
    #[cfg(not(target_os = "linux"))]
    to.write_all(data).await?;
    // The peer may be gone already; the other direction reports that if it matters.
    let _ = to.shutdown().await;
    Ok(())
}

/// Writes all of `data` with `send(2)` flags.
#[cfg(target_os = "linux")]
async fn send_all(to: &TcpStream, mut data: &[u8], flags: libc::c_int) -> io::Result<()> {
    while !data.is_empty() {
        let sent = to.try_io(Interest::WRITABLE, || {
            // SAFETY: a valid descriptor and a buffer of the length passed.
            let n = unsafe {
                libc::send(
                    to.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    flags | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn a_group_shares_one_port_and_every_socket_gets_connections_of_its_own() {
        let group = bind_group(any_port(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_eq!(group[1].local_addr().unwrap(), addr, "port 0 settles once");
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = [0; 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while accepted.iter().sum::<usize>() < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "accepted {accepted:?}"
            );
            for (socket, count) in group.iter().zip(&mut accepted) {
                while socket.accept().is_ok() {
                    *count += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Spread by the hash of each connection's addresses: 64 connections all on one
        // socket would take a 1 in 2^63 chance.
        assert!(accepted.iter().all(|&n| n > 0), "accepted {accepted:?}");
    }

    #[test]
    fn an_address_another_socket_listens_on_is_not_shared_even_if_it_allows_sharing() {
        let theirs = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        theirs.set_reuse_port(true).unwrap();
        theirs.bind(&any_port().into()).unwrap();
        theirs.listen(16).unwrap();
        let taken = theirs.local_addr().unwrap().as_socket().unwrap();
        let err = bind_group(taken, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let err = bind_group(taken, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
