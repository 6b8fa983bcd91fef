//! Socket helpers shared by the echo image and the kube-proxy stand-in.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

/// Transport protocol of a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    /// Kubernetes' protocol string (`None` means TCP); `None` for protocols we can't serve.
    pub(crate) fn from_k8s(protocol: Option<&str>) -> Option<L4> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(L4::Tcp),
            "UDP" => Some(L4::Udp),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "TCP",
            L4::Udp => "UDP",
        }
    }
}

impl std::fmt::Display for L4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TCP listener; synchronous so that callers learn about `AddrInUse` right away.
/// Must be called inside a tokio runtime.
pub(crate) fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted agent rebind while old connections sit in TIME_WAIT; it does not let
    // two listeners share a port on Linux.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A UDP socket bound to `addr`. Must be called inside a tokio runtime.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Connects to `destination` from `source` (any port), as kube-proxy's SNAT or its
/// client-IP-preserving `Local` mode would make the connection look.
pub(crate) async fn connect_from(
    source: IpAddr,
    destination: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let domain = if source.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if source.is_ipv4() {
        // Defer the choice of the source port to connect(), where the kernel only needs the
        // whole 4-tuple to be unique; otherwise every bind(ip:0) reserves a port for good and
        // busy proxies run out of ephemeral ports.
        set_ip_bind_address_no_port(&socket)?;
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.set_nonblocking(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(destination)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {destination} took longer than {timeout:?}"),
        )),
    }
}

fn set_ip_bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_can_come_from_any_loopback_address() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let target = listener.local_addr().unwrap();
        let source: IpAddr = "127.77.0.9".parse().unwrap();
        let (client, accepted) = tokio::join!(
            connect_from(source, target, Duration::from_secs(5)),
            listener.accept()
        );
        let client = client.unwrap();
        let (_, peer) = accepted.unwrap();
        assert_eq!(peer.ip(), source);
        assert_eq!(client.local_addr().unwrap().ip(), source);
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_as_address_in_use() {
        let first = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind_tcp(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let udp = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind_udp(udp.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
