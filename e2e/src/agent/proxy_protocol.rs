//! PROXY protocol v2 headers, as a load balancer prepends them to a proxied TCP connection.
//!
//! Only what the echo image needs: recognise the header, take the TCP4/TCP6 addresses out of
//! it and tell how long it is so it can be stripped. TLVs are skipped.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a header: signature, version/command, family/transport, length.
const FIXED_LEN: usize = 16;

/// The addresses a PROXY header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyAddresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes can't start a v2 header.
    NotProxy,
    /// They might: at least `needed` bytes in all are required to tell.
    Incomplete { needed: usize },
    /// A whole header of `length` bytes. `addresses` is `None` for a LOCAL command (health
    /// checks) and for families other than TCP over IPv4/IPv6.
    Header {
        length: usize,
        addresses: Option<ProxyAddresses>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("PROXY protocol version {0} is not supported (only 2)")]
    Version(u8),
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    #[error("PROXY header of {length} bytes is too short for its address family {family:#04x}")]
    Truncated { family: u8, length: usize },
}

/// Parses the start of a connection.
pub fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Ok(Parsed::NotProxy);
    }
    if buf.len() < FIXED_LEN {
        return Ok(Parsed::Incomplete { needed: FIXED_LEN });
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ProxyHeaderError::Version(version));
    }
    let family = buf[13];
    let length = FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < length {
        return Ok(Parsed::Incomplete { needed: length });
    }
    let body = &buf[FIXED_LEN..length];
    let addresses = match command {
        0x0 => None,
        0x1 => match family {
            // TCP over IPv4: 4 + 4 address bytes, 2 + 2 port bytes.
            0x11 => {
                let b = body.get(..12).ok_or(ProxyHeaderError::Truncated {
                    family,
                    length: body.len(),
                })?;
                let ip = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                Some(ProxyAddresses {
                    source: SocketAddr::from((ip(0), port(8))),
                    destination: SocketAddr::from((ip(4), port(10))),
                })
            }
            // TCP over IPv6: 16 + 16 address bytes, 2 + 2 port bytes.
            0x21 => {
                let b = body.get(..36).ok_or(ProxyHeaderError::Truncated {
                    family,
                    length: body.len(),
                })?;
                let ip = |i: usize| {
                    Ipv6Addr::from(<[u8; 16]>::try_from(&b[i..i + 16]).expect("16 bytes"))
                };
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                Some(ProxyAddresses {
                    source: SocketAddr::from((ip(0), port(32))),
                    destination: SocketAddr::from((ip(16), port(34))),
                })
            }
            _ => None,
        },
        other => return Err(ProxyHeaderError::Command(other)),
    };
    Ok(Parsed::Header { length, addresses })
}

/// A PROXY v2 header for a TCP connection from `source` to `destination` (both of one family),
/// as a load balancer would send it.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => panic!("PROXY header addresses must share a family: {source} -> {destination}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_tcp4_header_yields_both_addresses_and_its_length() {
        let mut bytes = encode_v2(addr("203.0.113.7:51000"), addr("127.22.1.5:80"));
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse_v2(&bytes),
            Ok(Parsed::Header {
                length: 28,
                addresses: Some(ProxyAddresses {
                    source: addr("203.0.113.7:51000"),
                    destination: addr("127.22.1.5:80"),
                }),
            })
        );
    }

    #[test]
    fn a_tcp6_header_yields_both_addresses() {
        let bytes = encode_v2(addr("[2001:db8::1]:4000"), addr("[::1]:443"));
        assert_eq!(
            parse_v2(&bytes),
            Ok(Parsed::Header {
                length: 52,
                addresses: Some(ProxyAddresses {
                    source: addr("[2001:db8::1]:4000"),
                    destination: addr("[::1]:443"),
                }),
            })
        );
    }

    #[test]
    fn ordinary_traffic_is_not_a_proxy_header() {
        assert_eq!(parse_v2(b"GET / HTTP/1.1\r\n"), Ok(Parsed::NotProxy));
        assert_eq!(parse_v2(b"\r\n\r\nhello"), Ok(Parsed::NotProxy));
    }

    #[test]
    fn a_partial_header_asks_for_more_bytes() {
        let bytes = encode_v2(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        assert_eq!(parse_v2(&[]), Ok(Parsed::Incomplete { needed: 16 }));
        assert_eq!(parse_v2(&bytes[..5]), Ok(Parsed::Incomplete { needed: 16 }));
        assert_eq!(
            parse_v2(&bytes[..20]),
            Ok(Parsed::Incomplete { needed: 28 })
        );
    }

    #[test]
    fn local_commands_and_other_families_carry_no_addresses_but_are_stripped() {
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(
            parse_v2(&local),
            Ok(Parsed::Header {
                length: 19,
                addresses: None
            })
        );
        let mut unix = SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0x00]);
        assert_eq!(
            parse_v2(&unix),
            Ok(Parsed::Header {
                length: 16,
                addresses: None
            })
        );
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let mut bytes = encode_v2(addr("192.0.2.1:1000"), addr("192.0.2.2:2000"));
        bytes[15] = 12 + 4; // address block plus a 4-byte TLV
        bytes.extend_from_slice(&[0x04, 0x00, 0x01, 0xff, b'x']);
        let Ok(Parsed::Header { length, addresses }) = parse_v2(&bytes) else {
            panic!("expected a header");
        };
        assert_eq!(length, 32);
        assert_eq!(addresses.unwrap().source, addr("192.0.2.1:1000"));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let mut v1 = SIGNATURE.to_vec();
        v1.extend_from_slice(&[0x11, 0x11, 0x00, 0x00]);
        assert_eq!(parse_v2(&v1), Err(ProxyHeaderError::Version(1)));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(
            parse_v2(&short),
            Err(ProxyHeaderError::Truncated {
                family: 0x11,
                length: 4
            })
        );
        let mut bad_command = SIGNATURE.to_vec();
        bad_command.extend_from_slice(&[0x2f, 0x11, 0x00, 0x00]);
        assert_eq!(parse_v2(&bad_command), Err(ProxyHeaderError::Command(0xf)));
    }
}
