//! Which Ingresses are Portico's: by IngressClass, the legacy annotation, or the default class.

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

/// `spec.controller` of the IngressClasses Portico serves.
pub const CONTROLLER: &str = "portico.dev/ingress-controller";
/// Deprecated but still honoured, as Ingress v1 asks controllers to.
pub const LEGACY_ANNOTATION: &str = "kubernetes.io/ingress.class";
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

/// What the cluster's IngressClasses say about ownership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressClasses {
    /// Names of the classes whose controller is Portico.
    pub ours: Vec<String>,
    /// True when a class marked default is ours (and none marked default is someone else's).
    pub default_is_ours: bool,
}

impl IngressClasses {
    pub fn from_classes<'a>(classes: impl IntoIterator<Item = &'a IngressClass>) -> Self {
        let mut ours = Vec::new();
        let mut defaults_ours = 0;
        let mut defaults_other = 0;
        for class in classes {
            let mine =
                class.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER);
            let is_default = class
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true");
            if mine {
                ours.extend(class.metadata.name.clone());
            }
            match (is_default, mine) {
                (true, true) => defaults_ours += 1,
                (true, false) => defaults_other += 1,
                _ => {}
            }
        }
        ours.sort();
        IngressClasses {
            ours,
            // Several defaults are ambiguous: take none rather than fight another controller.
            default_is_ours: defaults_ours > 0 && defaults_other == 0,
        }
    }

    /// True when `ingress` is Portico's to serve.
    pub fn is_ours(&self, ingress: &Ingress) -> bool {
        match named_class(ingress) {
            Some(class) => self.ours.iter().any(|c| c == class),
            None => self.default_is_ours,
        }
    }
}

/// The class an Ingress names: `spec.ingressClassName`, else the legacy annotation.
fn named_class(ingress: &Ingress) -> Option<&str> {
    ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or_else(|| {
            ingress
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEGACY_ANNOTATION))
                .map(String::as_str)
        })
}

/// The IngressClass object `ingress` belongs to: the one it names, else Portico's default
/// class. `None` when that class does not exist.
pub fn class_of<'a>(
    ingress: &Ingress,
    classes: &'a [std::sync::Arc<IngressClass>],
) -> Option<&'a IngressClass> {
    let name = named_class(ingress);
    classes.iter().map(|c| c.as_ref()).find(|c| match name {
        Some(name) => c.metadata.name.as_deref() == Some(name),
        None => {
            c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER)
                && c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .is_some_and(|v| v == "true")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IngressClassSpec, IngressSpec};

    fn class(name: &str, controller: &str, default: bool) -> IngressClass {
        IngressClass {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                annotations: default
                    .then(|| [(DEFAULT_CLASS_ANNOTATION.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            spec: Some(IngressClassSpec {
                controller: Some(controller.into()),
                parameters: None,
            }),
        }
    }

    fn ingress(class_name: Option<&str>, annotation: Option<&str>) -> Ingress {
        Ingress {
            metadata: kube::api::ObjectMeta {
                annotations: annotation
                    .map(|a| [(LEGACY_ANNOTATION.to_string(), a.to_string())].into()),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                ingress_class_name: class_name.map(Into::into),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn an_ingress_naming_our_class_is_ours_and_others_are_not() {
        let classes = IngressClasses::from_classes(&[
            class("portico", CONTROLLER, false),
            class("nginx", "k8s.io/ingress-nginx", false),
        ]);
        assert!(classes.is_ours(&ingress(Some("portico"), None)));
        assert!(!classes.is_ours(&ingress(Some("nginx"), None)));
        assert!(!classes.is_ours(&ingress(Some("missing"), None)));
    }

    #[test]
    fn the_legacy_annotation_is_honoured() {
        let classes = IngressClasses::from_classes(&[class("portico", CONTROLLER, false)]);
        assert!(classes.is_ours(&ingress(None, Some("portico"))));
        assert!(!classes.is_ours(&ingress(None, Some("nginx"))));
    }

    #[test]
    fn classless_ingresses_are_ours_only_when_our_class_is_the_default() {
        let not_default = IngressClasses::from_classes(&[class("portico", CONTROLLER, false)]);
        assert!(!not_default.is_ours(&ingress(None, None)));
        let default = IngressClasses::from_classes(&[class("portico", CONTROLLER, true)]);
        assert!(default.is_ours(&ingress(None, None)));
        let contested = IngressClasses::from_classes(&[
            class("portico", CONTROLLER, true),
            class("nginx", "k8s.io/ingress-nginx", true),
        ]);
        assert!(!contested.is_ours(&ingress(None, None)));
    }
}
