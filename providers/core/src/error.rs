//! The one error type every provider returns, shaped for the reconciler's retry decisions.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Not done yet, or throttled: ask again after `after`, without counting it as a failure.
    #[error("{reason} (retry in {after:?})")]
    RetryAfter { after: Duration, reason: String },
    /// The request cannot be served as it stands (an address the provider does not have, a
    /// protocol it does not support). Retrying the same input will fail the same way.
    #[error("invalid load balancer: {0}")]
    Invalid(String),
    /// The provider is out of something (addresses, quota). Retrying later may succeed once
    /// capacity frees up.
    #[error("out of capacity: {0}")]
    Exhausted(String),
    /// A resource with this name exists but carries another owner's tags; it is never adopted.
    #[error("load balancer {name} belongs to {owner}, not to us")]
    NotOwned { name: String, owner: String },
    /// The provider could not be reached or failed in a way worth retrying with backoff.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// An error with its sources, `outer: inner: innermost`: SDK and HTTP client errors keep the
/// useful part (connection refused, DNS, TLS) in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl ProviderError {
    /// The delay the provider asked for, if any; the reconciler uses it instead of its backoff.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }

    /// True when retrying without a change to the input cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ProviderError::Invalid(_) | ProviderError::NotOwned { .. }
        )
    }

    /// A short, stable label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::RetryAfter { .. } => "Provisioning",
            ProviderError::Invalid(_) => "InvalidLoadBalancer",
            ProviderError::Exhausted(_) => "CapacityExhausted",
            ProviderError::NotOwned { .. } => "NotOwned",
            ProviderError::Unavailable(_) => "ProviderUnavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_retry_after_carries_a_delay() {
        let e = ProviderError::RetryAfter {
            after: Duration::from_secs(7),
            reason: "provisioning".into(),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(!e.is_permanent());
        assert_eq!(ProviderError::Unavailable("x".into()).retry_after(), None);
    }

    #[test]
    fn invalid_input_and_foreign_resources_are_permanent() {
        assert!(ProviderError::Invalid("x".into()).is_permanent());
        assert!(
            ProviderError::NotOwned {
                name: "a".into(),
                owner: "b".into()
            }
            .is_permanent()
        );
        assert!(!ProviderError::Exhausted("pool".into()).is_permanent());
    }
}
