//! A ProviderConfig's spec → a provider. Only the clouds compiled in (cargo features) can be
//! built; the others are reported on the configuration, not silently ignored.

use std::sync::Arc;

use portico_crds::ProviderConfigSpec;
use portico_crds::provider_config::ProviderKind;
use portico_provider::Provider;

pub fn build_provider(spec: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    match spec.kind() {
        None => Err("exactly one of local, aws and gcp must be set".into()),
        Some(ProviderKind::Local) => local(spec),
        Some(ProviderKind::Aws) => aws(spec),
        Some(ProviderKind::Gcp) => gcp(spec),
    }
}

// Used by the builds that leave a cloud out.
#[cfg_attr(
    all(feature = "local", feature = "aws", feature = "gcp"),
    allow(dead_code)
)]
fn missing(kind: &str) -> String {
    format!("this build of Portico has no {kind} provider (cargo feature `{kind}`)")
}

#[cfg(feature = "local")]
fn local(spec: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    let settings = spec.local.as_ref().expect("kind() checked it");
    let address: std::net::SocketAddr = settings.api_address.parse().map_err(|e| {
        format!(
            "local.apiAddress {:?}: {e} (an IP:port)",
            settings.api_address
        )
    })?;
    let provider = portico_local_cloud::LocalCloudProvider::new(address);
    Ok(Arc::new(match &settings.address_pool {
        None => provider,
        Some(pool) => provider.with_pool(
            pool.parse()
                .map_err(|e| format!("local.addressPool {pool:?}: {e}"))?,
        ),
    }))
}

#[cfg(not(feature = "local"))]
fn local(_: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    Err(missing("local"))
}

/// Credentials come from the standard AWS chain, read when the provider is first used.
#[cfg(feature = "aws")]
fn aws(spec: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    use portico_crds::provider_config::AwsScheme;
    let settings = spec.aws.as_ref().expect("kind() checked it");
    Ok(Arc::new(portico_aws::AwsProvider::from_chain(
        &settings.region,
        settings.endpoint_url.as_deref(),
        portico_aws::AwsSettings {
            subnets: settings.subnets.clone(),
            security_groups: settings.security_groups.clone(),
            internal: settings.scheme == AwsScheme::Internal,
            vpc_id: settings.vpc_id.clone(),
            tags: settings.tags.clone(),
        },
    )))
}

#[cfg(not(feature = "aws"))]
fn aws(_: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    Err(missing("aws"))
}

/// Credentials are Application Default Credentials (Workload Identity on GKE), read when the
/// provider is first used; none with an endpoint override (a fake or a private endpoint that
/// authenticates otherwise).
#[cfg(feature = "gcp")]
fn gcp(spec: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    use portico_crds::provider_config::GcpNetworkTier;
    let settings = spec.gcp.as_ref().expect("kind() checked it");
    Ok(Arc::new(portico_gcp::GcpProvider::new(
        portico_gcp::GcpSettings {
            project: settings.project.clone(),
            region: settings.region.clone(),
            network: settings.network.clone(),
            network_tier: match settings.network_tier {
                GcpNetworkTier::Premium => "PREMIUM",
                GcpNetworkTier::Standard => "STANDARD",
            }
            .into(),
            node_tags: settings.node_tags.clone(),
            endpoint_url: settings.endpoint_url.clone(),
        },
    )))
}

#[cfg(not(feature = "gcp"))]
fn gcp(_: &ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> {
    Err(missing("gcp"))
}

#[cfg(test)]
mod tests {
    use portico_crds::provider_config::{AwsSettings, LocalSettings};

    use super::*;

    fn spec() -> ProviderConfigSpec {
        ProviderConfigSpec {
            default: true,
            load_balancer_class: None,
            local: None,
            aws: None,
            gcp: None,
        }
    }

    #[cfg(feature = "local")]
    #[test]
    fn a_local_configuration_becomes_the_local_provider() {
        let mut s = spec();
        s.local = Some(LocalSettings {
            api_address: "127.0.0.1:8900".into(),
            address_pool: None,
        });
        assert_eq!(build_provider(&s).unwrap().name(), "local");
    }

    #[cfg(feature = "local")]
    #[test]
    fn an_address_pool_the_local_cloud_cannot_serve_is_refused_with_the_reason() {
        let mut s = spec();
        for (pool, why) in [
            ("127.22.0.9-127.22.0.1", "comes after"),
            ("10.0.0.1-10.0.0.9", "127.0.0.0/8"),
        ] {
            s.local = Some(LocalSettings {
                api_address: "127.0.0.1:8900".into(),
                address_pool: Some(pool.into()),
            });
            let err = build_provider(&s).err().unwrap();
            assert!(
                err.contains("local.addressPool") && err.contains(why),
                "{err}"
            );
        }
        s.local.as_mut().unwrap().address_pool = Some("127.22.0.0/28".into());
        assert!(build_provider(&s).is_ok());
    }

    #[test]
    fn a_host_name_is_refused_with_the_reason() {
        let mut s = spec();
        s.local = Some(LocalSettings {
            api_address: "cloud.example:8900".into(),
            address_pool: None,
        });
        let err = build_provider(&s).err().unwrap();
        assert!(
            err.contains("local.apiAddress") || err.contains("no local provider"),
            "{err}"
        );
    }

    #[test]
    fn an_aws_configuration_becomes_the_aws_provider_where_compiled_in() {
        let mut s = spec();
        s.aws = Some(AwsSettings {
            region: "eu-west-1".into(),
            subnets: vec!["subnet-1".into()],
            security_groups: vec![],
            scheme: Default::default(),
            vpc_id: None,
            tags: Default::default(),
            endpoint_url: None,
        });
        match build_provider(&s) {
            Ok(provider) => assert_eq!(provider.name(), "aws"),
            Err(e) => assert!(e.contains("cargo feature `aws`"), "{e}"),
        }
    }

    #[test]
    fn a_gcp_configuration_becomes_the_gcp_provider_where_compiled_in() {
        let mut s = spec();
        s.gcp = Some(
            serde_json::from_value(serde_json::json!({
                "project": "my-project", "region": "europe-west1"
            }))
            .unwrap(),
        );
        match build_provider(&s) {
            Ok(provider) => assert_eq!(provider.name(), "gcp"),
            Err(e) => assert!(e.contains("cargo feature `gcp`"), "{e}"),
        }
    }
}
