//! Writes the CRD manifests into a folder (default `charts/portico/crds`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("charts/portico/crds"));
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in portico_crds::generate::definitions() {
        let path = dir.join(file);
        std::fs::write(&path, portico_crds::generate::render(&crd))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
