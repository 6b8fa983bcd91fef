//! The CRD YAML in the chart is exactly what the Rust types generate: change a type without
//! regenerating (`cargo run -p portico-crds --bin portico-crdgen`) and this fails.

use std::path::Path;

use portico_crds::generate::{definitions, render};

#[test]
fn the_charts_crd_manifests_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portico/crds");
    for (file, crd) in definitions() {
        let path = dir.join(file);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run portico-crdgen", path.display()));
        assert!(
            on_disk == render(&crd),
            "{} differs from the types in crds/src; run `cargo run -p portico-crds --bin portico-crdgen`",
            path.display()
        );
    }
}

#[test]
fn the_chart_holds_no_crd_the_types_do_not_generate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portico/crds");
    let expected: Vec<&str> = definitions().iter().map(|(f, _)| *f).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            expected.contains(&name.as_str()),
            "stray file {name} in {}",
            dir.display()
        );
    }
}
