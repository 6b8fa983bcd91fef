//! The state file: every load balancer's spec and address, so a restarted daemon serves the
//! same load balancers on the same addresses.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use portico_provider::LoadBalancerSpec;
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    pub load_balancers: Vec<StoredLoadBalancer>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredLoadBalancer {
    pub address: Ipv4Addr,
    pub spec: LoadBalancerSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a local cloud state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has state version {found}; this daemon understands {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Store { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; empty when there is no file yet. A file that cannot be understood is
    /// an error rather than an empty state: starting empty would free addresses that running
    /// Services still advertise.
    pub fn load(&self) -> Result<State, StoreError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: VERSION,
                    load_balancers: Vec::new(),
                });
            }
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if state.version != VERSION {
            return Err(StoreError::Version {
                path: self.path.clone(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Writes a temporary file beside the state file and renames it over, so a crash leaves
    /// either the old state or the new one, never half of each.
    pub fn save(&self, load_balancers: Vec<StoredLoadBalancer>) -> Result<(), StoreError> {
        let state = State {
            version: VERSION,
            load_balancers,
        };
        let json = serde_json::to_vec_pretty(&state).expect("the state always serializes");
        self.write_atomically(&json)
            .map_err(|source| StoreError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// [`Self::save`] off the async runtime's threads (it fsyncs).
    pub async fn save_async(
        &self,
        load_balancers: Vec<StoredLoadBalancer>,
    ) -> Result<(), StoreError> {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || store.save(load_balancers)).await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let mut tmp_name = self.path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // The rename itself is durable only once the directory is synced.
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portico_provider::*;

    use super::*;

    fn spec(name: &str) -> LoadBalancerSpec {
        LoadBalancerSpec {
            name: name.parse().unwrap(),
            owner: Ownership {
                cluster_id: "c1".into(),
                object_uid: format!("uid-{name}"),
                object_ref: format!("Service/default/{name}"),
            },
            requested_address: None,
            requested_address_name: None,
            source_ranges: vec!["127.90.0.0/16".parse().unwrap()],
            frontend: Frontend::Network(NetworkFrontend {
                listeners: vec![Listener {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    pool: TargetPool {
                        targets: vec![Target {
                            node: "n1".into(),
                            address: "127.90.0.100".parse().unwrap(),
                            port: 30080,
                            provider_id: None,
                        }],
                        health_check: HealthCheck::with_probe(Probe::Tcp { port: 30080 }),
                        affinity: SessionAffinity::ClientIp {
                            timeout: Duration::from_secs(30),
                        },
                        proxy_protocol: true,
                        preserve_client_ip: false,
                        drain_timeout: None,
                    },
                }],
            }),
        }
    }

    #[test]
    fn state_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("nested/dir/state.json"));
        assert!(store.load().unwrap().load_balancers.is_empty());

        let lbs = vec![
            StoredLoadBalancer {
                address: "127.90.0.1".parse().unwrap(),
                spec: spec("web"),
            },
            StoredLoadBalancer {
                address: "127.90.0.7".parse().unwrap(),
                spec: spec("dns"),
            },
        ];
        store.save(lbs.clone()).unwrap();
        assert_eq!(store.load().unwrap().load_balancers, lbs);

        // Saving again replaces the file and leaves no temporary file behind.
        store.save(lbs[..1].to_vec()).unwrap();
        assert_eq!(store.load().unwrap().load_balancers, lbs[..1]);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("nested/dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn an_unreadable_state_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(matches!(
            Store::new(&path).load(),
            Err(StoreError::Corrupt { .. })
        ));

        std::fs::write(&path, br#"{"version": 99, "loadBalancers": []}"#).unwrap();
        assert!(matches!(
            Store::new(&path).load(),
            Err(StoreError::Version { found: 99, .. })
        ));
    }
}
