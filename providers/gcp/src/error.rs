//! Compute Engine errors as the reconciler's [`ProviderError`]: rate limits, "not ready" and
//! "in use" become retry-after (never a hot loop), quota becomes exhausted, a refused input
//! becomes invalid.

use std::time::Duration;

use google_cloud_compute_v1::model::operation;
use portico_provider::ProviderError;
use portico_provider::error::error_chain;

pub type GaxError = google_cloud_gax::error::Error;

/// How long to wait when Compute Engine throttles us or a resource is still changing.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// True for a 404: callers that read treat it as "absent".
pub fn is_not_found(e: &GaxError) -> bool {
    e.http_status_code() == Some(404)
}

/// Maps a failed call (`what` says which) onto the reconciler's error kinds.
pub fn from_gax(what: &str, e: GaxError) -> ProviderError {
    let payload = e
        .http_payload()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let message = format!("{what}: {}", error_chain(&e));
    classify(
        e.http_status_code(),
        &format!("{message} {payload}"),
        message,
    )
}

/// The kind of error an HTTP status and the reasons in `text` stand for.
pub fn classify(status: Option<u16>, text: &str, message: String) -> ProviderError {
    let has = |reason: &str| text.contains(reason);
    let retry = || ProviderError::RetryAfter {
        after: RETRY_AFTER,
        reason: message.clone(),
    };
    if has("quotaExceeded") || has("QUOTA_EXCEEDED") {
        return ProviderError::Exhausted(message);
    }
    if has("rateLimitExceeded")
        || has("resourceNotReady")
        || has("RESOURCE_NOT_READY")
        || has("resourceInUseByAnotherResource")
        || has("RESOURCE_IN_USE_BY_ANOTHER_RESOURCE")
    {
        return retry();
    }
    match status {
        // Exists already: another reconcile made it a moment ago; the next pass reads it.
        Some(409) | Some(429) => retry(),
        Some(400) | Some(412) => ProviderError::Invalid(message),
        _ => ProviderError::Unavailable(message),
    }
}

/// The error a finished operation reports, if any.
pub fn from_operation(what: &str, error: &operation::Error) -> ProviderError {
    let codes: Vec<String> = error
        .errors
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.code.as_deref().unwrap_or("ERROR"),
                e.message.as_deref().unwrap_or("")
            )
        })
        .collect();
    let message = format!("{what}: {}", codes.join("; "));
    let text = message.clone();
    let permanent = error.errors.iter().any(|e| {
        matches!(
            e.code.as_deref(),
            Some("INVALID_ARGUMENT" | "INVALID_FIELD_VALUE" | "RESOURCE_NOT_FOUND")
        )
    });
    match classify(None, &text, message.clone()) {
        ProviderError::Unavailable(_) if permanent => ProviderError::Invalid(message),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_conflicts_and_busy_resources_are_retried_later_not_hot() {
        for (status, text) in [
            (Some(403), "rateLimitExceeded"),
            (Some(409), "alreadyExists"),
            (Some(429), ""),
            (Some(400), "resourceInUseByAnotherResource"),
        ] {
            let e = classify(status, text, "x".into());
            assert_eq!(e.retry_after(), Some(RETRY_AFTER), "{status:?} {text}");
        }
    }

    #[test]
    fn quota_is_exhaustion_and_a_bad_request_is_permanent() {
        assert!(matches!(
            classify(Some(403), "quotaExceeded", "x".into()),
            ProviderError::Exhausted(_)
        ));
        assert!(classify(Some(400), "invalid", "x".into()).is_permanent());
        assert!(!classify(Some(503), "", "x".into()).is_permanent());
    }
}
