//! The providers Portico serves with: one per accepted ProviderConfig, built when first needed
//! and rebuilt when its spec changes, plus an optional one from the command line (for a
//! cluster without the CRDs, as in development).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::IngressClass;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use portico_crds::{ProviderConfig, ProviderConfigSpec};
use portico_provider::Provider;

use super::select;
use crate::service::class::ClassPolicy;

/// Where a provider comes from; recorded on each object Portico serves, so its load balancer
/// is deleted from the cloud that holds it even after the object's class moved elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProviderSource {
    Config(String),
    CommandLine,
}

impl ProviderSource {
    /// The value of [`PROVIDER_ANNOTATION`].
    pub fn annotation_value(&self) -> String {
        match self {
            ProviderSource::Config(name) => format!("ProviderConfig/{name}"),
            ProviderSource::CommandLine => "command-line".into(),
        }
    }

    pub fn from_annotation(value: &str) -> Option<Self> {
        match value {
            "command-line" => Some(ProviderSource::CommandLine),
            other => other
                .strip_prefix("ProviderConfig/")
                .map(|n| ProviderSource::Config(n.to_string())),
        }
    }
}

/// Set on every Service and Ingress Portico serves: which provider holds its load balancer.
pub const PROVIDER_ANNOTATION: &str = "lb.portico.dev/provider";

/// A provider ready to use, and where it comes from.
#[derive(Clone)]
pub struct Chosen {
    pub provider: Arc<dyn Provider>,
    pub source: ProviderSource,
}

impl std::fmt::Debug for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chosen")
            .field("provider", &self.provider.name())
            .field("source", &self.source)
            .finish()
    }
}

/// Which provider serves an object.
#[derive(Debug)]
pub enum Selection {
    Serve(Chosen),
    /// Not Portico's to serve.
    NotOurs,
    /// Claimed by a configuration whose provider cannot be used; `reason` says why.
    Unavailable {
        config: String,
        reason: String,
    },
}

/// Builds a provider from a configuration's spec; `Err` says why it cannot.
pub type Builder = dyn Fn(&ProviderConfigSpec) -> Result<Arc<dyn Provider>, String> + Send + Sync;

pub struct ProviderRegistry {
    configs: Store<ProviderConfig>,
    command_line: Option<(Arc<dyn Provider>, ClassPolicy)>,
    build: Box<Builder>,
    built: Mutex<HashMap<String, Built>>,
}

/// A provider built from a configuration, with the spec it was built from.
type Built = (ProviderConfigSpec, Arc<dyn Provider>);

impl ProviderRegistry {
    pub fn new(
        configs: Store<ProviderConfig>,
        command_line: Option<(Arc<dyn Provider>, ClassPolicy)>,
        build: Box<Builder>,
    ) -> Self {
        ProviderRegistry {
            configs,
            command_line,
            build,
            built: Mutex::default(),
        }
    }

    fn provider_for(&self, config: &ProviderConfig) -> Selection {
        let name = config.name_any();
        let mut built = self.built.lock().expect("registry lock");
        if let Some((spec, provider)) = built.get(&name)
            && *spec == config.spec
        {
            return Selection::Serve(Chosen {
                provider: provider.clone(),
                source: ProviderSource::Config(name),
            });
        }
        match (self.build)(&config.spec) {
            Ok(provider) => {
                built.insert(name.clone(), (config.spec.clone(), provider.clone()));
                Selection::Serve(Chosen {
                    provider,
                    source: ProviderSource::Config(name),
                })
            }
            Err(reason) => Selection::Unavailable {
                config: name,
                reason,
            },
        }
    }

    /// Whether `config` can be built into a provider; `Err` says why not.
    pub fn check(&self, config: &ProviderConfig) -> Result<(), String> {
        match self.provider_for(config) {
            Selection::Unavailable { reason, .. } => Err(reason),
            _ => Ok(()),
        }
    }

    /// The provider for a Service of type LoadBalancer (by its `loadBalancerClass`).
    pub fn for_service(&self, svc: &Service) -> Selection {
        let Some(spec) = svc.spec.as_ref() else {
            return Selection::NotOurs;
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return Selection::NotOurs;
        }
        let configs = self.configs.state();
        if let Some(config) = select::for_class(&configs, spec.load_balancer_class.as_deref()) {
            return self.provider_for(config);
        }
        match &self.command_line {
            Some((provider, classes)) if classes.wants_load_balancer(svc) => {
                Selection::Serve(Chosen {
                    provider: provider.clone(),
                    source: ProviderSource::CommandLine,
                })
            }
            _ => Selection::NotOurs,
        }
    }

    /// The provider for an Ingress of (Portico's) class `class`: the configuration its
    /// `parameters` name, else the default configuration, else the command line's.
    pub fn for_ingress_class(&self, class: Option<&IngressClass>) -> Selection {
        let parameters = class
            .and_then(|c| c.spec.as_ref())
            .and_then(|s| s.parameters.as_ref());
        let configs = self.configs.state();
        if let Some(p) = parameters {
            if p.api_group.as_deref() != Some(portico_crds::GROUP) || p.kind != "ProviderConfig" {
                return Selection::Unavailable {
                    config: p.name.clone(),
                    reason: format!(
                        "IngressClass parameters must name a {}/ProviderConfig, not {}/{}",
                        portico_crds::GROUP,
                        p.api_group.as_deref().unwrap_or(""),
                        p.kind
                    ),
                };
            }
            let verdicts = select::verdicts(configs.iter().map(|c| c.as_ref()));
            return match configs.iter().find(|c| c.name_any() == p.name) {
                None => Selection::Unavailable {
                    config: p.name.clone(),
                    reason: format!("ProviderConfig {} not found", p.name),
                },
                Some(c) => match verdicts.get(&p.name) {
                    Some(select::Verdict::Invalid(why)) => Selection::Unavailable {
                        config: p.name.clone(),
                        reason: format!("ProviderConfig {} is invalid: {why}", p.name),
                    },
                    // A conflict is about classes and defaults, not about being named
                    // explicitly: an IngressClass may still use it.
                    _ => self.provider_for(c),
                },
            };
        }
        if let Some(config) = select::default_config(&configs) {
            return self.provider_for(config);
        }
        match &self.command_line {
            Some((provider, _)) => Selection::Serve(Chosen {
                provider: provider.clone(),
                source: ProviderSource::CommandLine,
            }),
            None => Selection::Unavailable {
                config: String::new(),
                reason: "no ProviderConfig is the default and the IngressClass has no parameters"
                    .into(),
            },
        }
    }

    /// The provider recorded on an object (see [`PROVIDER_ANNOTATION`]), for deleting its load
    /// balancer; `None` when that provider is gone.
    pub fn by_source(&self, source: &ProviderSource) -> Option<Chosen> {
        match source {
            ProviderSource::CommandLine => self.command_line.as_ref().map(|(p, _)| Chosen {
                provider: p.clone(),
                source: source.clone(),
            }),
            ProviderSource::Config(name) => {
                let configs = self.configs.state();
                let config = configs.iter().find(|c| c.name_any() == *name)?;
                match self.provider_for(config) {
                    Selection::Serve(chosen) => Some(chosen),
                    _ => None,
                }
            }
        }
    }

    /// Every usable provider, for garbage collection.
    pub fn all(&self) -> Vec<Chosen> {
        let mut out: Vec<Chosen> = self
            .configs
            .state()
            .iter()
            .filter_map(|c| match self.provider_for(c) {
                Selection::Serve(chosen) => Some(chosen),
                _ => None,
            })
            .collect();
        if let Some((p, _)) = &self.command_line {
            out.push(Chosen {
                provider: p.clone(),
                source: ProviderSource::CommandLine,
            });
        }
        out
    }
}

/// The recorded source of `obj`'s load balancer, if any.
pub fn recorded_source<K: ResourceExt>(obj: &K) -> Option<ProviderSource> {
    obj.annotations()
        .get(PROVIDER_ANNOTATION)
        .and_then(|v| ProviderSource::from_annotation(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_round_trip_through_the_annotation() {
        for source in [
            ProviderSource::CommandLine,
            ProviderSource::Config("aws-prod".into()),
        ] {
            assert_eq!(
                ProviderSource::from_annotation(&source.annotation_value()),
                Some(source)
            );
        }
        assert_eq!(ProviderSource::from_annotation("garbage"), None);
    }
}
