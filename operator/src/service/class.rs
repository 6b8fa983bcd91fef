//! Which Services of type LoadBalancer are Portico's to serve.

use k8s_openapi::api::core::v1::Service;

/// The `loadBalancerClass` values Portico serves, and whether it also serves Services that name
/// no class (only when configured as the cluster's default load balancer implementation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    pub classes: Vec<String>,
    pub serve_unclassed: bool,
}

impl ClassPolicy {
    /// True when `svc` asks for a load balancer that Portico provides. Services of other
    /// classes are never touched.
    pub fn wants_load_balancer(&self, svc: &Service) -> bool {
        let Some(spec) = svc.spec.as_ref() else {
            return false;
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match spec.load_balancer_class.as_deref() {
            Some(class) => self.classes.iter().any(|c| c == class),
            None => self.serve_unclassed,
        }
    }

    /// True when the Service names a class that belongs to someone else.
    pub fn is_foreign(&self, svc: &Service) -> bool {
        svc.spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref())
            .is_some_and(|class| !self.classes.iter().any(|c| c == class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    fn svc(type_: &str, class: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                load_balancer_class: class.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn policy(serve_unclassed: bool) -> ClassPolicy {
        ClassPolicy {
            classes: vec!["portico.dev/local".into()],
            serve_unclassed,
        }
    }

    #[test]
    fn our_class_is_served() {
        assert!(policy(false).wants_load_balancer(&svc("LoadBalancer", Some("portico.dev/local"))));
    }

    #[test]
    fn other_classes_are_never_touched() {
        let other = svc("LoadBalancer", Some("service.k8s.aws/nlb"));
        assert!(!policy(true).wants_load_balancer(&other));
        assert!(policy(true).is_foreign(&other));
    }

    #[test]
    fn unclassed_services_only_when_we_are_the_default() {
        let unclassed = svc("LoadBalancer", None);
        assert!(policy(true).wants_load_balancer(&unclassed));
        assert!(!policy(false).wants_load_balancer(&unclassed));
        assert!(!policy(false).is_foreign(&unclassed));
    }

    #[test]
    fn other_service_types_get_no_load_balancer() {
        assert!(!policy(true).wants_load_balancer(&svc("NodePort", None)));
        assert!(!policy(true).wants_load_balancer(&svc("ClusterIP", Some("portico.dev/local"))));
    }
}
