//! Portico's local cluster: a real Kubernetes control plane (etcd, kube-apiserver and
//! kube-controller-manager 1.20.2) with simulated nodes, all on loopback, without Docker.

pub mod address_plan;
pub mod agent;
