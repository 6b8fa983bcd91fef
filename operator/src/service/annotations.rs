//! The Service annotations Portico reads, and their parsing.

use std::collections::BTreeMap;
use std::str::FromStr;

/// Legacy upstream spelling of `spec.loadBalancerSourceRanges`, honoured when the field is empty.
pub const SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// `"true"` sends a PROXY protocol v2 header to the nodes at the start of each connection.
pub const PROXY_PROTOCOL: &str = "lb.portico.dev/proxy-protocol";
pub const HEALTH_CHECK_INTERVAL: &str = "lb.portico.dev/health-check-interval-seconds";
pub const HEALTH_CHECK_TIMEOUT: &str = "lb.portico.dev/health-check-timeout-seconds";
pub const HEALTH_CHECK_HEALTHY_THRESHOLD: &str = "lb.portico.dev/health-check-healthy-threshold";
pub const HEALTH_CHECK_UNHEALTHY_THRESHOLD: &str =
    "lb.portico.dev/health-check-unhealthy-threshold";

/// Reads annotations, collecting every problem instead of stopping at the first, so the user
/// sees all of them in one event.
pub struct AnnotationReader<'a> {
    annotations: Option<&'a BTreeMap<String, String>>,
    pub problems: Vec<String>,
}

impl<'a> AnnotationReader<'a> {
    pub fn new(annotations: Option<&'a BTreeMap<String, String>>) -> Self {
        AnnotationReader {
            annotations,
            problems: Vec::new(),
        }
    }

    pub fn raw(&self, key: &str) -> Option<&'a str> {
        self.annotations?.get(key).map(String::as_str)
    }

    /// The parsed value, `None` when absent; a value that does not parse, or falls outside
    /// `range`, is recorded as a problem.
    pub fn parse<T>(&mut self, key: &str, range: std::ops::RangeInclusive<T>) -> Option<T>
    where
        T: FromStr + PartialOrd + std::fmt::Display,
    {
        let raw = self.raw(key)?;
        match raw.trim().parse::<T>() {
            Ok(v) if range.contains(&v) => Some(v),
            Ok(_) => {
                self.problems.push(format!(
                    "annotation {key}: {raw:?} is outside {}..={}",
                    range.start(),
                    range.end()
                ));
                None
            }
            Err(_) => {
                self.problems
                    .push(format!("annotation {key}: {raw:?} is not a valid value"));
                None
            }
        }
    }

    pub fn flag(&mut self, key: &str) -> Option<bool> {
        let raw = self.raw(key)?;
        match raw.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.problems.push(format!(
                    "annotation {key}: {raw:?} is not a valid value (want \"true\" or \"false\")"
                ));
                None
            }
        }
    }
}
