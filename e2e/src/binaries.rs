//! Where the testbed finds the programs it runs: the cached control plane, etcd, and the
//! workspace's own binaries.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The Kubernetes version `e2e/scripts/install-control-plane.sh` builds.
pub const KUBERNETES_VERSION: &str = "1.20.2";
/// The cache key of the control-plane build: the version plus the one patch applied to it
/// (see `e2e/scripts/install-control-plane.sh`, which uses the same key).
pub const CONTROL_PLANE_BUILD: &str = "1.20.2-reflect2-1.0.2";

const INSTALL_HINT: &str = "run e2e/scripts/install-control-plane.sh (builds kube-apiserver and \
                            kube-controller-manager once per machine, about 10 minutes, and \
                            installs etcd)";

/// A program the testbed needs is not installed.
#[derive(Debug, thiserror::Error)]
#[error("{name} not found at {}: {hint}", path.display())]
pub struct MissingBinary {
    pub name: String,
    pub path: PathBuf,
    pub hint: &'static str,
}

/// `${PORTICO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/portico}`, as the install script computes it
/// (empty variables count as unset, like the shell's `:-`).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|name| env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("PORTICO_CACHE") {
        return dir;
    }
    let cache_home = set("XDG_CACHE_HOME").unwrap_or_else(|| {
        set("HOME")
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".cache")
    });
    cache_home.join("portico")
}

/// The directory holding the cached `kube-apiserver` and `kube-controller-manager`.
pub fn control_plane_bin_dir() -> PathBuf {
    cache_dir()
        .join(format!("kubernetes-{CONTROL_PLANE_BUILD}"))
        .join("bin")
}

/// A cached control-plane program (`kube-apiserver`, `kube-controller-manager`).
pub fn control_plane_binary(name: &str) -> Result<PathBuf, MissingBinary> {
    let path = control_plane_bin_dir().join(name);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(MissingBinary {
            name: name.to_owned(),
            path,
            hint: INSTALL_HINT,
        })
    }
}

/// etcd: `$PORTICO_ETCD`, else the first `etcd` on `PATH`, else Debian's `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, MissingBinary> {
    if let Some(path) = env::var_os("PORTICO_ETCD").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(MissingBinary {
                name: "etcd".into(),
                path,
                hint: "PORTICO_ETCD does not point at an executable",
            })
        };
    }
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|candidate| is_executable(candidate));
    let fallback = PathBuf::from("/usr/bin/etcd");
    match on_path {
        Some(path) => Ok(path),
        None if is_executable(&fallback) => Ok(fallback),
        None => Err(MissingBinary {
            name: "etcd".into(),
            path: fallback,
            hint: "apt-get install -y etcd-server (or run e2e/scripts/install-control-plane.sh)",
        }),
    }
}

/// The Helm version `e2e/scripts/install-helm.sh` installs.
pub const HELM_VERSION: &str = "v4.1.4";

/// Helm: `$PORTICO_HELM`, else the cached one `e2e/scripts/install-helm.sh` installs (a Helm
/// found elsewhere on `PATH` may be another major version, so it is not used by itself).
pub fn helm_binary() -> Result<PathBuf, MissingBinary> {
    let path = env::var_os("PORTICO_HELM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("helm-{HELM_VERSION}"))
                .join("helm")
        });
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(MissingBinary {
            name: "helm".into(),
            path,
            hint: "run e2e/scripts/install-helm.sh (or point PORTICO_HELM at a Helm v4 binary)",
        })
    }
}

/// A binary built from this workspace (`portico-testbed`, the operator, the local cloud).
///
/// Looks in `$PORTICO_BIN_DIR`, then next to the running executable and in its parent (tests
/// run from `target/<profile>/deps/`, binaries live in `target/<profile>/`).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(dir) = env::var_os("PORTICO_BIN_DIR").filter(|v| !v.is_empty()) {
        searched.push(PathBuf::from(dir));
    }
    let exe = env::current_exe()?;
    if let Some(dir) = exe.parent() {
        searched.push(dir.to_path_buf());
        if let Some(parent) = dir.parent() {
            searched.push(parent.to_path_buf());
        }
    }
    if let Some(found) = searched
        .iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
    {
        return Ok(found);
    }
    let searched: Vec<String> = searched.iter().map(|d| d.display().to_string()).collect();
    anyhow::bail!(
        "workspace binary {name:?} not found in {}; run `cargo build --workspace --bins` \
         (or point PORTICO_BIN_DIR at the directory holding it)",
        searched.join(", ")
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cache_dir_follows_the_install_script() {
        assert_eq!(
            cache_dir_from(vars(&[("PORTICO_CACHE", "/c"), ("HOME", "/h")])),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_dir_from(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            PathBuf::from("/x/portico")
        );
        assert_eq!(
            cache_dir_from(vars(&[("HOME", "/h")])),
            PathBuf::from("/h/.cache/portico")
        );
    }

    #[test]
    fn empty_variables_count_as_unset_like_the_shell() {
        assert_eq!(
            cache_dir_from(vars(&[
                ("PORTICO_CACHE", ""),
                ("XDG_CACHE_HOME", ""),
                ("HOME", "/h")
            ])),
            PathBuf::from("/h/.cache/portico")
        );
    }
}
