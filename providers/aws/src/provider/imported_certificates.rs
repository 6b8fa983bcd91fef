//! TLS Secrets for ALBs, which only serve certificates ACM holds: each PEM certificate of an
//! Ingress is imported into ACM once, tagged with its owner, its Secret and a fingerprint of
//! its material; a rotated Secret is re-imported onto the same ARN, so listeners never change
//! and connections never drop; a certificate no longer named is deleted once no listener
//! serves it. An import is found again through the listener that serves it, or (after a
//! reconcile killed before attaching it) among the account's imported certificates by its
//! tags.

use std::collections::BTreeSet;

use aws_sdk_acm::primitives::Blob;
use aws_sdk_acm::types::{CertificateType, Tag as AcmTag};
use portico_provider::{
    ApplicationFrontend, CertificateSource, LoadBalancerSpec, Ownership, ProviderError,
};

use super::AwsProvider;
use crate::certificates::{fingerprint, split_chain};
use crate::error::from_sdk;
use crate::tags;

/// Which Secret (`namespace/name`) an imported certificate holds.
pub const CERTIFICATE: &str = "portico.dev/certificate";
/// The fingerprint of the material imported.
pub const FINGERPRINT: &str = "portico.dev/fingerprint";

/// One of Portico's imports: its ARN and what its tags say.
struct Imported {
    arn: String,
    certificate: String,
    fingerprint: String,
}

/// `frontend` with every PEM certificate replaced by a placeholder reference: what the plan
/// says about it once the imports exist.
pub(super) fn with_references(
    frontend: &ApplicationFrontend,
    arn: impl Fn(&str) -> String,
) -> ApplicationFrontend {
    let mut f = frontend.clone();
    if let Some(https) = &mut f.https {
        for c in &mut https.certificates {
            if matches!(c.source, CertificateSource::Pem { .. }) {
                c.source = CertificateSource::Reference { id: arn(&c.name) };
            }
        }
    }
    f
}

/// True when ACM refuses the caller (no permission, no ACM in this endpoint).
fn denied<E: aws_sdk_acm::error::ProvideErrorMetadata, R>(
    e: &aws_sdk_acm::error::SdkError<E, R>,
) -> bool {
    crate::error::code(e).is_some_and(|c| {
        c.starts_with("AccessDenied")
            || c == "UnrecognizedClientException"
            || c == "UnauthorizedOperation"
    })
}

impl AwsProvider {
    /// `frontend` with its PEM certificates imported (or found imported) and named by ARN;
    /// with the imports of this owner that it no longer uses.
    pub(super) async fn import_certificates(
        &self,
        spec: &LoadBalancerSpec,
        frontend: &ApplicationFrontend,
        served: &[String],
    ) -> Result<(ApplicationFrontend, Vec<String>), ProviderError> {
        let Some(acm) = self.acm().await else {
            return Ok((frontend.clone(), Vec::new()));
        };
        let pems: Vec<(&str, &str, &str)> = frontend
            .https
            .iter()
            .flat_map(|h| &h.certificates)
            .filter_map(|c| match &c.source {
                CertificateSource::Pem { chain, key } => {
                    Some((c.name.as_str(), chain.as_str(), key.as_str()))
                }
                CertificateSource::Reference { .. } => None,
            })
            .collect();
        // Certificates the user names by ARN are theirs; only the others can be imports.
        let named: BTreeSet<&str> = frontend
            .https
            .iter()
            .flat_map(|h| &h.certificates)
            .filter_map(|c| match &c.source {
                CertificateSource::Reference { id } => Some(id.as_str()),
                CertificateSource::Pem { .. } => None,
            })
            .collect();
        let candidates: Vec<String> = served
            .iter()
            .filter(|arn| !named.contains(arn.as_str()))
            .cloned()
            .collect();
        let mut known = self.imports_among(&candidates, &spec.owner).await?;
        let missing: Vec<&str> = pems
            .iter()
            .filter(|(name, ..)| !known.iter().any(|k| k.certificate == *name))
            .map(|(name, ..)| *name)
            .collect();
        if !missing.is_empty() {
            for found in self.find_imports(&spec.owner).await? {
                if !known.iter().any(|k| k.arn == found.arn) {
                    known.push(found);
                }
            }
        }

        let mut arns = std::collections::HashMap::new();
        for (name, chain, key) in &pems {
            let print = fingerprint(chain, key);
            let existing = known.iter().find(|k| k.certificate == *name);
            if let Some(k) = existing.filter(|k| k.fingerprint == print) {
                arns.insert(name.to_string(), k.arn.clone());
                continue;
            }
            let (leaf, rest) = split_chain(chain).ok_or_else(|| {
                ProviderError::Invalid(format!("TLS Secret {name:?}: tls.crt holds no certificate"))
            })?;
            let mut request = acm
                .import_certificate()
                .certificate(Blob::new(leaf))
                .private_key(Blob::new(key.as_bytes().to_vec()))
                .set_certificate_chain(rest.map(Blob::new));
            // A rotation lands on the same ARN: the listeners serving it need no change.
            if let Some(k) = existing {
                request = request.certificate_arn(&k.arn);
            }
            let out = request
                .send()
                .await
                .map_err(|e| from_sdk(&format!("importing certificate {name:?} into ACM"), e))?;
            let arn = out.certificate_arn().map(String::from).ok_or_else(|| {
                ProviderError::Unavailable("ImportCertificate returned no ARN".into())
            })?;
            // Tagged apart from the import, so a re-import (which takes no tags) keeps them.
            let tags = self.certificate_tags(spec, name, &print)?;
            acm.add_tags_to_certificate()
                .certificate_arn(&arn)
                .set_tags(Some(tags))
                .send()
                .await
                .map_err(|e| from_sdk("tagging an imported certificate", e))?;
            tracing::info!(lb = %spec.name, certificate = %name, %arn, "imported certificate into ACM");
            arns.insert(name.to_string(), arn);
        }
        let used: BTreeSet<&String> = arns.values().collect();
        let stale = known
            .iter()
            .filter(|k| !used.contains(&k.arn))
            .map(|k| k.arn.clone())
            .collect();
        Ok((with_references(frontend, |name| arns[name].clone()), stale))
    }

    fn certificate_tags(
        &self,
        spec: &LoadBalancerSpec,
        name: &str,
        print: &str,
    ) -> Result<Vec<AcmTag>, ProviderError> {
        tags::ownership(&spec.owner, &spec.name)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain([
                (CERTIFICATE.to_string(), name.to_string()),
                (FINGERPRINT.to_string(), print.to_string()),
            ])
            .map(|(k, v)| {
                AcmTag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|e| ProviderError::Unavailable(format!("building a tag: {e}")))
            })
            .collect()
    }

    /// Portico's imports for `owner` among `arns`.
    async fn imports_among(
        &self,
        arns: &[String],
        owner: &Ownership,
    ) -> Result<Vec<Imported>, ProviderError> {
        let Some(acm) = self.acm().await else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for arn in arns {
            let out = match acm
                .list_tags_for_certificate()
                .certificate_arn(arn)
                .send()
                .await
            {
                Ok(out) => out,
                // A certificate of someone else's account or gone: not ours either way.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) =>
                {
                    continue;
                }
                Err(e) if denied(&e) => {
                    tracing::warn!(
                        "no ACM access: TLS Secrets cannot be imported, nor earlier imports found"
                    );
                    return Ok(Vec::new());
                }
                Err(e) => return Err(from_sdk("reading certificate tags", e)),
            };
            let get = |key: &str| {
                out.tags()
                    .iter()
                    .find(|t| t.key() == key)
                    .and_then(|t| t.value())
                    .map(String::from)
            };
            let same_owner = get(tags::CLUSTER).as_deref() == Some(owner.cluster_id.as_str())
                && get(tags::OBJECT_UID).as_deref() == Some(owner.object_uid.as_str());
            if let (true, Some(certificate)) = (same_owner, get(CERTIFICATE)) {
                found.push(Imported {
                    arn: arn.clone(),
                    certificate,
                    fingerprint: get(FINGERPRINT).unwrap_or_default(),
                });
            }
        }
        Ok(found)
    }

    /// Portico's imports for `owner` in the account: among the imported certificates (not
    /// those ACM issued), the ones whose tags name it.
    async fn find_imports(&self, owner: &Ownership) -> Result<Vec<Imported>, ProviderError> {
        let Some(acm) = self.acm().await else {
            return Ok(Vec::new());
        };
        let mut arns = Vec::new();
        let mut token = None;
        loop {
            let out = match acm.list_certificates().set_next_token(token).send().await {
                Ok(out) => out,
                // Without ACM access nothing can have been imported; cleanup must not block
                // on it (a finalizer would wait forever).
                Err(e) if denied(&e) => {
                    tracing::warn!("no ACM access: no imported certificates to look for");
                    return Ok(Vec::new());
                }
                Err(e) => return Err(from_sdk("listing ACM certificates", e)),
            };
            arns.extend(
                out.certificate_summary_list()
                    .iter()
                    .filter(|s| s.r#type() == Some(&CertificateType::Imported))
                    .filter_map(|s| s.certificate_arn().map(String::from)),
            );
            token = out.next_token().map(String::from);
            if token.is_none() {
                break;
            }
        }
        self.imports_among(&arns, owner).await
    }

    /// Deletes imports that no listener serves any more.
    pub(super) async fn delete_imports(&self, arns: &[String]) -> Result<(), ProviderError> {
        let Some(acm) = self.acm().await else {
            return Ok(());
        };
        for arn in arns {
            match acm.delete_certificate().certificate_arn(arn).send().await {
                Ok(_) => tracing::info!(%arn, "deleted imported certificate"),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) => {}
                Err(e) => return Err(from_sdk("deleting an imported certificate", e)),
            }
        }
        Ok(())
    }

    /// Every import of `owner`, wherever it is (the load balancer is being deleted).
    pub(super) async fn delete_all_imports(&self, owner: &Ownership) -> Result<(), ProviderError> {
        let imports = self.find_imports(owner).await?;
        let arns: Vec<String> = imports.into_iter().map(|i| i.arn).collect();
        self.delete_imports(&arns).await
    }
}
