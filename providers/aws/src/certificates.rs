//! TLS Secrets as ACM wants them, by pure code: the leaf apart from its chain, and a
//! fingerprint of the material so a reconcile can tell an unchanged Secret from a rotated one
//! without reading the certificate back.

/// `(leaf, chain)` of a PEM bundle: the first certificate, and the ones after it (`None`
/// when there are none). `None` when the text holds no certificate.
pub fn split_chain(pem: &str) -> Option<(String, Option<String>)> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let after = &rest[start..];
        let end = after.find(END)? + END.len();
        blocks.push(after[..end].to_string());
        rest = &after[end..];
    }
    let (leaf, chain) = blocks.split_first()?;
    Some((
        format!("{leaf}\n"),
        (!chain.is_empty()).then(|| format!("{}\n", chain.join("\n"))),
    ))
}

/// A short, stable fingerprint of a certificate and key (64 bits, hex): equal material,
/// equal fingerprint, across Rust releases.
pub fn fingerprint(chain: &str, key: &str) -> String {
    let hash = portico_provider::naming::stable_hash(chain.bytes().chain([0]).chain(key.bytes()));
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAF: &str = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----";
    const CA: &str = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";

    #[test]
    fn the_leaf_is_imported_apart_from_its_chain() {
        let (leaf, chain) = split_chain(&format!("{LEAF}\n{CA}\n")).unwrap();
        assert_eq!(leaf, format!("{LEAF}\n"));
        assert_eq!(chain.as_deref(), Some(format!("{CA}\n").as_str()));
        assert_eq!(split_chain(LEAF).unwrap().1, None);
        assert_eq!(split_chain("no certificate here"), None);
    }

    #[test]
    fn the_fingerprint_changes_with_the_material_only() {
        assert_eq!(fingerprint(LEAF, "k"), fingerprint(LEAF, "k"));
        assert_ne!(fingerprint(LEAF, "k"), fingerprint(CA, "k"));
        assert_ne!(fingerprint(LEAF, "k"), fingerprint(LEAF, "k2"));
        assert_eq!(fingerprint(LEAF, "k").len(), 16);
    }
}
