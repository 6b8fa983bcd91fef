//! Ingresses → external L7 (application) load balancers.

pub mod class;
pub mod controller;
pub mod status;
pub mod translate;

/// Kept on an Ingress while its load balancer exists.
pub const FINALIZER: &str = "ingress.portico.dev/load-balancer-cleanup";
