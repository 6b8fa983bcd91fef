//! Starting, watching and stopping the cluster's processes.
//!
//! Two supervision modes share one spawn path:
//! - [`Supervision::Owned`]: the process dies with the thread that spawned it
//!   (`PR_SET_PDEATHSIG(SIGKILL)`), for tests, so a crashed or killed test run leaves nothing
//!   behind.
//! - [`Supervision::Detached`]: the process gets its own session and outlives
//!   `portico-testbed up`; `down` finds it again through its [`ProcessRecord`].
//!
//! A pid alone is not an identity (pids are recycled), so records also keep the process's start
//! time from `/proc/<pid>/stat`, and signals go through a pidfd opened and then checked against
//! that start time, which cannot hit a recycled pid.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long `stop`/`down` wait after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a SIGKILLed process to go (only a process stuck in the kernel takes
/// longer).
const KILL_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Environment variables children must not inherit: proxies (every dial is to loopback), etcd's
/// flag-equivalents and a stray kubeconfig would silently change the cluster.
fn is_scrubbed_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    matches!(
        upper.as_str(),
        "HTTP_PROXY" | "HTTPS_PROXY" | "ALL_PROXY" | "NO_PROXY" | "KUBECONFIG"
    ) || upper.starts_with("ETCD_")
        // A developer's real AWS credentials and settings never reach what the tests run.
        || upper.starts_with("AWS_")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervision {
    /// Dies with the spawning thread; killed when its handle is dropped.
    Owned,
    /// Own session, outlives the spawner.
    Detached,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Short name; also names the log file.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of the (scrubbed) inherited environment.
    pub env: Vec<(OsString, OsString)>,
}

/// A process as `cluster.json` remembers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: u32,
    /// Clock ticks since boot at which the process started (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// The parts of `/proc/<pid>/stat` the testbed needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the *last* `)`.
pub fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // state is field 3, starttime field 22.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

pub fn read_proc_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => Ok(parse_proc_stat(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether any thread of `pid` is neither a zombie nor dead.
fn other_threads_alive(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|text| parse_proc_stat(&text))
            .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
    })
}

impl ProcessRecord {
    /// Whether this very process (not a later one reusing its pid) still runs. A zombie does
    /// not count (it has released its ports and descriptors and only waits to be reaped), but
    /// only once all its threads are gone: a multi-threaded program's main thread can be a
    /// zombie while the others still hold its descriptors (its slot lock among them).
    pub fn is_running(&self) -> bool {
        match read_proc_stat(self.pid) {
            Ok(Some(stat)) if stat.start_time == self.start_time => {
                !matches!(stat.state, 'Z' | 'X') || other_threads_alive(self.pid)
            }
            _ => false,
        }
    }

    /// Sends `signal` if this process still runs; `Ok(false)` if it is gone.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<bool> {
        let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(false),
                // Kernels before 5.3: fall back to a checked kill.
                Some(libc::ENOSYS) => {
                    if !self.is_running() {
                        return Ok(false);
                    }
                    // SAFETY: plain syscall.
                    Ok(unsafe { libc::kill(pid, signal) } == 0)
                }
                _ => Err(err),
            };
        }
        // SAFETY: pidfd_open returned a fresh descriptor we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // The pidfd pins the process it was opened for; if that is ours (same start time), a
        // signal through it cannot reach anyone else even if the pid is recycled meanwhile.
        if !self.is_running() {
            return Ok(false);
        }
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(true)
        } else {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(false),
                _ => Err(err),
            }
        }
    }
}

/// A process this program spawned.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    record: ProcessRecord,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl ChildProcess {
    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn record(&self) -> &ProcessRecord {
        &self.record
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_exited(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Sends `signal` unless the process was already reaped (its pid may be reused then).
    pub fn signal(&mut self, signal: libc::c_int) {
        if matches!(self.try_exited(), Ok(None)) {
            // SAFETY: plain syscall; the pid is our unreaped child, so it cannot be recycled.
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        }
    }

    /// SIGKILL and reap, blocking; for `Drop`.
    pub fn kill_and_wait(&mut self) {
        self.signal(libc::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    /// Gives up ownership: the process keeps running (a detached one outlives us).
    pub fn detach(self) -> ProcessRecord {
        self.record
    }
}

/// Spawns `spec` with stdout and stderr appended to `log`.
///
/// `inherit_fd` (the slot lock) stays open in the child, so the child holds the slot too.
///
/// With [`Supervision::Owned`], the kernel kills the child when the *thread* that called this
/// exits — so call it from a thread that lives as long as the cluster should (a test's thread,
/// a runtime worker), never from `spawn_blocking`, whose threads exit when idle.
pub fn spawn(
    spec: &ProcessSpec,
    log: &Path,
    supervision: Supervision,
    inherit_fd: Option<RawFd>,
) -> io::Result<ChildProcess> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut log_file = OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(log_file, "# {}", command_line(spec))?;

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_scrubbed_env) {
            command.env_remove(name);
        }
    }
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: getpid is async-signal-safe and has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = inherit_fd
                && libc::fcntl(fd, libc::F_SETFD, 0) == -1
            {
                return Err(io::Error::last_os_error());
            }
            match supervision {
                Supervision::Owned => {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent died before prctl took effect: nobody will kill us.
                    if libc::getppid() != parent {
                        return Err(io::Error::other("parent exited during spawn"));
                    }
                }
                Supervision::Detached => {
                    if libc::setsid() == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("spawning {}: {e}", spec.program.display()),
        )
    })?;
    let pid = child.id();
    // The start time is fixed at fork, so reading it now is race-free: the child is ours and
    // unreaped.
    let start_time = read_proc_stat(pid)?
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat unreadable")))?
        .start_time;
    Ok(ChildProcess {
        child,
        record: ProcessRecord {
            name: spec.name.clone(),
            pid,
            start_time,
        },
        log: log.to_path_buf(),
        exited: None,
    })
}

fn command_line(spec: &ProcessSpec) -> String {
    std::iter::once(spec.program.as_os_str())
        .chain(spec.args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Something [`terminate`] can stop.
pub trait Stoppable {
    fn send(&mut self, signal: libc::c_int);
    fn is_gone(&mut self) -> bool;
    fn label(&self) -> String;
}

impl Stoppable for ChildProcess {
    fn send(&mut self, signal: libc::c_int) {
        self.signal(signal)
    }
    fn is_gone(&mut self) -> bool {
        !matches!(self.try_exited(), Ok(None))
    }
    fn label(&self) -> String {
        format!("{} (pid {})", self.record.name, self.record.pid)
    }
}

impl Stoppable for ProcessRecord {
    fn send(&mut self, signal: libc::c_int) {
        // A failure here means the process is gone or not ours to signal; is_gone decides.
        let _ = ProcessRecord::signal(self, signal);
    }
    fn is_gone(&mut self) -> bool {
        !self.is_running()
    }
    fn label(&self) -> String {
        format!("{} (pid {})", self.name, self.pid)
    }
}

/// Could not get rid of some processes even with SIGKILL.
#[derive(Debug, thiserror::Error)]
#[error("still running after SIGKILL: {}", .0.join(", "))]
pub struct Survivors(pub Vec<String>);

/// SIGTERM, up to `grace` to exit, then SIGKILL; returns once every process is gone.
pub async fn terminate<P: Stoppable>(
    processes: &mut [P],
    grace: Duration,
) -> Result<(), Survivors> {
    for p in processes.iter_mut() {
        p.send(libc::SIGTERM);
    }
    if wait_gone(processes, grace).await {
        return Ok(());
    }
    for p in processes.iter_mut() {
        if !p.is_gone() {
            p.send(libc::SIGKILL);
        }
    }
    if wait_gone(processes, KILL_WAIT).await {
        return Ok(());
    }
    Err(Survivors(
        processes
            .iter_mut()
            .filter_map(|p| (!p.is_gone()).then(|| p.label()))
            .collect(),
    ))
}

async fn wait_gone<P: Stoppable>(processes: &mut [P], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if processes.iter_mut().all(|p| p.is_gone()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(text) = fs::read_to_string(path) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (etcd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 55 12 0 0 20 0 \
                        14 0 987654 1234567 890 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 \
                        1 0 0 0 0 0";

    #[test]
    fn start_time_is_field_22_of_proc_stat() {
        assert_eq!(
            parse_proc_stat(STAT),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
    }

    #[test]
    fn command_names_with_spaces_and_parentheses_do_not_shift_fields() {
        let tricky = STAT.replace("(etcd)", "(we ird) Z (name)");
        assert_eq!(parse_proc_stat(&tricky).unwrap().start_time, 987654);
        assert_eq!(parse_proc_stat(&tricky).unwrap().state, 'S');
    }

    #[test]
    fn truncated_stat_lines_are_rejected() {
        assert_eq!(parse_proc_stat("4242 (etcd) S 1 2 3"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn our_own_process_is_running_and_a_record_with_another_start_time_is_not() {
        let pid = std::process::id();
        let stat = read_proc_stat(pid).unwrap().unwrap();
        let me = ProcessRecord {
            name: "me".into(),
            pid,
            start_time: stat.start_time,
        };
        assert!(me.is_running());
        let recycled = ProcessRecord {
            start_time: stat.start_time + 1,
            ..me.clone()
        };
        assert!(!recycled.is_running());
        // Never signals a process whose start time does not match.
        assert!(!recycled.signal(0).unwrap());
    }

    #[test]
    fn proxy_and_etcd_variables_are_not_inherited() {
        assert!(is_scrubbed_env("https_proxy"));
        assert!(is_scrubbed_env("ETCD_DATA_DIR"));
        assert!(is_scrubbed_env("KUBECONFIG"));
        assert!(!is_scrubbed_env("PATH"));
    }

    #[tokio::test]
    async fn terminate_stops_an_owned_child_and_records_see_it_gone() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ProcessSpec {
            name: "sleeper".into(),
            program: "/bin/sleep".into(),
            args: vec!["600".into()],
            env: Vec::new(),
        };
        let mut child = spawn(
            &spec,
            &dir.path().join("sleeper.log"),
            Supervision::Owned,
            None,
        )
        .unwrap();
        let record = child.record().clone();
        assert!(record.is_running());
        terminate(std::slice::from_mut(&mut child), STOP_GRACE)
            .await
            .unwrap();
        assert!(!record.is_running());
        let log = fs::read_to_string(dir.path().join("sleeper.log")).unwrap();
        assert!(log.starts_with("# /bin/sleep 600"));
    }

    #[tokio::test]
    async fn terminate_stops_a_detached_process_by_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ProcessSpec {
            name: "sleeper".into(),
            program: "/bin/sleep".into(),
            args: vec!["600".into()],
            env: Vec::new(),
        };
        let child = spawn(
            &spec,
            &dir.path().join("s.log"),
            Supervision::Detached,
            None,
        )
        .unwrap();
        let mut record = child.record().clone();
        // As `down` would: only the record, not the handle. Reap in the background so the
        // zombie does not linger in this test process.
        let reaper = std::thread::spawn(move || child.kill_and_wait_after_exit());
        terminate(std::slice::from_mut(&mut record), STOP_GRACE)
            .await
            .unwrap();
        reaper.join().unwrap();
        assert!(!record.is_running());
    }

    #[test]
    fn an_owned_child_dies_with_the_thread_that_spawned_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("orphan.log");
        let record = std::thread::spawn(move || {
            let spec = ProcessSpec {
                name: "orphan".into(),
                program: "/bin/sleep".into(),
                args: vec!["600".into()],
                env: Vec::new(),
            };
            let child = spawn(&spec, &log, Supervision::Owned, None).unwrap();
            child.record().clone()
            // The handle is dropped without killing; only the thread's exit can stop it.
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while record.is_running() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        assert!(
            !record.is_running(),
            "the child outlived its spawning thread"
        );
        // SAFETY: reaping our own child by pid.
        unsafe { libc::waitpid(record.pid as libc::pid_t, std::ptr::null_mut(), 0) };
    }

    impl ChildProcess {
        fn kill_and_wait_after_exit(mut self) {
            let _ = self.child.wait();
        }
    }
}
