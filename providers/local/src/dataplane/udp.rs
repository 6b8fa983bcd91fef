//! UDP listeners: datagrams are grouped into flows by client address; each flow has its own
//! upstream socket connected to the target chosen for it, and the target's replies go back
//! to the client from the listening socket (so they come from the load balancer's address).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::select::PoolSnapshot;
use super::{ActiveGuard, ListenerContext, Stats};

/// A flow with no datagram either way for this long is forgotten (longer with affinity).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Flows per listener; beyond it, datagrams from new clients are dropped.
const MAX_FLOWS: usize = 16 * 1024;
const SWEEP_PERIOD: Duration = Duration::from_secs(1);
const MAX_DATAGRAM: usize = 64 * 1024;
const RECV_BUFFER: usize = 4 * 1024 * 1024;

pub(super) fn bind(local: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, None)?;
    // Best effort: a bigger buffer rides out bursts while the task is busy.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    UdpSocket::from_std(socket.into())
}

struct Flow {
    upstream: Arc<UdpSocket>,
    target: SocketAddr,
    /// Milliseconds since the listener's epoch, written by both directions.
    last_active: Arc<AtomicU64>,
    replies: JoinHandle<()>,
    _active: ActiveGuard,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

pub(super) async fn serve(socket: UdpSocket, mut ctx: ListenerContext) {
    let socket = Arc::new(socket);
    let epoch = Instant::now();
    let mut pool = ctx.config.borrow_and_update().clone();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(SWEEP_PERIOD);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (stop, closed) = (ctx.stop.clone(), ctx.connections.clone());
    let (stopped, lb_closed) = (stop.cancelled(), closed.cancelled());
    tokio::pin!(stopped, lb_closed);
    loop {
        let (n, client) = tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = &mut lb_closed => break,
            _ = sweep.tick() => {
                ctx.current(&mut pool);
                expire(&mut flows, &ctx, &pool, epoch);
                continue;
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(lb = %ctx.lb, local = %ctx.local, error = %e, "receive failed");
                    continue;
                }
            },
        };
        ctx.current(&mut pool);
        if !pool.source_ranges.allows(client.ip()) {
            Stats::add(&ctx.stats.rejected_source, 1);
            continue;
        }
        let now = elapsed_ms(epoch);
        let flow = match flows.get(&client) {
            Some(flow) => flow,
            None => {
                if flows.len() >= MAX_FLOWS {
                    expire(&mut flows, &ctx, &pool, epoch);
                }
                if flows.len() >= MAX_FLOWS {
                    Stats::add(&ctx.stats.rejected_no_target, 1);
                    continue;
                }
                match open_flow(&ctx, &pool, &socket, client, epoch).await {
                    Some(flow) => flows.entry(client).or_insert(flow),
                    None => continue,
                }
            }
        };
        flow.last_active.store(now, Ordering::Relaxed);
        Stats::add(&ctx.stats.bytes_in, n as u64);
        if let Err(e) = flow.upstream.send(&buf[..n]).await {
            tracing::trace!(lb = %ctx.lb, target = %flow.target, error = %e, "send to target failed");
        }
    }
    // Reply tasks hold the listening socket; waiting for them frees the port before the
    // listener counts as stopped, so it can be bound again at once.
    for (_, mut flow) in flows.drain() {
        flow.replies.abort();
        let _ = (&mut flow.replies).await;
    }
}

async fn open_flow(
    ctx: &ListenerContext,
    pool: &PoolSnapshot,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    epoch: Instant,
) -> Option<Flow> {
    let client_ip = client.ip().to_canonical();
    let Some(i) = ctx.selector.pick(pool, client_ip, &[]) else {
        Stats::add(&ctx.stats.rejected_no_target, 1);
        tracing::debug!(lb = %ctx.lb, %client, "no usable target");
        return None;
    };
    let target = pool.backends[i].addr;
    let source = pool.preserve_client_ip.then_some(client_ip);
    let upstream = match connect(target, source).await {
        Ok(upstream) => Arc::new(upstream),
        Err(e) => {
            Stats::add(&ctx.stats.rejected_no_target, 1);
            tracing::debug!(lb = %ctx.lb, %client, %target, error = %e, "cannot open a flow");
            return None;
        }
    };
    Stats::add(&ctx.stats.accepted, 1);
    let last_active = Arc::new(AtomicU64::new(elapsed_ms(epoch)));
    let replies = tokio::spawn(relay_replies(
        upstream.clone(),
        listen.clone(),
        client,
        last_active.clone(),
        epoch,
        ctx.stats.clone(),
    ));
    Some(Flow {
        upstream,
        target,
        last_active,
        replies,
        _active: ActiveGuard::new(&ctx.stats),
    })
}

async fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<UdpSocket> {
    let unspecified = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let source = source
        .filter(|s| s.is_ipv4() == target.is_ipv4())
        .unwrap_or(unspecified);
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await?;
    socket.connect(target).await?;
    Ok(socket)
}

/// Forgets idle flows; their clients' affinity counts from their last datagram.
fn expire(
    flows: &mut HashMap<SocketAddr, Flow>,
    ctx: &ListenerContext,
    pool: &PoolSnapshot,
    epoch: Instant,
) {
    let idle = pool.affinity.map_or(IDLE_TIMEOUT, |a| a.max(IDLE_TIMEOUT));
    let now = elapsed_ms(epoch);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    flows.retain(|client, flow| {
        let last = flow.last_active.load(Ordering::Relaxed);
        let keep = now.saturating_sub(last) < idle_ms;
        if !keep {
            let last_seen = epoch + Duration::from_millis(last);
            ctx.selector
                .release_at(pool, client.ip().to_canonical(), flow.target, last_seen);
        }
        keep
    });
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    last_active: Arc<AtomicU64>,
    epoch: Instant,
    stats: Arc<Stats>,
) {
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        match relay_ready(&upstream, &listen, client) {
            Ok(Relayed::Sent(n)) => {
                last_active.store(elapsed_ms(epoch), Ordering::Relaxed);
                Stats::add(&stats.bytes_out, n as u64);
            }
            Ok(Relayed::Blocked(datagram)) => {
                last_active.store(elapsed_ms(epoch), Ordering::Relaxed);
                Stats::add(&stats.bytes_out, datagram.len() as u64);
                let _ = listen.send_to(&datagram, client).await;
            }
            Ok(Relayed::Nothing) => {}
            // A target that is not listening answers with ICMP port unreachable, reported on
            // the next receive; it may come up, so the flow stays.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(%client, error = %e, "receive from target failed");
                return;
            }
        }
    }
}

enum Relayed {
    Sent(usize),
    /// The listening socket's buffer was full: this copy is sent by waiting.
    Blocked(Vec<u8>),
    Nothing,
}

/// Moves one ready datagram without holding a buffer across an await, so an idle flow costs
/// no receive buffer of its own.
fn relay_ready(
    upstream: &UdpSocket,
    listen: &UdpSocket,
    client: SocketAddr,
) -> io::Result<Relayed> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = match upstream.try_recv(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Relayed::Nothing),
        Err(e) => return Err(e),
    };
    match listen.try_send_to(&buf[..n], client) {
        Ok(_) => Ok(Relayed::Sent(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Relayed::Blocked(buf[..n].to_vec())),
        Err(e) => {
            tracing::trace!(%client, error = %e, "reply to client failed");
            Ok(Relayed::Sent(n))
        }
    }
}

fn elapsed_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
