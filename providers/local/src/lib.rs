//! The local cloud: a daemon with a small HTTP/JSON API that provisions load balancers on
//! loopback addresses, whose data plane is an L4 and HTTP(S) proxy in this crate, and the
//! [`LocalCloudProvider`] through which Portico drives it.
//!
//! Layout: [`daemon`] wires the [`api`] server to the [`cloud`] (the registry of load
//! balancers, persisted by [`store`], addresses from [`pool`]); each load balancer runs a
//! [`dataplane::LoadBalancer`]. [`client`] is the provider side of the API.

pub mod api;
pub mod client;
pub mod cloud;
pub mod daemon;
pub mod dataplane;
pub mod metrics;
pub mod pool;
pub mod prefixed;
pub mod store;

mod query;

pub use client::LocalCloudProvider;
pub use daemon::{Daemon, DaemonConfig, DaemonError};
pub use pool::AddressPool;
