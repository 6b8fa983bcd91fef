//! A cluster's state directory and `cluster.json`, the record that lets `down` (or a later
//! `up`) find a detached cluster's processes again.
//!
//! ```text
//! <state>/cluster.json                   slot, nodes, processes (pid + start time)
//! <state>/admin.kubeconfig               context `portico-testbed`
//! <state>/controller-manager.kubeconfig
//! <state>/agent.json                     the simulated nodes' AgentConfig
//! <state>/pki/                           CA, serving cert, service-account keys
//! <state>/etcd/                          etcd's data
//! <state>/logs/<process>.log
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::address_plan::AddressPlan;
use crate::certs::PkiFiles;
use crate::process::ProcessRecord;

/// The paths inside a state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

const FILES: &[&str] = &[
    "cluster.json",
    "cluster.json.tmp",
    "admin.kubeconfig",
    "controller-manager.kubeconfig",
    "agent.json",
];
const DIRS: &[&str] = &["pki", "etcd", "logs", "portico"];

impl StateLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn cluster_record(&self) -> PathBuf {
        self.root.join("cluster.json")
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("admin.kubeconfig")
    }
    pub fn controller_manager_kubeconfig(&self) -> PathBuf {
        self.root.join("controller-manager.kubeconfig")
    }
    pub fn agent_config(&self) -> PathBuf {
        self.root.join("agent.json")
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn pki_files(&self) -> PkiFiles {
        PkiFiles::in_dir(&self.pki_dir())
    }
    pub fn etcd_data_dir(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log(&self, process: &str) -> PathBuf {
        self.logs_dir().join(format!("{process}.log"))
    }

    /// Creates the directory tree.
    pub fn create(&self) -> io::Result<()> {
        for dir in DIRS {
            fs::create_dir_all(self.root.join(dir))?;
        }
        // etcd refuses data dirs others can read.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.etcd_data_dir(), fs::Permissions::from_mode(0o700))
    }

    /// Waits for, then holds, the exclusive right to start or stop the cluster in this
    /// directory, so two `up`s at once cannot both start a cluster into it. The lock file
    /// lives beside the slot locks, keyed by the directory's absolute path, because the
    /// directory itself comes and goes.
    pub fn lock(&self) -> io::Result<fs::File> {
        use std::os::fd::AsRawFd;
        let absolute = std::path::absolute(&self.root)?;
        fs::create_dir_all(crate::slot::SLOT_DIR)?;
        let path = Path::new(crate::slot::SLOT_DIR).join(format!(
            "state-{:016x}.lock",
            fnv1a(absolute.as_os_str().as_encoded_bytes())
        ));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Removes what a cluster put into the directory, and the directory itself if that leaves
    /// it empty. Only known entries go, so a mistaken `--state-dir ~` loses nothing else.
    pub fn clear(&self) -> io::Result<()> {
        for file in FILES {
            remove(fs::remove_file(self.root.join(file)))?;
        }
        for dir in DIRS {
            remove(fs::remove_dir_all(self.root.join(dir)))?;
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// A hash that is stable across builds and processes (std's hasher promises neither).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn remove(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What `cluster.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterRecord {
    pub slot: u8,
    pub nodes: u8,
    pub kubeconfig: PathBuf,
    /// In start order.
    pub processes: Vec<ProcessRecord>,
}

impl ClusterRecord {
    pub fn plan(&self) -> AddressPlan {
        AddressPlan::new(self.slot)
    }

    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let record: ClusterRecord = serde_json::from_str(text)?;
        if !(1..=199).contains(&record.slot) {
            return Err(serde::de::Error::custom(format!(
                "slot {} outside 1..=199",
                record.slot
            )));
        }
        Ok(record)
    }

    /// `None` if there is no record.
    pub fn load(path: &Path) -> io::Result<Option<Self>> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes atomically (temp file + rename), so a crash never leaves half a record.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(&tmp, text + "\n")?;
        fs::rename(&tmp, path)
    }

    /// The processes still running.
    pub fn running(&self) -> Vec<&ProcessRecord> {
        self.processes.iter().filter(|p| p.is_running()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ClusterRecord {
        ClusterRecord {
            slot: 1,
            nodes: 3,
            kubeconfig: "/tmp/portico-testbed/admin.kubeconfig".into(),
            processes: vec![
                ProcessRecord {
                    name: "etcd".into(),
                    pid: 100,
                    start_time: 5000,
                },
                ProcessRecord {
                    name: "kube-apiserver".into(),
                    pid: 101,
                    start_time: 5001,
                },
            ],
        }
    }

    #[test]
    fn a_record_survives_a_round_trip_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        record().save(&path).unwrap();
        assert_eq!(ClusterRecord::load(&path).unwrap(), Some(record()));
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn the_record_format_is_stable() {
        let text = r#"{
            "slot": 7, "nodes": 2, "kubeconfig": "/s/admin.kubeconfig",
            "processes": [{"name": "etcd", "pid": 42, "start_time": 123456}]
        }"#;
        let parsed = ClusterRecord::parse(text).unwrap();
        assert_eq!(parsed.plan(), AddressPlan::new(7));
        assert_eq!(parsed.processes[0].pid, 42);
        assert_eq!(parsed.processes[0].start_time, 123456);
    }

    #[test]
    fn records_with_impossible_slots_or_missing_start_times_are_rejected() {
        let no_start_time = r#"{"slot": 7, "nodes": 2, "kubeconfig": "/k", "processes": [{"name": "etcd", "pid": 42}]}"#;
        assert!(ClusterRecord::parse(no_start_time).is_err());
        let bad_slot = r#"{"slot": 0, "nodes": 2, "kubeconfig": "/k", "processes": []}"#;
        assert!(ClusterRecord::parse(bad_slot).is_err());
    }

    #[test]
    fn the_state_lock_is_exclusive_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(dir.path().join("a"));
        let _held = layout.lock().unwrap();
        let path = Path::new(crate::slot::SLOT_DIR).join(format!(
            "state-{:016x}.lock",
            fnv1a(dir.path().join("a").as_os_str().as_encoded_bytes())
        ));
        let other = fs::File::open(path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, -1, "a second holder got the lock");
        // Another directory is independent.
        let _other_dir = StateLayout::new(dir.path().join("b")).lock().unwrap();
    }

    #[test]
    fn a_missing_record_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ClusterRecord::load(&dir.path().join("cluster.json")).unwrap(),
            None
        );
    }

    #[test]
    fn clear_removes_only_what_a_cluster_creates() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(dir.path().join("state"));
        layout.create().unwrap();
        record().save(&layout.cluster_record()).unwrap();
        fs::write(layout.log("etcd"), "log").unwrap();
        fs::write(layout.root().join("precious.txt"), "keep me").unwrap();

        layout.clear().unwrap();
        assert!(!layout.cluster_record().exists());
        assert!(!layout.logs_dir().exists());
        assert!(layout.root().join("precious.txt").exists());

        fs::remove_file(layout.root().join("precious.txt")).unwrap();
        layout.clear().unwrap();
        assert!(!layout.root().exists());
    }
}
