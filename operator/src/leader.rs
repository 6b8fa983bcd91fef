//! Leader election on a `coordination.k8s.io/v1` Lease, so only one replica writes at a time.
//!
//! kube-rs has none built in. The protocol is client-go's: the holder renews `renewTime` well
//! within `leaseDurationSeconds`; anyone may take a lease whose holder is empty or has not
//! renewed for a whole duration; every write carries the `resourceVersion` it read, so two
//! candidates can never both win.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::error::{Error, Result, kube_call};

#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    retry: Duration,
}

/// What the lease says, reduced to what the decision needs.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseView<'a> {
    Missing,
    HeldBy { holder: &'a str, fresh: bool },
    Free,
}

/// Whether `identity` may write the lease now (pure, for tests).
pub fn may_take(view: &LeaseView<'_>, identity: &str) -> bool {
    match view {
        LeaseView::Missing | LeaseView::Free => true,
        LeaseView::HeldBy { holder, fresh } => *holder == identity || !fresh,
    }
}

pub fn view<'a>(lease: &'a Lease, now: Timestamp) -> LeaseView<'a> {
    let Some(spec) = lease.spec.as_ref() else {
        return LeaseView::Free;
    };
    match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        None => LeaseView::Free,
        Some(holder) => {
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
            let fresh = spec
                .renew_time
                .as_ref()
                .is_some_and(|r| r.0 + jiff::SignedDuration::from_secs(secs) > now);
            LeaseView::HeldBy { holder, fresh }
        }
    }
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            retry: duration / 3,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this instance holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// Renews the lease until a renewal has not succeeded for a whole lease duration (or
    /// someone else holds it), then returns: the caller must stop acting as leader at once.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("another instance took the leader lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
            // Stop before the lease can expire in others' eyes, so two leaders never overlap.
            if last_renewal.elapsed() + self.retry >= self.duration {
                tracing::error!("could not renew the leader lease in time");
                return;
            }
        }
    }

    /// Gives the lease up so a successor need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) =
            kube_call("reading the leader lease", self.api.get_opt(&self.name)).await?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        kube_call(
            "releasing the leader lease",
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await?;
        Ok(())
    }

    async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let current = kube_call("reading the leader lease", self.api.get_opt(&self.name)).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match kube_call(
                "creating the leader lease",
                self.api.create(&PostParams::default(), &lease),
            )
            .await
            {
                Ok(_) => Ok(true),
                Err(Error::Kube {
                    source: kube::Error::Api(s),
                    ..
                }) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let v = view(&lease, now);
        if !may_take(&v, &self.identity) {
            return Ok(false);
        }
        let renewing = matches!(v, LeaseView::HeldBy { holder, .. } if holder == self.identity);
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !renewing {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(MicroTime(now));
        // `replace` carries the resourceVersion we read: a concurrent writer makes this a 409.
        match kube_call(
            "writing the leader lease",
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(Error::Kube {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    now - jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_respected() {
        let l = lease(Some("b"), 3, 15);
        assert!(!may_take(&view(&l, Timestamp::now()), "a"));
    }

    #[test]
    fn an_expired_lease_may_be_taken() {
        let l = lease(Some("b"), 20, 15);
        assert!(may_take(&view(&l, Timestamp::now()), "a"));
    }

    #[test]
    fn the_holder_renews_and_a_released_lease_is_free() {
        let l = lease(Some("a"), 3, 15);
        assert!(may_take(&view(&l, Timestamp::now()), "a"));
        let l = lease(None, 0, 1);
        assert_eq!(view(&l, Timestamp::now()), LeaseView::Free);
    }
}
