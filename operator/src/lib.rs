//! Portico's controllers: Services of type LoadBalancer (and, later, Ingresses) become external
//! load balancers through a [`portico_provider::Provider`].

pub mod backoff;
pub mod ensured;
pub mod error;
pub mod events;
pub mod gc;
pub mod http;
pub mod ingress;
pub mod leader;
pub mod metrics;
pub mod node_set;
pub mod object;
pub mod policy;
pub mod provider_config;
pub mod service;
