//! The cluster's PKI: a throwaway CA, the API server's serving certificate, client
//! certificates for the admin and the controller manager, and the service-account signing key.
//!
//! Everything is ECDSA P-256 (rcgen's default), which Go's TLS stack and kube's rustls both
//! accept, and is regenerated for every cluster, so no key outlives its cluster.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::address_plan::AddressPlan;

/// The first address of `--service-cluster-ip-range`, where the `kubernetes` Service lives.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// Who a client certificate authenticates as: the API server maps CN to the user name and
/// O to groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub common_name: &'static str,
    pub organization: Option<&'static str>,
}

/// The admin: `system:masters` bypasses RBAC, which tests and the demo need.
pub const ADMIN: ClientIdentity = ClientIdentity {
    common_name: "portico-admin",
    organization: Some("system:masters"),
};

/// The controller manager authenticates as the user the bootstrap RBAC policy grants its own
/// ClusterRole to (as kubeadm does), so it needs no `system:masters`.
pub const CONTROLLER_MANAGER: ClientIdentity = ClientIdentity {
    common_name: "system:kube-controller-manager",
    organization: None,
};

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, Debug)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The key pair service-account tokens are signed (controller manager, API server) and
/// verified (API server) with.
#[derive(Clone, Debug)]
pub struct ServiceAccountKeys {
    pub private_key_pem: String,
    pub public_key_pem: String,
}

#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: CertAndKey,
    pub apiserver: CertAndKey,
    pub admin: CertAndKey,
    pub controller_manager: CertAndKey,
    pub service_account: ServiceAccountKeys,
}

/// Where the PKI lives on disk; the control plane's flags point here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiFiles {
    pub ca_cert: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub service_account_private_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

impl PkiFiles {
    pub fn in_dir(dir: &Path) -> Self {
        PkiFiles {
            ca_cert: dir.join("ca.crt"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            service_account_private_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
        }
    }
}

/// Every name and address a client may dial the API server by: the slot's control-plane IP
/// (what kubeconfigs use), loopback names, and the in-cluster names of the `kubernetes` Service.
pub fn apiserver_sans(plan: &AddressPlan) -> Vec<String> {
    vec![
        plan.control_plane_ip().to_string(),
        "127.0.0.1".into(),
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
        KUBERNETES_SERVICE_IP.into(),
    ]
}

impl Pki {
    pub fn generate(plan: &AddressPlan) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let ca_params = ca_params();
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = CertAndKey {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        };
        let issuer = Issuer::new(ca_params, ca_key);

        let apiserver = issue(&apiserver_params(plan)?, &issuer)?;
        let admin = issue(&client_params(ADMIN), &issuer)?;
        let controller_manager = issue(&client_params(CONTROLLER_MANAGER), &issuer)?;

        let sa_key = KeyPair::generate()?;
        let service_account = ServiceAccountKeys {
            private_key_pem: sa_key.serialize_pem(),
            public_key_pem: sa_key.public_key_pem(),
        };
        Ok(Pki {
            ca,
            apiserver,
            admin,
            controller_manager,
            service_account,
        })
    }

    /// Writes what the control plane reads from disk (client certificates go into kubeconfigs
    /// instead). Private keys are readable by the owner only.
    pub fn write(&self, files: &PkiFiles) -> io::Result<()> {
        if let Some(dir) = files.ca_cert.parent() {
            fs::create_dir_all(dir)?;
        }
        write_file(&files.ca_cert, &self.ca.cert_pem, 0o644)?;
        write_file(&files.apiserver_cert, &self.apiserver.cert_pem, 0o644)?;
        write_file(&files.apiserver_key, &self.apiserver.key_pem, 0o600)?;
        write_file(
            &files.service_account_private_key,
            &self.service_account.private_key_pem,
            0o600,
        )?;
        write_file(
            &files.service_account_public_key,
            &self.service_account.public_key_pem,
            0o644,
        )?;
        Ok(())
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

fn issue(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<CertAndKey, rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named("portico-testbed-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(common_name: &str, purpose: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![purpose];
    // Helps Go's chain builder pick the right CA when several clusters' CAs share a name.
    params.use_authority_key_identifier_extension = true;
    params
}

pub(crate) fn apiserver_params(plan: &AddressPlan) -> Result<CertificateParams, rcgen::Error> {
    let mut params = leaf_params("kube-apiserver", ExtendedKeyUsagePurpose::ServerAuth);
    params.subject_alt_names = CertificateParams::new(apiserver_sans(plan))?.subject_alt_names;
    Ok(params)
}

pub(crate) fn client_params(identity: ClientIdentity) -> CertificateParams {
    let mut params = leaf_params(identity.common_name, ExtendedKeyUsagePurpose::ClientAuth);
    if let Some(org) = identity.organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{DnValue, SanType};
    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn roots(pki: &Pki) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(der(&pki.ca.cert_pem)).unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn server_cert_is_valid_for(pki: &Pki, name: &str) -> bool {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(pki), provider())
            .build()
            .unwrap();
        verifier
            .verify_server_cert(
                &der(&pki.apiserver.cert_pem),
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    fn client_cert_is_accepted(pki: &Pki, cert: &CertAndKey) -> bool {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(pki), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&der(&cert.cert_pem), &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn the_apiserver_certificate_is_valid_for_every_name_clients_dial() {
        let plan = AddressPlan::new(42);
        let pki = Pki::generate(&plan).unwrap();
        for name in [
            "127.20.42.250",
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "10.96.0.1",
        ] {
            assert!(server_cert_is_valid_for(&pki, name), "not valid for {name}");
        }
    }

    #[test]
    fn the_apiserver_certificate_is_not_valid_for_other_slots_or_names() {
        let pki = Pki::generate(&AddressPlan::new(42)).unwrap();
        assert!(!server_cert_is_valid_for(&pki, "127.20.43.250"));
        assert!(!server_cert_is_valid_for(&pki, "example.com"));
    }

    #[test]
    fn ip_sans_are_encoded_as_addresses_not_dns_names() {
        let params = apiserver_params(&AddressPlan::new(3)).unwrap();
        let ip = "127.20.3.250".parse().unwrap();
        assert!(params.subject_alt_names.contains(&SanType::IpAddress(ip)));
        let service_ip = KUBERNETES_SERVICE_IP.parse().unwrap();
        assert!(
            params
                .subject_alt_names
                .contains(&SanType::IpAddress(service_ip))
        );
    }

    #[test]
    fn client_certificates_chain_to_the_cluster_ca_and_no_other() {
        let pki = Pki::generate(&AddressPlan::new(1)).unwrap();
        let other = Pki::generate(&AddressPlan::new(1)).unwrap();
        assert!(client_cert_is_accepted(&pki, &pki.admin));
        assert!(client_cert_is_accepted(&pki, &pki.controller_manager));
        assert!(!client_cert_is_accepted(&other, &pki.admin));
    }

    #[test]
    fn the_admin_is_a_system_master_and_the_controller_manager_is_not() {
        let org = |identity| {
            client_params(identity)
                .distinguished_name
                .get(&DnType::OrganizationName)
                .cloned()
        };
        assert_eq!(
            org(ADMIN),
            Some(DnValue::Utf8String("system:masters".into()))
        );
        assert_eq!(org(CONTROLLER_MANAGER), None);
        assert_eq!(ADMIN.common_name, "portico-admin");
    }

    #[test]
    fn the_service_account_public_key_matches_the_private_key() {
        let pki = Pki::generate(&AddressPlan::new(1)).unwrap();
        let private = KeyPair::from_pem(&pki.service_account.private_key_pem).unwrap();
        assert_eq!(private.public_key_pem(), pki.service_account.public_key_pem);
        assert!(pki.service_account.private_key_pem.contains("PRIVATE KEY"));
        assert!(pki.service_account.public_key_pem.contains("PUBLIC KEY"));
    }
}
