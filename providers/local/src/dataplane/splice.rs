//! Linux only: a bulk direction's bytes move socket → pipe → socket inside the kernel, by page
//! reference, instead of being copied into user space and back out.
//!
//! The L4 proxy switches a direction to this once a read fills its whole copy buffer (see
//! `tcp::pump`), the sign of a transfer larger than a request or an answer: small messages
//! stay on the plain copy, which needs no pipe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Asked of each splice from the source socket; the pipe takes what fits (64 KiB by default).
const CHUNK: usize = 1 << 20;

/// A non-blocking pipe, the kernel-side buffer between the two sockets.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// Moves what `from` sends to `to` until `from` ends (`Ok`) or either side fails, adding the
/// bytes delivered to `copied`.
///
/// The pipe is always empty when the source is read, so an `EAGAIN` there means the socket
/// has nothing (never a full pipe) and clearing the socket's read readiness is right.
/// A splice into a socket whose peer has gone raises `SIGPIPE`, which Rust programs ignore
/// from the start; the error comes back as `EPIPE`.
pub(super) async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    copied: &mut u64,
) -> io::Result<()> {
    loop {
        let filled = loop {
            let moved = from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            });
            match moved {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            return Ok(());
        }
        let mut left = filled;
        while left > 0 {
            let moved = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            });
            match moved {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        *copied += filled as u64;
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: two open descriptors and no offsets (neither end is a file).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected loopback sockets: (the one the test holds, the one the proxy holds).
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        (outer, inner)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_byte_arrives_in_order_and_the_end_of_stream_ends_the_copy() {
        let (mut sender, from) = connected_pair().await;
        let (mut receiver, to) = connected_pair().await;
        // 8 MiB that no two offsets share a pattern of: a misplaced page would show.
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
            sender.shutdown().await.unwrap();
        });
        // The proxy's sockets close when its task ends, which ends the receiver's stream.
        let proxy = tokio::spawn(async move {
            let pipe = Pipe::new().unwrap();
            let mut copied = 0;
            copy(&from, &to, &pipe, &mut copied).await.unwrap();
            copied
        });
        let mut received = Vec::new();
        receiver.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(proxy.await.unwrap(), data.len() as u64);
        assert_eq!(received.len(), data.len());
        assert!(
            received == data,
            "the bytes arrived changed or out of order"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_that_has_gone_fails_the_copy() {
        let (mut sender, from) = connected_pair().await;
        let (receiver, to) = connected_pair().await;
        drop(receiver);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 16];
            // Keeps sending until the proxy stops reading and closes.
            while sender.write_all(&chunk).await.is_ok() {}
        });
        let pipe = Pipe::new().unwrap();
        let mut copied = 0;
        let err = copy(&from, &to, &pipe, &mut copied).await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
        drop((from, to));
        writer.await.unwrap();
    }
}
