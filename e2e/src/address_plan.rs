//! Where a testbed cluster lives on loopback.
//!
//! Every cluster takes a *slot* (1..=199) and derives all its addresses from it, so several
//! clusters (parallel tests, a demo) run side by side without port clashes, and nothing ever
//! leaves 127.0.0.0/8:
//!
//! | what                                | address                                  |
//! |-------------------------------------|------------------------------------------|
//! | control plane (etcd 2379/2380, kube-apiserver 6443) | `127.20.<slot>.250`          |
//! | node `k` (1-based) InternalIP       | `127.20.<slot>.<k>`                      |
//! | pod `m` on node `k`, as reported    | `10.244.<k>.<m>` (never dialed)          |
//! | pod `m` on node `k`, where it listens | `127.<30+k>.<slot>.<m>`                |
//! | local cloud API                     | `127.20.<slot>.251:8900`                 |
//! | local cloud address pool            | `127.22.<slot>.1` – `127.22.<slot>.254`  |
//! | operator metrics                    | `127.20.<slot>.252:8080`                 |
//! | clients in tests                    | `127.23.<slot>.<n>`                      |
//!
//! The API server rejects loopback pod IPs in Endpoints, hence the reported `10.244.0.0/16`
//! range; [`AddressPlan::pod_listen_address`] maps a reported pod IP to its real listener.

use std::net::{Ipv4Addr, SocketAddr};

/// Most nodes a cluster may have (pod listen addresses use `127.<30+k>`).
pub const MAX_NODES: u8 = 50;
/// Most pods per node at once.
pub const MAX_PODS_PER_NODE: u8 = 254;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddressPlan {
    pub slot: u8,
}

impl AddressPlan {
    pub fn new(slot: u8) -> Self {
        assert!((1..=199).contains(&slot), "slot {slot} outside 1..=199");
        AddressPlan { slot }
    }

    pub fn control_plane_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(127, 20, self.slot, 250)
    }

    pub fn apiserver(&self) -> SocketAddr {
        SocketAddr::from((self.control_plane_ip(), 6443))
    }

    pub fn etcd_client(&self) -> SocketAddr {
        SocketAddr::from((self.control_plane_ip(), 2379))
    }

    pub fn etcd_peer(&self) -> SocketAddr {
        SocketAddr::from((self.control_plane_ip(), 2380))
    }

    /// `k` is 1-based.
    pub fn node_ip(&self, k: u8) -> Ipv4Addr {
        assert!((1..=MAX_NODES).contains(&k));
        Ipv4Addr::new(127, 20, self.slot, k)
    }

    pub fn node_name(&self, k: u8) -> String {
        format!("node-{k}")
    }

    /// The pod IP reported to the API server for pod `m` on node `k`.
    pub fn pod_reported_ip(&self, k: u8, m: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, k, m)
    }

    /// Where a pod whose reported IP is `reported` really listens; `None` for addresses
    /// outside the pod range, which must never be dialed.
    pub fn pod_listen_address(&self, reported: Ipv4Addr) -> Option<Ipv4Addr> {
        let [a, b, k, m] = reported.octets();
        if a == 10
            && b == 244
            && (1..=MAX_NODES).contains(&k)
            && (1..=MAX_PODS_PER_NODE).contains(&m)
        {
            Some(Ipv4Addr::new(127, 30 + k, self.slot, m))
        } else {
            None
        }
    }

    pub fn local_cloud_api(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, 20, self.slot, 251), 8900))
    }

    pub fn operator_metrics(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(127, 20, self.slot, 252), 8080))
    }

    /// A source address for test client `n`, distinct per cluster so affinity and source-range
    /// tests can act as several clients.
    pub fn client_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 23, self.slot, n)
    }

    /// The first and last address of the local cloud's pool for this cluster.
    pub fn load_balancer_pool(&self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::new(127, 22, self.slot, 1),
            Ipv4Addr::new(127, 22, self.slot, 254),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_pod_ips_map_to_loopback_listeners_of_the_same_slot() {
        let plan = AddressPlan::new(7);
        let reported = plan.pod_reported_ip(2, 9);
        assert_eq!(reported, Ipv4Addr::new(10, 244, 2, 9));
        assert_eq!(
            plan.pod_listen_address(reported),
            Some(Ipv4Addr::new(127, 32, 7, 9))
        );
    }

    #[test]
    fn addresses_outside_the_pod_range_are_never_mapped() {
        let plan = AddressPlan::new(7);
        assert_eq!(plan.pod_listen_address(Ipv4Addr::new(10, 96, 0, 1)), None);
        assert_eq!(plan.pod_listen_address(Ipv4Addr::new(10, 244, 0, 1)), None);
        assert_eq!(plan.pod_listen_address(Ipv4Addr::new(10, 244, 1, 0)), None);
        assert_eq!(plan.pod_listen_address(Ipv4Addr::new(192, 168, 1, 1)), None);
    }

    #[test]
    fn everything_a_cluster_binds_is_on_loopback() {
        let plan = AddressPlan::new(199);
        assert!(plan.apiserver().ip().is_loopback());
        assert!(plan.node_ip(MAX_NODES).is_loopback());
        assert!(plan.local_cloud_api().ip().is_loopback());
        assert!(plan.load_balancer_pool().1.is_loopback());
        assert!(
            plan.pod_listen_address(plan.pod_reported_ip(MAX_NODES, 254))
                .unwrap()
                .is_loopback()
        );
    }
}
