//! The PROXY protocol version 2 header (haproxy's `proxy-protocol.txt`, section 2.2) that
//! tells a target who the client is when the connection itself comes from the proxy.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 in the high nibble, PROXY command in the low one.
const VERSION_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
const MAX_LEN: usize = 16 + 36;

/// An encoded header, on the stack: it is built for every proxied connection.
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; MAX_LEN],
    len: usize,
}

impl Header {
    /// The header for a TCP connection from `client` to the listener at `listener`. Mixed
    /// families are sent as TCP6 with the IPv4 side mapped.
    pub fn tcp(client: SocketAddr, listener: SocketAddr) -> Header {
        let mut buf = [0u8; MAX_LEN];
        buf[..12].copy_from_slice(&SIGNATURE);
        buf[12] = VERSION_PROXY;
        let len = match (client.ip(), listener.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                buf[13] = TCP4;
                buf[14..16].copy_from_slice(&12u16.to_be_bytes());
                buf[16..20].copy_from_slice(&src.octets());
                buf[20..24].copy_from_slice(&dst.octets());
                buf[24..26].copy_from_slice(&client.port().to_be_bytes());
                buf[26..28].copy_from_slice(&listener.port().to_be_bytes());
                28
            }
            (src, dst) => {
                buf[13] = TCP6;
                buf[14..16].copy_from_slice(&36u16.to_be_bytes());
                buf[16..32].copy_from_slice(&as_v6(src).octets());
                buf[32..48].copy_from_slice(&as_v6(dst).octets());
                buf[48..50].copy_from_slice(&client.port().to_be_bytes());
                buf[50..52].copy_from_slice(&listener.port().to_be_bytes());
                52
            }
        };
        Header { buf, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp4_header_matches_the_spec_byte_for_byte() {
        let header = Header::tcp(
            "127.90.5.9:40000".parse().unwrap(),
            "127.90.5.1:8080".parse().unwrap(),
        );
        let expected: Vec<u8> = [
            &b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"[..],
            &[0x21, 0x11, 0x00, 0x0C],
            &[127, 90, 5, 9],
            &[127, 90, 5, 1],
            &40000u16.to_be_bytes(),
            &8080u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(header.as_bytes(), expected.as_slice());
        assert_eq!(header.as_bytes().len(), 16 + 12);
    }

    #[test]
    fn tcp6_header_carries_sixteen_byte_addresses() {
        let header = Header::tcp("[::1]:5000".parse().unwrap(), "[::2]:443".parse().unwrap());
        let bytes = header.as_bytes();
        assert_eq!(bytes.len(), 16 + 36);
        assert_eq!(&bytes[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(&bytes[16..32], &"::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&bytes[32..48], &"::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&bytes[48..52], &[0x13, 0x88, 0x01, 0xBB]);
    }

    #[test]
    fn mixed_families_are_sent_as_mapped_tcp6() {
        let header = Header::tcp("127.90.5.9:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        let bytes = header.as_bytes();
        assert_eq!(bytes[13], 0x21);
        assert_eq!(
            &bytes[16..32],
            &"::ffff:127.90.5.9".parse::<Ipv6Addr>().unwrap().octets()
        );
    }
}
