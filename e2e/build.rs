//! Sets `cfg(portico_kind)` where `kind` and `docker` are on `PATH`: the kind tests run there,
//! and elsewhere are compiled as ignored, so the test runner reports each as skipped by name.
//! (After installing kind without changing `PATH`, `touch e2e/build.rs`.)

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(portico_kind)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=PORTICO_KIND");
    let on_path = |name: &str| {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| is_executable(&dir.join(name)))
        })
    };
    let disabled = std::env::var("PORTICO_KIND").is_ok_and(|v| v == "0");
    if on_path("kind") && on_path("docker") && !disabled {
        println!("cargo::rustc-cfg=portico_kind");
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
