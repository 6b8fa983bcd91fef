//! The range of loopback addresses load balancers are given, and which of them are taken.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::Ipv4Net;

/// An inclusive range of IPv4 addresses inside 127.0.0.0/8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressPool {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolParseError {
    #[error("{0:?} is neither `first-last` nor a CIDR")]
    Syntax(String),
    /// Everything the local cloud serves stays on loopback; anything else could reach a real
    /// network.
    #[error("{0} is outside 127.0.0.0/8")]
    NotLoopback(Ipv4Addr),
    #[error("the pool's first address {first} comes after its last {last}")]
    Reversed { first: Ipv4Addr, last: Ipv4Addr },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("{address} is outside the address pool {pool}")]
    OutsidePool { address: IpAddr, pool: AddressPool },
    #[error("{0} is already taken by another load balancer")]
    Taken(IpAddr),
    #[error("every address of the pool {0} is taken")]
    Exhausted(AddressPool),
    /// A part of the pool was asked for (a ProviderConfig's `addressPool`) that the cloud's
    /// pool does not hold.
    #[error("the address range {range} is not inside the cloud's pool {pool}")]
    NotWithin {
        range: AddressPool,
        pool: AddressPool,
    },
}

impl AddressPool {
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Result<Self, PoolParseError> {
        for a in [first, last] {
            if a.octets()[0] != 127 {
                return Err(PoolParseError::NotLoopback(a));
            }
        }
        if first > last {
            return Err(PoolParseError::Reversed { first, last });
        }
        Ok(AddressPool { first, last })
    }

    pub fn first(&self) -> Ipv4Addr {
        self.first
    }

    pub fn last(&self) -> Ipv4Addr {
        self.last
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(a) => self.first <= a && a <= self.last,
            IpAddr::V6(_) => false,
        }
    }

    /// Whether every address of `other` is in this pool.
    pub fn covers(&self, other: &AddressPool) -> bool {
        self.first <= other.first && other.last <= self.last
    }

    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Default for AddressPool {
    fn default() -> Self {
        AddressPool {
            first: Ipv4Addr::new(127, 240, 0, 1),
            last: Ipv4Addr::new(127, 240, 0, 254),
        }
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for AddressPool {
    type Err = PoolParseError;

    /// `first-last`, a single address, or a CIDR whose usable hosts form the pool (network and
    /// broadcast addresses excluded, as a cloud's subnet would).
    fn from_str(s: &str) -> Result<Self, PoolParseError> {
        let syntax = || PoolParseError::Syntax(s.to_string());
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let first = a.trim().parse().map_err(|_| syntax())?;
            let last = b.trim().parse().map_err(|_| syntax())?;
            return AddressPool::new(first, last);
        }
        if s.contains('/') {
            let net: Ipv4Net = s.parse().map_err(|_| syntax())?;
            let (network, broadcast) = (u32::from(net.network()), u32::from(net.broadcast()));
            let (first, last) = if net.prefix_len() >= 31 {
                (network, broadcast)
            } else {
                (network + 1, broadcast - 1)
            };
            return AddressPool::new(first.into(), last.into());
        }
        let single: Ipv4Addr = s.parse().map_err(|_| syntax())?;
        AddressPool::new(single, single)
    }
}

/// The pool and the addresses of it (or, after a pool change, outside it) that are in use.
#[derive(Debug)]
pub struct Allocator {
    pool: AddressPool,
    taken: BTreeSet<Ipv4Addr>,
}

impl Allocator {
    pub fn new(pool: AddressPool) -> Self {
        Allocator {
            pool,
            taken: BTreeSet::new(),
        }
    }

    pub fn pool(&self) -> AddressPool {
        self.pool
    }

    /// Takes `requested` when given (it must be in the pool and free), otherwise the lowest
    /// free address, so allocation is deterministic and addresses are reused after deletes.
    pub fn allocate(&mut self, requested: Option<IpAddr>) -> Result<Ipv4Addr, PoolError> {
        self.allocate_within(requested, None)
    }

    /// As [`Self::allocate`], from `within` (a part of the pool set aside for one user of the
    /// cloud) instead of the whole pool.
    pub fn allocate_within(
        &mut self,
        requested: Option<IpAddr>,
        within: Option<AddressPool>,
    ) -> Result<Ipv4Addr, PoolError> {
        let range = within.unwrap_or(self.pool);
        if !self.pool.covers(&range) {
            return Err(PoolError::NotWithin {
                range,
                pool: self.pool,
            });
        }
        let address = match requested {
            Some(address) => {
                let IpAddr::V4(a) = address else {
                    return Err(PoolError::OutsidePool {
                        address,
                        pool: range,
                    });
                };
                if !range.contains(address) {
                    return Err(PoolError::OutsidePool {
                        address,
                        pool: range,
                    });
                }
                if self.taken.contains(&a) {
                    return Err(PoolError::Taken(address));
                }
                a
            }
            None => self.lowest_free(range)?,
        };
        self.taken.insert(address);
        Ok(address)
    }

    /// Marks an address restored from the state file as used. Unlike [`Self::allocate`] it
    /// accepts addresses outside the pool, since a load balancer keeps its address across a
    /// change of `--pool`; only a second claim of one address fails.
    pub fn claim(&mut self, address: Ipv4Addr) -> Result<(), PoolError> {
        if self.taken.insert(address) {
            Ok(())
        } else {
            Err(PoolError::Taken(address.into()))
        }
    }

    pub fn release(&mut self, address: Ipv4Addr) {
        self.taken.remove(&address);
    }

    pub fn is_taken(&self, address: Ipv4Addr) -> bool {
        self.taken.contains(&address)
    }

    /// Walks the gaps between taken addresses rather than the whole pool, so a large, mostly
    /// free pool costs as little as a small one.
    fn lowest_free(&self, range: AddressPool) -> Result<Ipv4Addr, PoolError> {
        let (first, last) = (u32::from(range.first), u32::from(range.last));
        let mut candidate = first;
        for taken in self.taken.range(range.first..=range.last) {
            let taken = u32::from(*taken);
            if candidate < taken {
                break;
            }
            if taken == last {
                return Err(PoolError::Exhausted(range));
            }
            candidate = taken + 1;
        }
        Ok(candidate.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn small_pool() -> Allocator {
        Allocator::new("127.90.0.1-127.90.0.3".parse().unwrap())
    }

    #[test]
    fn a_part_of_the_pool_hands_out_only_its_own_addresses() {
        let mut allocator = Allocator::new("127.90.0.1-127.90.0.10".parse().unwrap());
        let part: AddressPool = "127.90.0.5-127.90.0.6".parse().unwrap();
        assert_eq!(
            allocator.allocate_within(None, Some(part)),
            Ok(ip("127.90.0.5"))
        );
        assert_eq!(
            allocator.allocate_within(None, Some(part)),
            Ok(ip("127.90.0.6"))
        );
        assert_eq!(
            allocator.allocate_within(None, Some(part)),
            Err(PoolError::Exhausted(part))
        );
        // The rest of the pool is still there for everyone else.
        assert_eq!(allocator.allocate(None), Ok(ip("127.90.0.1")));
        assert_eq!(
            allocator.allocate_within(Some(ip("127.90.0.2").into()), Some(part)),
            Err(PoolError::OutsidePool {
                address: ip("127.90.0.2").into(),
                pool: part
            })
        );
        let beyond: AddressPool = "127.90.0.9-127.90.0.20".parse().unwrap();
        assert!(matches!(
            allocator.allocate_within(None, Some(beyond)),
            Err(PoolError::NotWithin { .. })
        ));
    }

    #[test]
    fn pools_parse_from_ranges_cidrs_and_single_addresses() {
        let range: AddressPool = "127.240.0.1-127.240.0.254".parse().unwrap();
        assert_eq!(
            (range.first(), range.last()),
            (ip("127.240.0.1"), ip("127.240.0.254"))
        );
        assert_eq!(range.len(), 254);
        assert_eq!(AddressPool::default(), range);

        let cidr: AddressPool = "127.90.1.0/24".parse().unwrap();
        assert_eq!(
            (cidr.first(), cidr.last()),
            (ip("127.90.1.1"), ip("127.90.1.254"))
        );
        let tiny: AddressPool = "127.90.1.8/31".parse().unwrap();
        assert_eq!(
            (tiny.first(), tiny.last()),
            (ip("127.90.1.8"), ip("127.90.1.9"))
        );

        let single: AddressPool = "127.90.1.7".parse().unwrap();
        assert_eq!(single.len(), 1);
    }

    #[test]
    fn pools_outside_loopback_or_reversed_are_rejected() {
        assert_eq!(
            "10.0.0.1-10.0.0.9".parse::<AddressPool>(),
            Err(PoolParseError::NotLoopback(ip("10.0.0.1")))
        );
        assert!(matches!(
            "192.168.0.0/24".parse::<AddressPool>(),
            Err(PoolParseError::NotLoopback(_))
        ));
        assert!(matches!(
            "127.0.0.9-127.0.0.1".parse::<AddressPool>(),
            Err(PoolParseError::Reversed { .. })
        ));
        assert!(matches!(
            "nonsense".parse::<AddressPool>(),
            Err(PoolParseError::Syntax(_))
        ));
    }

    #[test]
    fn allocation_takes_the_lowest_free_address_and_reuses_freed_ones() {
        let mut pool = small_pool();
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.1")));
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.2")));
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.3")));
        pool.release(ip("127.90.0.2"));
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.2")));
    }

    #[test]
    fn a_requested_address_must_be_in_the_pool_and_free() {
        let mut pool = small_pool();
        assert_eq!(
            pool.allocate(Some("127.90.0.2".parse().unwrap())),
            Ok(ip("127.90.0.2"))
        );
        assert_eq!(
            pool.allocate(Some("127.90.0.2".parse().unwrap())),
            Err(PoolError::Taken("127.90.0.2".parse().unwrap()))
        );
        assert!(matches!(
            pool.allocate(Some("127.90.0.9".parse().unwrap())),
            Err(PoolError::OutsidePool { .. })
        ));
        assert!(matches!(
            pool.allocate(Some("::1".parse().unwrap())),
            Err(PoolError::OutsidePool { .. })
        ));
        // The lowest free address skips the requested one.
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.1")));
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.3")));
    }

    #[test]
    fn a_full_pool_is_exhausted_until_an_address_is_freed() {
        let mut pool = small_pool();
        for _ in 0..3 {
            pool.allocate(None).unwrap();
        }
        assert!(matches!(pool.allocate(None), Err(PoolError::Exhausted(_))));
        pool.release(ip("127.90.0.3"));
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.3")));
    }

    #[test]
    fn restored_addresses_are_claimed_once_even_outside_the_pool() {
        let mut pool = small_pool();
        assert_eq!(pool.claim(ip("127.90.0.1")), Ok(()));
        assert_eq!(pool.claim(ip("127.91.0.1")), Ok(()));
        assert!(pool.claim(ip("127.90.0.1")).is_err());
        assert_eq!(pool.allocate(None), Ok(ip("127.90.0.2")));
    }
}
