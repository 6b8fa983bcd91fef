//! Services of type LoadBalancer → external L4 load balancers.

pub mod annotations;
pub mod class;
pub mod controller;
pub mod nodes;
pub mod status;
pub mod translate;

/// The upstream service controller's finalizer: a Service keeps it while its load balancer
/// exists, so deleting the Service cannot leak the load balancer.
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
