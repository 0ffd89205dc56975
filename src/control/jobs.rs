//! Job records: one JSON file per job under `STORE/jobs/`, written by the mount that runs
//! the job and read by `.control/jobs`, `encimg job list` and `encimg job wait`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::err;
use crate::error::{Error, Result};
use crate::store::Progress;
use crate::sys;

/// A job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted, running.
    Running,
    /// Finished; the result is in the tree.
    Done,
    /// Ran and failed; nothing was left under the destination name.
    Failed,
    /// Refused when requested (the control-file write returned an errno).
    Rejected,
    /// Its daemon went away while it ran (resume it, or run it again).
    Interrupted,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::Interrupted => "interrupted",
        }
    }
    pub fn is_final(self) -> bool {
        self != JobState::Running
    }
}

/// One job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub op: String,
    pub source: String,
    pub destination: String,
    pub state: JobState,
    pub bytes: u64,
    pub total: u64,
    pub error: Option<String>,
    pub errno: Option<i32>,
    pub created: u64,
    pub updated: u64,
    pub pid: u32,
}

impl Job {
    pub fn percent(&self) -> u64 {
        match self.state {
            JobState::Done => 100,
            _ if self.total == 0 => 0,
            _ => (self.bytes.min(self.total) * 100) / self.total,
        }
    }

    /// The `jobs` line: id, op, source, destination, state, percent, bytes, error.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {}",
            self.id,
            self.op,
            self.source,
            self.destination,
            self.state.name(),
            self.percent(),
            self.bytes,
            self.error.as_deref().unwrap_or("-")
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "op": self.op,
            "source": self.source,
            "destination": self.destination,
            "state": self.state.name(),
            "percent": self.percent(),
            "bytes": self.bytes,
            "total": self.total,
            "error": self.error,
            "created": sys::rfc3339(self.created),
        })
    }
}

/// Whether the daemon that ran a job still runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if pid == 0 || unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

/// The jobs directory of a store.
#[derive(Clone, Debug)]
pub struct JobStore {
    dir: PathBuf,
}

impl JobStore {
    pub fn new(store_root: &Path) -> JobStore {
        JobStore {
            dir: store_root.join("jobs"),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// A new job record (state running unless `rejected` is given).
    pub fn create(&self, op: &str, source: &str, destination: &str) -> Result<Job> {
        sys::private_dir(&self.dir)?;
        let mut r = [0u8; 2];
        crate::crypto::random_fill(&mut r);
        let now = sys::now();
        // Ids sort in creation order: nanoseconds since the epoch, then a random tail.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let job = Job {
            id: format!("job-{nanos:016x}{}", hex::encode(r)),
            op: op.to_string(),
            source: source.to_string(),
            destination: destination.to_string(),
            state: JobState::Running,
            bytes: 0,
            total: 0,
            error: None,
            errno: None,
            created: now,
            updated: now,
            pid: std::process::id(),
        };
        self.save(&job)?;
        Ok(job)
    }

    pub fn save(&self, job: &Job) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(job).map_err(|e| err!(Io, "{e}"))?;
        sys::write_atomic(&self.path(&job.id), &bytes)
    }

    /// A job, with `running` shown as `interrupted` when its daemon is gone.
    pub fn get(&self, id: &str) -> Result<Job> {
        if !id.starts_with("job-") || !id[4..].bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(err!(InvalidInput, "invalid job id '{id}'"));
        }
        let bytes = std::fs::read(self.path(id)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                err!(NotFound, "no job {id}")
            } else {
                Error::from(e)
            }
        })?;
        let mut job: Job = serde_json::from_slice(&bytes)
            .map_err(|e| err!(Corrupt, "job {id} is damaged: {e}"))?;
        if job.state == JobState::Running && !alive(job.pid) {
            job.state = JobState::Interrupted;
        }
        Ok(job)
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Result<Vec<Job>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(j) = self.get(id) {
                out.push(j);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Wait until job `id` is no longer running.
    pub fn wait(&self, id: &str) -> Result<Job> {
        loop {
            let j = self.get(id)?;
            if j.state.is_final() {
                return Ok(j);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A running job's progress: kept in memory, saved at most every 200 ms.
pub struct JobProgress {
    store: JobStore,
    job: Mutex<(Job, Instant)>,
}

impl JobProgress {
    pub fn new(store: JobStore, job: Job) -> Arc<JobProgress> {
        Arc::new(JobProgress {
            store,
            job: Mutex::new((job, Instant::now())),
        })
    }

    fn with(&self, f: impl FnOnce(&mut Job), force: bool) {
        let mut g = self.job.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g.0);
        if force || g.1.elapsed() >= Duration::from_millis(200) {
            g.0.updated = sys::now();
            let _ = self.store.save(&g.0);
            g.1 = Instant::now();
        }
    }

    /// Record the outcome.
    pub fn finish(&self, r: &Result<()>) {
        self.with(
            |j| match r {
                Ok(()) => {
                    j.state = JobState::Done;
                    j.bytes = j.bytes.max(j.total);
                }
                Err(e) => {
                    j.state = JobState::Failed;
                    j.error = Some(e.message.clone());
                    j.errno = Some(e.errno());
                }
            },
            true,
        );
    }

    pub fn id(&self) -> String {
        self.job
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .id
            .clone()
    }
}

impl Progress for JobProgress {
    fn start(&self, total: u64) {
        self.with(|j| j.total = total, true);
    }
    fn add(&self, bytes: u64) {
        self.with(|j| j.bytes += bytes, false);
    }
}

impl Progress for Arc<JobProgress> {
    fn start(&self, total: u64) {
        (**self).start(total)
    }
    fn add(&self, bytes: u64) {
        (**self).add(bytes)
    }
}
