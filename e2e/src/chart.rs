//! Portico's Helm chart on a cluster, with a real Helm: install, upgrade, uninstall, and the
//! credentials of the ServiceAccount the chart creates, so an operator running on the host is
//! held to exactly the chart's RBAC by the API server.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::binaries::{MissingBinary, helm_binary};

/// The chart in this repository (`$PORTICO_CHART` overrides it).
pub fn chart_dir() -> PathBuf {
    std::env::var_os("PORTICO_CHART")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portico");
            dir.canonicalize().unwrap_or(dir)
        })
}

/// Where a release lives. The chart names its objects after the release (`portico` in a
/// release called `portico`, else `<release>-portico`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Default for Release {
    fn default() -> Self {
        Release {
            name: "portico".into(),
            namespace: "portico-system".into(),
        }
    }
}

impl Release {
    /// The chart's full name, as `portico.fullname` computes it without overrides.
    pub fn fullname(&self) -> String {
        if self.name.contains("portico") {
            self.name.clone()
        } else {
            format!("{}-portico", self.name)
        }
    }

    /// The ServiceAccount the operator runs as.
    pub fn service_account(&self) -> String {
        self.fullname()
    }
}

/// Helm pointed at one cluster, with its caches and configuration kept apart from the user's.
#[derive(Clone, Debug)]
pub struct Helm {
    program: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

/// Values for a release on a testbed: the local cloud at `local_cloud_api` is the default
/// provider. `extra` is merged over them (objects key by key).
pub fn local_values(local_cloud_api: std::net::SocketAddr, extra: &Value) -> Value {
    let mut values = json!({
        "providerConfig": {
            "provider": "local",
            "local": {"apiAddress": local_cloud_api.to_string()},
        },
    });
    merge(&mut values, extra);
    values
}

/// Merges `over` into `base` as Helm merges values files: objects key by key, anything else
/// replaced.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                merge(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, over) => *base = over.clone(),
    }
}

impl Helm {
    /// `home` holds Helm's cache, configuration and data, and the values files passed to it.
    pub fn new(kubeconfig: &Path, home: &Path) -> Result<Helm, MissingBinary> {
        Ok(Helm {
            program: helm_binary()?,
            kubeconfig: kubeconfig.to_path_buf(),
            home: home.to_path_buf(),
        })
    }

    /// Runs `helm <args>` against the cluster; its standard output, or an error carrying its
    /// standard error.
    pub async fn run<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        std::fs::create_dir_all(&self.home)?;
        let output = tokio::process::Command::new(&self.program)
            .args(&args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running {}", self.program.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        anyhow::ensure!(
            output.status.success(),
            "helm {} failed ({}):\n{}{stdout}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
        );
        Ok(stdout)
    }

    fn values_file(&self, release: &Release, values: &Value) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.home)?;
        let path = self.home.join(format!("{}-values.json", release.name));
        // JSON is YAML: Helm reads it as a values file.
        std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
        Ok(path)
    }

    /// `helm install` of the repository's chart; returns Helm's output (with NOTES.txt).
    pub async fn install(&self, release: &Release, values: &Value) -> anyhow::Result<String> {
        self.install_or_upgrade("install", release, values).await
    }

    /// `helm upgrade` of an installed release to `values` (nothing carried over).
    pub async fn upgrade(&self, release: &Release, values: &Value) -> anyhow::Result<String> {
        self.install_or_upgrade("upgrade", release, values).await
    }

    /// `helm upgrade --install`: installs the release, or upgrades it when it exists.
    pub async fn apply(&self, release: &Release, values: &Value) -> anyhow::Result<String> {
        self.install_or_upgrade("apply", release, values).await
    }

    async fn install_or_upgrade(
        &self,
        verb: &str,
        release: &Release,
        values: &Value,
    ) -> anyhow::Result<String> {
        let values = self.values_file(release, values)?;
        let mut args: Vec<OsString> = vec![
            if verb == "apply" { "upgrade" } else { verb }.into(),
            release.name.clone().into(),
            chart_dir().into(),
            "--namespace".into(),
            release.namespace.clone().into(),
            "--values".into(),
            values.into(),
            "--timeout".into(),
            "60s".into(),
        ];
        match verb {
            "install" => args.push("--create-namespace".into()),
            "apply" => args.extend(["--install".into(), "--create-namespace".into()]),
            _ => {}
        }
        self.run(args).await
    }

    pub async fn uninstall(&self, release: &Release) -> anyhow::Result<String> {
        self.run([
            "uninstall",
            &release.name,
            "--namespace",
            &release.namespace,
            "--timeout",
            "60s",
        ])
        .await
    }
}

/// A token for `release`'s ServiceAccount from the TokenRequest API (1.20 serves it; clusters
/// from 1.24 on create no token Secrets), valid for `lifetime`.
pub async fn service_account_token(
    admin: &kube::Client,
    release: &Release,
    lifetime: Duration,
) -> anyhow::Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &release.namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": lifetime.as_secs()},
    }))?;
    let name = release.service_account();
    let granted = accounts
        .create_token_request(&name, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!(
                "requesting a token for ServiceAccount {}/{name}",
                release.namespace
            )
        })?;
    Ok(granted.status.context("TokenRequest without status")?.token)
}

/// `admin` (a kubeconfig's text) with its user replaced by a bearer token: the same cluster,
/// server and CA, another identity.
pub fn kubeconfig_with_token(admin: &str, user: &str, token: &str) -> anyhow::Result<Value> {
    let mut config: Value = serde_yaml::from_str(admin).context("reading the kubeconfig")?;
    let context_name = config["current-context"]
        .as_str()
        .context("the kubeconfig has no current-context")?
        .to_string();
    let contexts = config["contexts"]
        .as_array_mut()
        .context("the kubeconfig has no contexts")?;
    let current = contexts
        .iter_mut()
        .find(|c| c["name"] == context_name.as_str())
        .context("the current context is not in the kubeconfig")?;
    current["context"]["user"] = json!(user);
    config["users"] = json!([{"name": user, "user": {"token": token}}]);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_name_follows_the_charts_helper() {
        let release = |name: &str| Release {
            name: name.into(),
            namespace: "ns".into(),
        };
        assert_eq!(release("portico").service_account(), "portico");
        assert_eq!(release("my-portico").service_account(), "my-portico");
        assert_eq!(release("lb").service_account(), "lb-portico");
    }

    #[test]
    fn values_merge_key_by_key_and_replace_the_rest() {
        let api = "127.20.1.251:8900".parse().unwrap();
        let values = local_values(
            api,
            &json!({"replicaCount": 0, "providerConfig": {"default": false}}),
        );
        assert_eq!(
            values,
            json!({
                "replicaCount": 0,
                "providerConfig": {
                    "provider": "local",
                    "local": {"apiAddress": "127.20.1.251:8900"},
                    "default": false,
                },
            })
        );
    }

    #[test]
    fn a_token_kubeconfig_keeps_the_cluster_and_changes_the_user() {
        let admin = r#"
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.20.1.250:6443", certificate-authority-data: Q0E=}
users:
- name: admin
  user: {client-certificate-data: Q0VSVA==, client-key-data: S0VZ}
contexts:
- name: ctx
  context: {cluster: c, user: admin, namespace: default}
current-context: ctx
"#;
        let config = kubeconfig_with_token(admin, "portico", "t0k3n").unwrap();
        assert_eq!(
            config["clusters"][0]["cluster"]["certificate-authority-data"],
            "Q0E="
        );
        assert_eq!(config["contexts"][0]["context"]["user"], "portico");
        assert_eq!(
            config["users"],
            json!([{"name": "portico", "user": {"token": "t0k3n"}}])
        );
    }
}
