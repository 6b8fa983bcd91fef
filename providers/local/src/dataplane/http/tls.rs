//! TLS for HTTPS listeners: PEM certificates parsed into rustls keys, chosen per handshake by
//! SNI, and swapped atomically when an update rotates them (established connections keep the
//! key they shook hands with).

use portico_provider::TlsVersion;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use portico_provider::{Certificate, CertificateSource};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("certificate {name:?}: the local cloud needs PEM certificates, not a reference")]
    Reference { name: String },
    #[error("certificate {name:?}: the chain holds no certificate: {source}")]
    Chain { name: String, source: pem::Error },
    #[error("certificate {name:?}: no usable private key: {source}")]
    Key { name: String, source: pem::Error },
    #[error("certificate {name:?}: {source}")]
    Rejected { name: String, source: rustls::Error },
    #[error("certificate {name:?}: host {host:?} is not a DNS name or *.wildcard")]
    Host { name: String, host: String },
    #[error("an HTTPS listener needs at least one certificate")]
    None,
}

/// The crypto the data plane uses, whatever the process default is.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// One listener's certificates, indexed for the SNI lookup.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with an unknown name.
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Parses every certificate; the first one listed wins a host claimed twice. The default
    /// is the first certificate without hosts, else the first one. Certificates held by a
    /// cloud (references) are for that cloud: skipped next to PEM ones, refused alone.
    pub fn build(certificates: &[Certificate]) -> Result<CertStore, CertificateError> {
        let mut store = CertStore::default();
        let mut first = None;
        let any_pem = certificates
            .iter()
            .any(|c| matches!(c.source, CertificateSource::Pem { .. }));
        for cert in certificates
            .iter()
            .filter(|c| !any_pem || matches!(c.source, CertificateSource::Pem { .. }))
        {
            let key = Arc::new(parse(cert)?);
            first.get_or_insert_with(|| key.clone());
            if cert.hosts.is_empty() && store.default.is_none() {
                store.default = Some(key.clone());
            }
            for host in &cert.hosts {
                let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
                let (map, name) = match host.strip_prefix("*.") {
                    Some(suffix) => (&mut store.wildcard, suffix.to_string()),
                    None => (&mut store.exact, host.clone()),
                };
                if name.is_empty() || name.contains('*') || name.contains(char::is_whitespace) {
                    return Err(CertificateError::Host {
                        name: cert.name.clone(),
                        host,
                    });
                }
                map.entry(name).or_insert_with(|| key.clone());
            }
        }
        store.default = store.default.or(first);
        if store.default.is_none() {
            return Err(CertificateError::None);
        }
        Ok(store)
    }

    /// Exact host, then a one-label wildcard, then the default.
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = sni {
            // rustls hands SNI over lower-cased already; only odd clients pay for a copy.
            let lowered;
            let name = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = sni.to_ascii_lowercase();
                lowered.as_str()
            } else {
                sni
            };
            if let Some(key) = self.exact.get(name) {
                return Some(key.clone());
            }
            if let Some((_, suffix)) = name.split_once('.')
                && let Some(key) = self.wildcard.get(suffix)
            {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }
}

fn parse(cert: &Certificate) -> Result<CertifiedKey, CertificateError> {
    let name = || cert.name.clone();
    let (chain, key) = match &cert.source {
        CertificateSource::Pem { chain, key } => (chain, key),
        CertificateSource::Reference { .. } => {
            return Err(CertificateError::Reference { name: name() });
        }
    };
    let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .and_then(|c| {
            if c.is_empty() {
                Err(pem::Error::NoItemsFound)
            } else {
                Ok(c)
            }
        })
        .map_err(|source| CertificateError::Chain {
            name: name(),
            source,
        })?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|source| CertificateError::Key {
            name: name(),
            source,
        })?;
    // Also checks that the key belongs to the leaf certificate.
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| CertificateError::Rejected {
        name: name(),
        source,
    })
}

/// Chooses the certificate of each handshake from the current [`CertStore`].
#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl SniResolver {
    pub fn new(store: Arc<CertStore>) -> Self {
        SniResolver {
            store: ArcSwap::new(store),
        }
    }

    /// New handshakes use `store` from now on.
    pub fn rotate(&self, store: Arc<CertStore>) {
        self.store.store(store);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().pick(hello.server_name())
    }
}

/// A server configuration offering HTTP/2 and HTTP/1.1 over ALPN, certificates from `resolver`,
/// TLS `min` or newer.
pub fn server_config(resolver: Arc<SniResolver>, min: TlsVersion) -> Arc<ServerConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = match min {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(host: &str) -> Certificate {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        Certificate {
            name: host.into(),
            hosts: vec![host.into()],
            source: CertificateSource::Pem {
                chain: cert.pem(),
                key: signing_key.serialize_pem(),
            },
        }
    }

    fn held(id: &str) -> Certificate {
        Certificate {
            name: id.into(),
            hosts: vec![],
            source: CertificateSource::Reference { id: id.into() },
        }
    }

    #[test]
    fn certificates_held_by_a_cloud_are_skipped_next_to_pem_and_refused_alone() {
        let store = CertStore::build(&[held("arn:aws:acm:x"), pem("web.example")]).unwrap();
        assert!(store.pick(Some("web.example")).is_some());
        assert!(
            store.pick(None).is_some(),
            "the PEM certificate is the default"
        );
        assert!(matches!(
            CertStore::build(&[held("arn:aws:acm:x")]),
            Err(CertificateError::Reference { .. })
        ));
    }
}
