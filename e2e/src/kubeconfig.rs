//! Kubeconfig files for the cluster's clients.
//!
//! Written as JSON, which is valid YAML, so kubectl, client-go and kube-rs all read it; the
//! certificates are embedded (`*-data`, base64 PEM) so a kubeconfig stays usable on its own.

use std::io;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::certs::CertAndKey;

/// The context (and cluster) name in every testbed kubeconfig.
pub const CONTEXT: &str = "portico-testbed";

/// How a kubeconfig's user authenticates.
pub enum Credentials<'a> {
    ClientCertificate(&'a CertAndKey),
    Token(&'a str),
}

/// A kubeconfig for `server` (e.g. `https://127.20.1.250:6443`) trusting `ca_pem`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, credentials: Credentials<'_>) -> Value {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let user_entry = match credentials {
        Credentials::ClientCertificate(cert) => json!({
            "client-certificate-data": b64(&cert.cert_pem),
            "client-key-data": b64(&cert.key_pem),
        }),
        Credentials::Token(token) => json!({ "token": token }),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CONTEXT,
            "cluster": {
                "server": server,
                "certificate-authority-data": b64(ca_pem),
            },
        }],
        "users": [{ "name": user, "user": user_entry }],
        "contexts": [{
            "name": CONTEXT,
            "context": { "cluster": CONTEXT, "user": user, "namespace": "default" },
        }],
        "current-context": CONTEXT,
    })
}

/// Writes a kubeconfig readable by the owner only (it holds a private key or a token).
pub fn write(path: &Path, kubeconfig: &Value) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let text = serde_json::to_string_pretty(kubeconfig).map_err(io::Error::other)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> CertAndKey {
        CertAndKey {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        }
    }

    #[test]
    fn kube_reads_the_client_certificate_kubeconfig() {
        let cert = identity();
        let value = kubeconfig(
            "https://127.20.1.250:6443",
            "CA",
            "admin",
            Credentials::ClientCertificate(&cert),
        );
        let parsed = kube::config::Kubeconfig::from_yaml(&value.to_string()).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some(CONTEXT));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.20.1.250:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_certificate_data.as_deref(), Some("Q0VSVA=="));
        assert_eq!(user.client_key_data.as_ref().map(|_| ()), Some(()));
    }

    #[test]
    fn kube_reads_the_token_kubeconfig() {
        let value = kubeconfig(
            "https://127.20.1.250:6443",
            "CA",
            "sa",
            Credentials::Token("t0k3n"),
        );
        let parsed = kube::config::Kubeconfig::from_yaml(&value.to_string()).unwrap();
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
        assert!(user.client_certificate_data.is_none());
    }
}
