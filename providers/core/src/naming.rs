//! Load balancer names that every cloud accepts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name AWS accepts for a load balancer or target group; GCP allows 63, so 32 fits both.
pub const MAX_NAME_LEN: usize = 32;

/// A cloud-safe load balancer name: lower-case letters and digits, starting with a letter, at
/// most [`MAX_NAME_LEN`] characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LoadBalancerName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid load balancer name {0:?}: 1-32 lower-case letters, digits or '-', starting with a letter"
)]
pub struct InvalidName(pub String);

impl LoadBalancerName {
    /// The upstream service controller's default (`DefaultLoadBalancerName`): `a` + the object's
    /// UID without dashes, cut to 32 characters. Deterministic, so a reconcile interrupted after
    /// creating the load balancer finds it again instead of creating a second one.
    pub fn for_object_uid(uid: &str) -> Self {
        let mut name = String::with_capacity(MAX_NAME_LEN);
        name.push('a');
        name.extend(
            uid.chars()
                .filter(|c| *c != '-')
                .map(|c| c.to_ascii_lowercase())
                .filter(|c| c.is_ascii_alphanumeric()),
        );
        name.truncate(MAX_NAME_LEN);
        LoadBalancerName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LoadBalancerName {
    type Error = InvalidName;

    fn try_from(s: String) -> Result<Self, InvalidName> {
        let valid = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(LoadBalancerName(s))
        } else {
            Err(InvalidName(s))
        }
    }
}

impl std::str::FromStr for LoadBalancerName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, InvalidName> {
        LoadBalancerName::try_from(s.to_string())
    }
}

impl From<LoadBalancerName> for String {
    fn from(n: LoadBalancerName) -> String {
        n.0
    }
}

impl fmt::Display for LoadBalancerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a over `bytes`: a hash that stays the same across Rust releases (the std hasher
/// does not promise to), for names and fingerprints that must be found again.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Seven hex digits of [`stable_hash`]: a name suffix that stays with `text`.
pub fn short_hash(text: &str) -> String {
    format!("{:07x}", stable_hash(text.bytes()) & 0x0fff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hashes_are_seven_hex_digits_stable_per_text() {
        assert_eq!(short_hash("shop-80"), short_hash("shop-80"));
        assert_ne!(short_hash("shop-80"), short_hash("shop-81"));
        assert_eq!(short_hash("").len(), 7);
    }

    #[test]
    fn name_from_uid_matches_the_upstream_default() {
        let name = LoadBalancerName::for_object_uid("4A1C6F0E-8d8e-4f59-9b55-1b2f2a7c9d10");
        assert_eq!(name.as_str(), "a4a1c6f0e8d8e4f599b551b2f2a7c9d1");
        assert_eq!(name.as_str().len(), MAX_NAME_LEN);
    }

    #[test]
    fn names_are_validated_when_parsed() {
        assert!("web-1".parse::<LoadBalancerName>().is_ok());
        assert!("1web".parse::<LoadBalancerName>().is_err());
        assert!("Web".parse::<LoadBalancerName>().is_err());
        assert!("".parse::<LoadBalancerName>().is_err());
        assert!("a".repeat(33).parse::<LoadBalancerName>().is_err());
        assert!(serde_json::from_str::<LoadBalancerName>("\"UPPER\"").is_err());
    }
}
