//! `portico-gcp`: Portico's GCP provider on Compute Engine. A Service gets an external
//! passthrough network load balancer: a regional address, a target pool of the nodes'
//! instances with a legacy HTTP health check, a forwarding rule per protocol, and firewall
//! rules for the clients and for Google's health checkers. An Ingress gets a global external
//! Application load balancer: backend services over zonal endpoint groups of the nodes, a URL
//! map with Ingress routing, proxies, certificates from the Secrets, forwarding rules.
//!
//! Translation is pure ([`network`], [`application`]); [`provider`] reads what exists, changes what differs,
//! waits for the operations it starts ([`operation`]) and maps API errors onto the
//! reconciler's ([`error`]). [`fake`] is a stateful fake of the REST endpoints used, for tests.

pub mod application;
pub mod error;
pub mod fake;
pub mod names;
pub mod network;
pub mod operation;
pub mod provider;

pub use provider::{GcpProvider, GcpSettings};
