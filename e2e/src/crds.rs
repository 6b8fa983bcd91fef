//! Portico's CRDs on a testbed: created from the same Rust types that generate the chart's
//! manifests, then awaited until the API server serves them.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates every Portico CRD (an existing one is left as it is) and waits until each is
/// `Established`.
pub async fn install(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in portico_crds::generate::definitions() {
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(anyhow::anyhow!("creating CRD {}: {e}", crd.name_any())),
        }
    }
    let deadline = Instant::now() + ESTABLISH_TIMEOUT;
    for (_, crd) in portico_crds::generate::definitions() {
        loop {
            let current = api.get(&crd.name_any()).await?;
            let established = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CRD {} not established",
                crd.name_any()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
