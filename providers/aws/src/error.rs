//! ELBv2 errors as the reconciler's [`ProviderError`]: throttling and "still busy" become
//! retry-after (never a hot loop), quota becomes exhausted, a refused input becomes invalid.

use std::time::Duration;

use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};
use portico_provider::ProviderError;
use portico_provider::error::error_chain;

/// How long to wait when AWS throttles us or a resource is still changing.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The error code of a service error (`LoadBalancerNotFound`, `Throttling`, …).
pub fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Maps a failed call (`what` says which) onto the reconciler's error kinds.
pub fn from_sdk<E, R>(what: &str, e: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = match &e {
        SdkError::ServiceError(s) => format!(
            "{what}: {}: {}",
            s.err().code().unwrap_or("error"),
            s.err().message().unwrap_or("")
        ),
        other => format!("{what}: {}", error_chain(other)),
    };
    match code(&e) {
        Some(c) => from_code(c, message),
        None => ProviderError::Unavailable(message),
    }
}

/// The kind of error an ELBv2 code stands for.
pub fn from_code(code: &str, message: String) -> ProviderError {
    match code {
        // Busy, throttled, or another reconcile created the same name a moment ago (the next
        // pass finds it and checks its owner).
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "ResourceInUse"
        | "OperationNotPermitted"
        | "PriorityInUse"
        | "DuplicateLoadBalancerName"
        | "DuplicateTargetGroupName"
        | "DuplicateListener" => ProviderError::RetryAfter {
            after: RETRY_AFTER,
            reason: message,
        },
        c if c.starts_with("TooMany") => ProviderError::Exhausted(message),
        "ValidationError"
        | "InvalidConfigurationRequest"
        | "InvalidSubnet"
        | "SubnetNotFound"
        | "InvalidSecurityGroup"
        | "InvalidTarget"
        | "InvalidScheme"
        | "UnsupportedProtocol"
        | "IncompatibleProtocols"
        | "CertificateNotFound" => ProviderError::Invalid(message),
        _ => ProviderError::Unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_busy_resources_are_retried_later_not_hot() {
        for c in [
            "Throttling",
            "ResourceInUse",
            "PriorityInUse",
            "DuplicateLoadBalancerName",
        ] {
            let e = from_code(c, "x".into());
            assert_eq!(e.retry_after(), Some(RETRY_AFTER), "{c}");
        }
    }

    #[test]
    fn quota_is_exhaustion_and_refused_input_is_permanent() {
        assert!(matches!(
            from_code("TooManyLoadBalancers", "x".into()),
            ProviderError::Exhausted(_)
        ));
        assert!(from_code("SubnetNotFound", "x".into()).is_permanent());
        assert!(!from_code("InternalFailure", "x".into()).is_permanent());
    }
}
