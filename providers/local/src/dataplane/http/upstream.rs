//! Connections to targets through hyper's client: keep-alive HTTP/1.1 connections pooled per
//! proxy worker for requests with a body (bodiless ones take [`super::direct`]), and fresh
//! connections for upgrades, which end up owned by a tunnel and must never return to a pool.
//!
//! The pool is the worker's own (thread-local): a connection is driven by a task on the
//! worker that opened it and only that worker's requests use it, so taking one and giving
//! it back costs no lock and wakes no other thread. A connection goes back when the
//! response body has ended cleanly ([`Pooled`], held by the response body); one that ended
//! any other way is dropped, which closes it.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::pool::{self, IdlePool, Reusable};

type Sender = http1::SendRequest<Incoming>;

impl Reusable for Sender {
    fn usable(&self) -> bool {
        !self.is_closed()
    }
}

thread_local! {
    static IDLE: RefCell<IdlePool<Sender>> = RefCell::new(IdlePool::default());
}

/// A connection lent to one exchange; [`Pooled::release`] gives it back.
pub struct Pooled {
    sender: Sender,
    target: SocketAddr,
}

impl Pooled {
    /// Back to the worker's pool: the exchange ended cleanly, so the connection may carry
    /// the next request once its driver has read the end of this one.
    pub fn release(self) {
        let Pooled { sender, target } = self;
        if sender.is_closed() {
            return;
        }
        pool::with(&IDLE, |idle| idle.put(target, sender));
    }
}

/// Forgets this worker's idle connections that expired or whose driver ended.
pub fn sweep_idle() {
    pool::with(&IDLE, IdlePool::sweep);
}

pub type SendError = pool::SendError<hyper::Error>;

/// Sends `request` to `target` on an idle connection of this worker's pool, or a new one
/// connected within `connect`. A request an idle connection could not take (the target
/// closed it meanwhile) comes back unsent and goes on the next connection.
pub async fn send(
    target: SocketAddr,
    connect: Duration,
    mut request: Request<Incoming>,
) -> Result<(Response<Incoming>, Pooled), SendError> {
    while let Some(mut sender) = pool::with(&IDLE, |idle| idle.take(target)).flatten() {
        // Ready at once unless its driver has not yet read the end of the previous exchange.
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, Pooled { sender, target })),
            Err(mut e) => match e.take_message() {
                Some(unsent) => request = unsent,
                None => return Err(SendError::Failed(e.into_error())),
            },
        }
    }
    let mut sender = dial(target, connect, false)
        .await
        .map_err(SendError::Connect)?;
    match sender.try_send_request(request).await {
        Ok(response) => Ok((response, Pooled { sender, target })),
        Err(e) => Err(SendError::Failed(e.into_error())),
    }
}

/// A fresh HTTP/1.1 connection to `target`; its driver runs on a task of the calling
/// worker and ends with the connection (or, `upgradable`, the tunnel taking it over).
async fn dial(target: SocketAddr, connect: Duration, upgradable: bool) -> io::Result<Sender> {
    let stream = tokio::time::timeout(connect, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    if upgradable {
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%target, error = %e, "upgrade connection to target failed");
            }
        });
    } else {
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%target, error = %e, "connection to target failed");
            }
        });
    }
    Ok(sender)
}

/// A fresh connection able to switch protocols, never pooled.
pub async fn dial_for_upgrade(target: SocketAddr, connect: Duration) -> io::Result<Sender> {
    dial(target, connect, true).await
}

/// Sends `request` on a connection from [`dial_for_upgrade`].
pub async fn send_upgrade(
    mut sender: Sender,
    request: Request<Incoming>,
) -> hyper::Result<Response<Incoming>> {
    sender.send_request(request).await
}
