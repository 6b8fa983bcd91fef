//! Waiting for Compute Engine operations, bounded: every mutation returns an operation that
//! finishes later; it is polled with a growing pause up to a deadline, and one still running
//! then is "retry later", not an error and not an unbounded wait.

use std::future::Future;
use std::time::Duration;

use google_cloud_compute_v1::model::Operation;
use google_cloud_compute_v1::model::operation::Status;
use portico_provider::ProviderError;

use crate::error::{GaxError, RETRY_AFTER, from_gax, from_operation};

/// How long one reconcile waits for an operation before handing it to the next one.
pub const WAIT: Duration = Duration::from_secs(60);

/// Waits up to `bound` for `started` (the answer to a mutation described by `what`) to
/// finish, asking `poll` for its state by name.
pub async fn wait<P, F>(
    what: &str,
    bound: Duration,
    started: Result<Operation, GaxError>,
    poll: P,
) -> Result<(), ProviderError>
where
    P: Fn(String) -> F,
    F: Future<Output = Result<Operation, GaxError>>,
{
    let mut op = started.map_err(|e| from_gax(what, e))?;
    let deadline = tokio::time::Instant::now() + bound;
    let mut pause = Duration::from_millis(100);
    loop {
        if op.status == Some(Status::Done) {
            return match &op.error {
                Some(error) if !error.errors.is_empty() => Err(from_operation(what, error)),
                _ => Ok(()),
            };
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(ProviderError::RetryAfter {
                after: RETRY_AFTER,
                reason: format!("{what}: the operation is still running"),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
        let name = op.name.clone().unwrap_or_default();
        op = poll(name).await.map_err(|e| from_gax(what, e))?;
    }
}
