//! Kubernetes events, written in the background through one queue, a few at a time.
//!
//! Recording never blocks a reconcile (as with client-go's broadcaster), and a burst of
//! reconciles (a hundred Services created at once) does not put hundreds of event writes on
//! the API server at the same moment as the creates, finalizers and status writes that
//! users wait on: measured on the test cluster, concurrent event writes doubled how long the
//! API server took to accept the creates. A full queue drops the event with a warning.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

/// Event writes in flight at once.
const IN_FLIGHT: usize = 2;
/// Event writes allowed at once after a quiet spell, then [`RATE`] per second: a burst's
/// events trail behind its creates instead of competing with them.
const BURST: f64 = 10.0;
const RATE: f64 = 10.0;
/// Events waiting beyond this are dropped.
const QUEUE: usize = 4096;

/// A token bucket: [`BURST`] tokens, refilled at [`RATE`] per second.
struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            tokens: BURST,
            at: tokio::time::Instant::now(),
        }
    }

    /// How long to wait before the next write, taking its token.
    fn take(&mut self) -> std::time::Duration {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens + (now - self.at).as_secs_f64() * RATE).min(BURST);
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / RATE)
        }
    }
}

struct Job {
    event: Event,
    reference: ObjectReference,
    /// `namespace/name`, for logs.
    object: String,
}

/// Where controllers send their events; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<Job>,
}

impl EventSink {
    /// Starts the writer on the current runtime; it ends when every sink is dropped.
    pub fn new(recorder: Recorder) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(recorder, jobs));
        EventSink { queue }
    }

    /// Queues `event` about the object `reference` names.
    pub fn publish(&self, event: Event, reference: ObjectReference, object: String) {
        let job = Job {
            event,
            reference,
            object,
        };
        if let Err(e) = self.queue.try_send(job) {
            let job = e.into_inner();
            tracing::warn!(object = %job.object, reason = %job.event.reason, "event queue full: event dropped");
        }
    }
}

async fn write_all(recorder: Recorder, jobs: mpsc::Receiver<Job>) {
    use futures::StreamExt;
    let jobs =
        futures::stream::unfold((jobs, Bucket::new()), |(mut jobs, mut bucket)| async move {
            let job = jobs.recv().await?;
            tokio::time::sleep(bucket.take()).await;
            Some((job, (jobs, bucket)))
        });
    jobs.for_each_concurrent(IN_FLIGHT, |job| {
        let recorder = &recorder;
        async move {
            let written = tokio::time::timeout(
                crate::error::API_TIMEOUT,
                recorder.publish(&job.event, &job.reference),
            )
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(object = %job.object, reason = %job.event.reason, error = %e, "could not record event")
                }
                Err(_) => {
                    tracing::warn!(object = %job.object, reason = %job.event.reason, "recording an event timed out")
                }
            }
        }
    })
    .await;
}
