//! `portico-aws`: Portico's AWS provider on Elastic Load Balancing v2. Services get network
//! load balancers (a listener and a target group per port, the nodes as targets on their node
//! port); Ingresses get application load balancers (a target group per backend, listener rules
//! in Ingress precedence, HTTPS with ACM certificates).
//!
//! Translation is pure ([`network`], [`application`]); [`provider`] reads what exists, changes
//! what differs, and maps AWS errors onto the reconciler's ([`error`]).

pub mod application;
pub mod certificates;
pub mod error;
pub mod moto;
pub mod network;
pub mod provider;
pub mod tags;

pub use provider::{AwsProvider, AwsSettings};
