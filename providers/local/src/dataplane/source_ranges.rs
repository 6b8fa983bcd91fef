//! Which clients may connect (`loadBalancerSourceRanges`).

use std::net::IpAddr;

use ipnet::IpNet;

/// The networks a listener admits; empty admits everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRanges(Vec<IpNet>);

impl SourceRanges {
    pub fn new(ranges: &[IpNet]) -> Self {
        SourceRanges(ranges.iter().map(IpNet::trunc).collect())
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        if self.0.is_empty() {
            return true;
        }
        // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; ranges are written
        // in its v4 form.
        let client = client.to_canonical();
        self.0.iter().any(|net| net.contains(&client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[&str]) -> SourceRanges {
        let nets: Vec<IpNet> = list.iter().map(|s| s.parse().unwrap()).collect();
        SourceRanges::new(&nets)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_ranges_admit_everyone() {
        assert!(ranges(&[]).allows(ip("127.90.0.1")));
        assert!(ranges(&[]).allows(ip("::1")));
    }

    #[test]
    fn a_client_is_admitted_only_inside_a_range() {
        let r = ranges(&["127.90.1.0/24", "127.91.0.7/32"]);
        assert!(r.allows(ip("127.90.1.200")));
        assert!(r.allows(ip("127.91.0.7")));
        assert!(!r.allows(ip("127.90.2.1")));
        assert!(!r.allows(ip("127.91.0.8")));
        assert!(!r.allows(ip("::1")));
    }

    #[test]
    fn mapped_v4_clients_match_v4_ranges() {
        let r = ranges(&["127.90.1.0/24"]);
        assert!(r.allows(ip("::ffff:127.90.1.5")));
        assert!(!r.allows(ip("::ffff:127.90.9.5")));
    }

    #[test]
    fn ranges_with_host_bits_set_still_match_their_network() {
        let r = ranges(&["127.90.1.77/24"]);
        assert!(r.allows(ip("127.90.1.3")));
    }
}
