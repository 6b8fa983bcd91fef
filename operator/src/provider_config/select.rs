//! Which ProviderConfig serves what. Pure: computed from the cached configurations alone.
//!
//! A configuration claims a `loadBalancerClass`, or (with `default: true`) everything that
//! names no class. When two claim the same thing the oldest wins, as Gateway API resolves
//! conflicts, so a newcomer can never take load balancers away from a working configuration.

use std::collections::BTreeMap;

use kube::ResourceExt;
use portico_crds::ProviderConfig;

/// What a configuration is, next to the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// It names no cloud, or several (an API server without the schema's one-of lets that in).
    Invalid(String),
    /// An older configuration claims the same class (or is also the default).
    Conflicted {
        with: String,
    },
}

/// `(creationTimestamp, name)`: the order in which claims are honoured.
fn age_key(config: &ProviderConfig) -> (Option<jiff::Timestamp>, String) {
    (
        config.metadata.creation_timestamp.as_ref().map(|t| t.0),
        config.name_any(),
    )
}

/// The verdict on every configuration, by name.
pub fn verdicts<'a>(
    configs: impl IntoIterator<Item = &'a ProviderConfig>,
) -> BTreeMap<String, Verdict> {
    let mut sorted: Vec<&ProviderConfig> = configs.into_iter().collect();
    sorted.sort_by_key(|c| age_key(c));
    let mut claimed_classes: BTreeMap<&str, String> = BTreeMap::new();
    let mut default_holder: Option<String> = None;
    let mut out = BTreeMap::new();
    for config in sorted {
        let name = config.name_any();
        if config.spec.kind().is_none() {
            out.insert(
                name,
                Verdict::Invalid("exactly one of local, aws and gcp must be set".into()),
            );
            continue;
        }
        let mut conflict = None;
        if let Some(class) = config.spec.load_balancer_class.as_deref()
            && let Some(holder) = claimed_classes.get(class)
        {
            conflict = Some(holder.clone());
        }
        if config.spec.default
            && let Some(holder) = &default_holder
        {
            conflict = conflict.or(Some(holder.clone()));
        }
        match conflict {
            Some(with) => {
                out.insert(name, Verdict::Conflicted { with });
            }
            None => {
                if let Some(class) = config.spec.load_balancer_class.as_deref() {
                    claimed_classes.insert(class, name.clone());
                }
                if config.spec.default {
                    default_holder = Some(name.clone());
                }
                out.insert(name, Verdict::Accepted);
            }
        }
    }
    out
}

/// The accepted configuration serving `class` (`None`: a Service that names no class).
pub fn for_class<'a>(
    configs: &'a [std::sync::Arc<ProviderConfig>],
    class: Option<&str>,
) -> Option<&'a ProviderConfig> {
    let verdicts = verdicts(configs.iter().map(|c| c.as_ref()));
    configs
        .iter()
        .map(|c| c.as_ref())
        .filter(|c| verdicts.get(&c.name_any()) == Some(&Verdict::Accepted))
        .find(|c| match class {
            Some(class) => c.spec.load_balancer_class.as_deref() == Some(class),
            None => c.spec.default,
        })
}

/// The accepted default configuration, if any.
pub fn default_config(configs: &[std::sync::Arc<ProviderConfig>]) -> Option<&ProviderConfig> {
    for_class(configs, None)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portico_crds::ProviderConfigSpec;
    use portico_crds::provider_config::LocalSettings;

    use super::*;

    fn config(name: &str, age_s: i64, default: bool, class: Option<&str>) -> Arc<ProviderConfig> {
        let mut c = ProviderConfig::new(
            name,
            ProviderConfigSpec {
                default,
                load_balancer_class: class.map(Into::into),
                local: Some(LocalSettings {
                    api_address: "127.0.0.1:8900".into(),
                    address_pool: None,
                }),
                aws: None,
                gcp: None,
            },
        );
        c.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 + age_s).unwrap(),
        ));
        Arc::new(c)
    }

    #[test]
    fn the_oldest_default_wins_and_the_newer_one_says_with_whom_it_conflicts() {
        let configs = vec![config("new", 10, true, None), config("old", 0, true, None)];
        let v = verdicts(configs.iter().map(|c| c.as_ref()));
        assert_eq!(v["old"], Verdict::Accepted);
        assert_eq!(v["new"], Verdict::Conflicted { with: "old".into() });
        assert_eq!(default_config(&configs).unwrap().name_any(), "old");
    }

    #[test]
    fn a_class_is_served_by_the_oldest_configuration_claiming_it() {
        let configs = vec![
            config("b", 5, false, Some("portico.dev/aws")),
            config("a", 1, false, Some("portico.dev/aws")),
            config("c", 2, false, Some("portico.dev/gcp")),
        ];
        assert_eq!(
            for_class(&configs, Some("portico.dev/aws"))
                .unwrap()
                .name_any(),
            "a"
        );
        assert_eq!(
            for_class(&configs, Some("portico.dev/gcp"))
                .unwrap()
                .name_any(),
            "c"
        );
        assert!(for_class(&configs, Some("other.io/lb")).is_none());
        assert!(for_class(&configs, None).is_none(), "no default configured");
    }

    #[test]
    fn a_configuration_naming_no_cloud_is_invalid_and_serves_nothing() {
        let mut broken = (*config("broken", 0, true, None)).clone();
        broken.spec.local = None;
        let configs = vec![Arc::new(broken)];
        assert!(matches!(
            verdicts(configs.iter().map(|c| c.as_ref()))["broken"],
            Verdict::Invalid(_)
        ));
        assert!(default_config(&configs).is_none());
    }

    #[test]
    fn same_age_ties_break_by_name() {
        let configs = vec![
            config("zeta", 0, true, None),
            config("alpha", 0, true, None),
        ];
        assert_eq!(default_config(&configs).unwrap().name_any(), "alpha");
    }
}
