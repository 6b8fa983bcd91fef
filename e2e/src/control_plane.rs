//! The control plane's command lines: etcd, kube-apiserver and kube-controller-manager 1.20.
//!
//! Everything binds to the slot's control-plane IP only, with every secondary or insecure
//! port off, so clusters in different slots never collide.

use std::ffi::OsString;
use std::path::Path;

use crate::address_plan::AddressPlan;
use crate::certs::PkiFiles;

/// etcd serves `/metrics` and `/health` here (its own port, so it never shares the client port's
/// TLS-less listener with anything else).
pub const ETCD_METRICS_PORT: u16 = 2381;
pub const APISERVER_PORT: u16 = 6443;
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Advertised as the `kubernetes` Service's endpoint but never dialed (TEST-NET-1); with
/// `--endpoint-reconciler-type none` the API server does not even publish it.
pub const ADVERTISE_ADDRESS: &str = "192.0.2.1";

/// Controllers the controller manager must not run. `service` would handle LoadBalancer
/// Services, which is Portico's job (it only runs with a cloud provider anyway; disabled
/// explicitly so a future default cannot change that). `route` and `cloud-node-lifecycle` need
/// a cloud; `csrsigning` would need the CA key on disk, which the testbed never writes.
pub const DISABLED_CONTROLLERS: &[&str] =
    &["service", "route", "cloud-node-lifecycle", "csrsigning"];

/// Every port a cluster listens on at its control-plane IP.
pub fn listen_ports() -> [u16; 4] {
    [2379, 2380, ETCD_METRICS_PORT, APISERVER_PORT]
}

pub fn apiserver_url(plan: &AddressPlan) -> String {
    format!("https://{}", plan.apiserver())
}

pub fn etcd_client_url(plan: &AddressPlan) -> String {
    format!("http://{}", plan.etcd_client())
}

fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value.as_ref());
    arg
}

pub fn etcd_args(plan: &AddressPlan, data_dir: &Path) -> Vec<OsString> {
    let ip = plan.control_plane_ip();
    let client = etcd_client_url(plan);
    let peer = format!("http://{}", plan.etcd_peer());
    vec![
        flag("name", "default"),
        flag("data-dir", data_dir),
        flag("listen-client-urls", &client),
        flag("advertise-client-urls", &client),
        flag("listen-peer-urls", &peer),
        flag("initial-advertise-peer-urls", &peer),
        flag("initial-cluster", format!("default={peer}")),
        flag("initial-cluster-state", "new"),
        flag(
            "initial-cluster-token",
            format!("portico-testbed-{}", plan.slot),
        ),
        flag(
            "listen-metrics-urls",
            format!("http://{ip}:{ETCD_METRICS_PORT}"),
        ),
        flag("logger", "zap"),
        flag("log-outputs", "stderr"),
    ]
}

pub fn apiserver_args(plan: &AddressPlan, pki: &PkiFiles, cert_dir: &Path) -> Vec<OsString> {
    vec![
        flag("bind-address", plan.control_plane_ip().to_string()),
        flag("secure-port", APISERVER_PORT.to_string()),
        // 1.20 still serves plain HTTP on 127.0.0.1:8080 by default.
        flag("insecure-port", "0"),
        flag("advertise-address", ADVERTISE_ADDRESS),
        // Don't publish the (undialable) advertise address as the `kubernetes` endpoint.
        flag("endpoint-reconciler-type", "none"),
        flag("etcd-servers", etcd_client_url(plan)),
        flag("service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE),
        flag("authorization-mode", "Node,RBAC"),
        flag("client-ca-file", &pki.ca_cert),
        flag("tls-cert-file", &pki.apiserver_cert),
        flag("tls-private-key-file", &pki.apiserver_key),
        // Unused while the TLS files above are given, but keeps any fallback out of
        // /var/run/kubernetes.
        flag("cert-dir", cert_dir),
        flag("service-account-key-file", &pki.service_account_public_key),
        flag(
            "service-account-signing-key-file",
            &pki.service_account_private_key,
        ),
        flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER),
        flag("api-audiences", SERVICE_ACCOUNT_ISSUER),
        flag("allow-privileged", "true"),
        flag("profiling", "false"),
    ]
}

pub fn controller_manager_args(
    plan: &AddressPlan,
    kubeconfig: &Path,
    pki: &PkiFiles,
) -> Vec<OsString> {
    let controllers = std::iter::once("*".to_owned())
        .chain(DISABLED_CONTROLLERS.iter().map(|c| format!("-{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        flag("kubeconfig", kubeconfig),
        flag("bind-address", plan.control_plane_ip().to_string()),
        // No insecure (10252) or secure (10257) serving: nothing needs its health endpoints.
        flag("port", "0"),
        flag("secure-port", "0"),
        flag("leader-elect", "false"),
        flag("use-service-account-credentials", "true"),
        flag(
            "service-account-private-key-file",
            &pki.service_account_private_key,
        ),
        flag("root-ca-file", &pki.ca_cert),
        flag("allocate-node-cidrs", "false"),
        flag("controllers", controllers),
        flag("profiling", "false"),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        let prefix = format!("--{name}=");
        args.iter().find_map(|a| a.strip_prefix(&prefix))
    }

    fn pki() -> PkiFiles {
        PkiFiles::in_dir(&PathBuf::from("/s/pki"))
    }

    #[test]
    fn etcd_listens_only_on_the_slot_address() {
        let args = strings(etcd_args(&AddressPlan::new(5), Path::new("/s/etcd")));
        for name in [
            "listen-client-urls",
            "listen-peer-urls",
            "listen-metrics-urls",
        ] {
            let url = value(&args, name).unwrap();
            assert!(url.starts_with("http://127.20.5.250:"), "{name}={url}");
        }
        assert_eq!(
            value(&args, "initial-cluster"),
            Some("default=http://127.20.5.250:2380")
        );
        assert_eq!(value(&args, "data-dir"), Some("/s/etcd"));
    }

    #[test]
    fn apiserver_binds_the_slot_address_with_the_insecure_port_off() {
        let args = strings(apiserver_args(
            &AddressPlan::new(5),
            &pki(),
            Path::new("/s/pki"),
        ));
        assert_eq!(value(&args, "bind-address"), Some("127.20.5.250"));
        assert_eq!(value(&args, "secure-port"), Some("6443"));
        assert_eq!(value(&args, "insecure-port"), Some("0"));
        assert_eq!(
            value(&args, "etcd-servers"),
            Some("http://127.20.5.250:2379")
        );
        assert_eq!(value(&args, "advertise-address"), Some("192.0.2.1"));
        assert_eq!(value(&args, "endpoint-reconciler-type"), Some("none"));
        assert_eq!(value(&args, "authorization-mode"), Some("Node,RBAC"));
        assert_eq!(value(&args, "profiling"), Some("false"));
    }

    #[test]
    fn apiserver_verifies_tokens_with_the_public_key_and_signs_with_the_private_one() {
        let args = strings(apiserver_args(
            &AddressPlan::new(5),
            &pki(),
            Path::new("/s/pki"),
        ));
        assert_eq!(
            value(&args, "service-account-key-file"),
            Some("/s/pki/service-account.pub")
        );
        assert_eq!(
            value(&args, "service-account-signing-key-file"),
            Some("/s/pki/service-account.key")
        );
        assert_eq!(
            value(&args, "api-audiences"),
            value(&args, "service-account-issuer")
        );
    }

    #[test]
    fn controller_manager_serves_nothing_and_never_handles_load_balancers() {
        let args = strings(controller_manager_args(
            &AddressPlan::new(5),
            Path::new("/s/cm.kubeconfig"),
            &pki(),
        ));
        assert_eq!(value(&args, "port"), Some("0"));
        assert_eq!(value(&args, "secure-port"), Some("0"));
        assert_eq!(value(&args, "bind-address"), Some("127.20.5.250"));
        let controllers: Vec<&str> = value(&args, "controllers").unwrap().split(',').collect();
        assert_eq!(controllers[0], "*");
        assert!(controllers.contains(&"-service"));
        assert!(!args.iter().any(|a| a.starts_with("--cloud-provider")));
        assert_eq!(
            value(&args, "service-account-private-key-file"),
            Some("/s/pki/service-account.key")
        );
    }

    #[test]
    fn no_process_listens_on_a_wildcard_address() {
        let plan = AddressPlan::new(5);
        let all = [
            strings(etcd_args(&plan, Path::new("/e"))),
            strings(apiserver_args(&plan, &pki(), Path::new("/p"))),
            strings(controller_manager_args(&plan, Path::new("/k"), &pki())),
        ]
        .concat();
        assert!(
            !all.iter()
                .any(|a| a.contains("0.0.0.0") || a.contains("localhost"))
        );
    }
}
