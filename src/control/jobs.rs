//! Job records: one JSON file per job under `STORE/jobs/`, written by the mount that runs
//! the job and read by `.control/jobs`, `encimg job list` and `encimg job wait`. A record
//! that cannot be written (the disk is full) is kept in the mount's memory instead, so
//! `.control/jobs` still shows it (a refusal for lack of space included).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// Stopped on request (`encimg job cancel`, `.control/cancel`); nothing was left under
    /// the destination name.
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::Interrupted => "interrupted",
            JobState::Cancelled => "cancelled",
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
    /// The failure's kind (`ErrorKind`'s name): the exit code a CLI following the job gives,
    /// which the errno alone does not always tell (EIO is damage or a failed write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub created: u64,
    pub updated: u64,
    pub pid: u32,
}

impl Job {
    /// The id of a job made now without its random tail: every job made later has a
    /// greater id (ids sort in creation order).
    pub fn id_floor() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        format!("job-{nanos:016x}")
    }

    /// The kind of error a failed job ended with: as recorded, else from its errno.
    pub fn error_kind(&self) -> crate::error::ErrorKind {
        self.kind
            .as_deref()
            .and_then(crate::error::ErrorKind::from_name)
            .or(self.errno.map(crate::error::ErrorKind::from_errno))
            .unwrap_or(crate::error::ErrorKind::Io)
    }

    /// A new running job of this process. Ids sort in creation order: nanoseconds since the
    /// epoch, then a random tail.
    pub fn new(op: &str, source: &str, destination: &str) -> Job {
        let mut r = [0u8; 2];
        crate::crypto::random_fill(&mut r);
        let now = sys::now();
        Job {
            id: format!("{}{}", Job::id_floor(), hex::encode(r)),
            op: op.to_string(),
            source: source.to_string(),
            destination: destination.to_string(),
            state: JobState::Running,
            bytes: 0,
            total: 0,
            error: None,
            errno: None,
            kind: None,
            created: now,
            updated: now,
            pid: std::process::id(),
        }
    }

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

/// Ended jobs kept in a store's records (the newest), and for how long (seconds): what a
/// cloud console's task list keeps, about.
const KEEP_ENDED: usize = 1000;
const KEEP_FOR: u64 = 7 * 24 * 3600;

/// The jobs directory of a store, and the records this process could not write to it.
#[derive(Clone, Debug)]
pub struct JobStore {
    dir: PathBuf,
    unsaved: Arc<Mutex<Vec<Job>>>,
}

impl JobStore {
    pub fn new(store_root: &Path) -> JobStore {
        JobStore {
            dir: store_root.join("jobs"),
            unsaved: Arc::default(),
        }
    }

    /// Remove temporary files that writers killed mid-write left behind, and the records of
    /// jobs long over (see [`JobStore::prune`]).
    pub fn sweep(&self) {
        sys::sweep_temps(&self.dir);
        self.prune(KEEP_ENDED, KEEP_FOR);
    }

    /// Forget ended jobs (done, failed, rejected, cancelled, or interrupted: running in a
    /// process that is gone) last updated more than `age` seconds ago, and all but the
    /// newest `keep` of them: a mount's refusals are recorded too, so the records would
    /// otherwise grow without end. A job still running is never forgotten.
    pub fn prune(&self, keep: usize, age: u64) {
        let Ok(jobs) = self.list() else { return };
        let now = sys::now();
        let (old, recent): (Vec<&Job>, Vec<&Job>) = jobs
            .iter()
            .filter(|j| j.state.is_final())
            .partition(|j| now.saturating_sub(j.updated) > age);
        // Oldest first (ids sort in creation order).
        let surplus = recent.len().saturating_sub(keep);
        for j in old.into_iter().chain(recent.into_iter().take(surplus)) {
            let _ = std::fs::remove_file(self.path(&j.id));
        }
    }

    /// A refused request's record (`rejected`, with the reason and its errno); kept in memory
    /// if it cannot be written.
    pub fn reject(&self, op: &str, source: &str, destination: &str, e: &Error) {
        let mut j = Job::new(op, source, destination);
        j.state = JobState::Rejected;
        j.error = Some(e.message.clone());
        j.errno = Some(e.errno());
        j.kind = Some(format!("{:?}", e.kind));
        self.save_or_keep(&j);
    }

    /// Save `job`, or keep it in memory (shown by `list` in its place) if it cannot be.
    /// Once a save works again, the records kept meanwhile are written too.
    pub fn save_or_keep(&self, job: &Job) {
        let saved = self.save(job).is_ok();
        let mut m = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|j| j.id != job.id);
        if !saved {
            m.push(job.clone());
        } else {
            m.retain(|j| self.save(j).is_err());
        }
    }

    /// Write the records kept in memory (at unmount, and whenever a save works again).
    pub fn flush(&self) {
        let mut m = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|j| self.save(j).is_err());
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// A new running job's record, written to the store.
    pub fn create(&self, op: &str, source: &str, destination: &str) -> Result<Job> {
        sys::private_dir(&self.dir)?;
        let job = Job::new(op, source, destination);
        self.save(&job)
            .map_err(|e| e.context("recording the job"))?;
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
        if let Some(j) = self
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|j| j.id == id)
        {
            return Ok(j.clone());
        }
        let bytes = sys::read_regular(&self.path(id), 1 << 20).map_err(|e| {
            if e.kind == crate::error::ErrorKind::NotFound {
                err!(NotFound, "no job {id}")
            } else {
                e
            }
        })?;
        let mut job: Job = serde_json::from_slice(&bytes)
            .map_err(|e| err!(Corrupt, "job {id} is damaged: {e}"))?;
        if job.state == JobState::Running && !sys::process_alive(job.pid) {
            job.state = JobState::Interrupted;
        }
        Ok(job)
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Result<Vec<Job>> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(j) = self.get(id) {
                out.push(j);
            }
        }
        for j in self
            .unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if !out.iter().any(|o| o.id == j.id) {
                out.push(j.clone());
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
    /// [`RUNNING`], [`CANCEL_ASKED`], [`FINISHING`] or [`ENDED`].
    phase: AtomicU8,
}

/// What a cancel finds a job doing.
const RUNNING: u8 = 0;
const CANCEL_ASKED: u8 = 1;
/// Its result is whole and being put in place: too late to cancel.
const FINISHING: u8 = 2;
const ENDED: u8 = 3;

/// Where a job is (see [`JobProgress::phase`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    Running,
    /// Asked to stop; stops at its next chunk.
    Stopping,
    /// Putting its result in place.
    Finishing,
    Ended,
}

/// The answer to [`JobProgress::cancel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelAnswer {
    /// It stops at its next chunk, and ends `cancelled`.
    Stopping,
    /// Its result is being put in place: it ends `done` (or failed).
    TooLate,
    /// It has ended.
    Ended,
}

impl JobProgress {
    pub fn new(store: JobStore, job: Job) -> Arc<JobProgress> {
        Arc::new(JobProgress {
            store,
            job: Mutex::new((job, Instant::now())),
            phase: AtomicU8::new(RUNNING),
        })
    }

    /// Ask the job to stop: unless its result is already being put in place, it fails
    /// cleanly (as any failure, nothing is left under the destination name) at its next
    /// chunk, and ends `cancelled`.
    pub fn cancel(&self) -> CancelAnswer {
        match self
            .phase
            .compare_exchange(RUNNING, CANCEL_ASKED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(CANCEL_ASKED) => CancelAnswer::Stopping,
            Err(FINISHING) => CancelAnswer::TooLate,
            Err(_) => CancelAnswer::Ended,
        }
    }

    /// The job's operation (`copy`, `rekey`, `snapshot`).
    pub fn op(&self) -> String {
        self.job
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .op
            .clone()
    }

    fn with(&self, f: impl FnOnce(&mut Job), force: bool) {
        let mut g = self.job.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g.0);
        if force || g.1.elapsed() >= Duration::from_millis(200) {
            g.0.updated = sys::now();
            self.store.save_or_keep(&g.0);
            g.1 = Instant::now();
        }
    }

    /// Where the job is, for an unmount deciding whether to wait for it.
    pub fn phase(&self) -> JobPhase {
        match self.phase.load(Ordering::SeqCst) {
            RUNNING => JobPhase::Running,
            CANCEL_ASKED => JobPhase::Stopping,
            FINISHING => JobPhase::Finishing,
            _ => JobPhase::Ended,
        }
    }

    /// At unmount, a job asked to stop that has not yet: record it `cancelled` now. It can
    /// no longer put a result in place (that needs [`Progress::finishing`], which a job
    /// asked to stop is refused), so nothing will be left under its destination name;
    /// what it wrote under a temporary name is swept when the store is next opened. False
    /// if the job was not stopping (it ended meanwhile, or was never asked).
    pub fn end_cancelled(&self) -> bool {
        if self
            .phase
            .compare_exchange(CANCEL_ASKED, ENDED, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        self.record(&Err(Error::new(
            crate::error::ErrorKind::Cancelled,
            "cancelled",
        )));
        true
    }

    /// Record the outcome, once: a job already recorded as ended (cancelled at unmount)
    /// keeps that record.
    pub fn finish(&self, r: &Result<()>) {
        if self.phase.swap(ENDED, Ordering::SeqCst) != ENDED {
            self.record(r);
        }
    }

    fn record(&self, r: &Result<()>) {
        self.with(
            |j| match r {
                Ok(()) => {
                    j.state = JobState::Done;
                    j.bytes = j.bytes.max(j.total);
                }
                Err(e) => {
                    let cancelled = e.kind == crate::error::ErrorKind::Cancelled;
                    j.state = if cancelled {
                        JobState::Cancelled
                    } else {
                        JobState::Failed
                    };
                    // Not where the stop was noticed ("copying into …: cancelled").
                    j.error = Some(if cancelled {
                        "cancelled".to_string()
                    } else {
                        e.message.clone()
                    });
                    j.errno = Some(e.errno());
                    j.kind = Some(format!("{:?}", e.kind));
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
    fn cancelled(&self) -> bool {
        // Ended while still running: recorded `cancelled` at unmount.
        matches!(self.phase.load(Ordering::SeqCst), CANCEL_ASKED | ENDED)
    }
    fn finishing(&self) -> bool {
        match self
            .phase
            .compare_exchange(RUNNING, FINISHING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(FINISHING) => true,
            Err(_) => false,
        }
    }
}

impl Progress for Arc<JobProgress> {
    fn start(&self, total: u64) {
        (**self).start(total)
    }
    fn add(&self, bytes: u64) {
        (**self).add(bytes)
    }
    fn cancelled(&self) -> bool {
        (**self).cancelled()
    }
    fn finishing(&self) -> bool {
        (**self).finishing()
    }
}

/// One job's progress shared by `n` parts doing the same amount of work each (the
/// destinations of a cross-region copy).
pub struct Shared {
    job: Arc<JobProgress>,
    n: u64,
}

impl Shared {
    pub fn new(job: Arc<JobProgress>, n: u64) -> Shared {
        Shared { job, n }
    }
}

impl Progress for Shared {
    fn start(&self, total: u64) {
        self.job.start(total * self.n);
    }
    fn add(&self, bytes: u64) {
        self.job.add(bytes);
    }
    fn cancelled(&self) -> bool {
        self.job.cancelled()
    }
    fn finishing(&self) -> bool {
        self.job.finishing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A cancel either stops a job before its result is put in place, or is refused as too
    /// late once that has begun: never both (a cancel accepted, then the result made).
    #[test]
    fn a_cancel_is_answered_by_where_the_job_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(dir.path());
        let p = JobProgress::new(store.clone(), store.create("copy", "a", "b").unwrap());
        assert!(
            !p.cancelled() && p.finishing(),
            "nothing asked: it finishes"
        );
        assert_eq!(p.cancel(), CancelAnswer::TooLate);
        assert!(!p.cancelled());
        p.finish(&Ok(()));
        assert_eq!(p.cancel(), CancelAnswer::Ended);
        assert_eq!(store.get(&p.id()).unwrap().state, JobState::Done);

        let p = JobProgress::new(store.clone(), store.create("copy", "a", "c").unwrap());
        assert_eq!(p.cancel(), CancelAnswer::Stopping);
        assert_eq!(p.cancel(), CancelAnswer::Stopping, "twice is the same");
        assert!(
            p.cancelled() && !p.finishing(),
            "its result is not put in place"
        );
        p.finish(&Err(Error::new(
            ErrorKind::Cancelled,
            "copying into x: cancelled",
        )));
        let j = store.get(&p.id()).unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(j.error.as_deref(), Some("cancelled"));
        assert_eq!(j.error_kind(), ErrorKind::Cancelled);
    }

    /// At unmount, a job asked to stop is recorded `cancelled` whether or not its thread got
    /// there, and keeps that record: its thread, still running until the daemon exits, is
    /// told to stop, cannot put a result in place, and does not record over it.
    #[test]
    fn a_job_asked_to_stop_is_recorded_cancelled_at_unmount() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(dir.path());
        let p = JobProgress::new(store.clone(), store.create("copy", "a", "b").unwrap());
        assert!(!p.end_cancelled(), "not asked: it is left running");
        assert_eq!(p.phase(), JobPhase::Running);
        assert_eq!(p.cancel(), CancelAnswer::Stopping);
        assert_eq!(p.phase(), JobPhase::Stopping);
        assert!(p.end_cancelled());
        assert!(!p.end_cancelled(), "once");
        assert_eq!(p.phase(), JobPhase::Ended);
        assert!(p.cancelled() && !p.finishing());
        p.add(5);
        p.finish(&Err(Error::new(ErrorKind::Io, "the volume was closed")));
        let j = store.get(&p.id()).unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(j.error.as_deref(), Some("cancelled"));
        assert_eq!(j.error_kind(), ErrorKind::Cancelled);

        // One putting its result in place is not: it ends as its thread says.
        let p = JobProgress::new(store.clone(), store.create("copy", "a", "c").unwrap());
        assert!(p.finishing());
        assert_eq!(p.phase(), JobPhase::Finishing);
        assert!(!p.end_cancelled());
        p.finish(&Ok(()));
        assert_eq!(store.get(&p.id()).unwrap().state, JobState::Done);
    }

    /// Ended jobs are forgotten once old, or past the newest `keep`; running ones never
    /// (a job of this process is running; one of a process that is gone is interrupted).
    #[test]
    fn ended_jobs_are_pruned_by_age_and_count_running_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(dir.path());
        let now = sys::now();
        let mut ids = Vec::new();
        for (i, (state, age)) in [
            (JobState::Done, 30 * 24 * 3600),
            (JobState::Running, 30 * 24 * 3600),
            (JobState::Failed, 10),
            (JobState::Rejected, 9),
            (JobState::Cancelled, 8),
            (JobState::Done, 7),
        ]
        .into_iter()
        .enumerate()
        {
            let mut j = store.create("copy", "a", &format!("d{i}")).unwrap();
            j.state = state;
            j.updated = now - age;
            store.save(&j).unwrap();
            ids.push(j.id);
            std::thread::sleep(Duration::from_millis(2));
        }
        // An interrupted one: running in a process that is gone.
        let mut gone = store.create("copy", "a", "gone").unwrap();
        gone.pid = 0x7fff_fff0; // above any pid_max: no such process
        gone.updated = now - 30 * 24 * 3600;
        store.save(&gone).unwrap();
        store.prune(3, 7 * 24 * 3600);
        let left: Vec<String> = store.list().unwrap().into_iter().map(|j| j.id).collect();
        // The old done and the old interrupted go by age; of the four recent ended ones,
        // the oldest goes by count; the running one stays.
        assert_eq!(
            left,
            vec![
                ids[1].clone(),
                ids[3].clone(),
                ids[4].clone(),
                ids[5].clone()
            ]
        );
    }

    /// A failed job keeps its error's kind: a CLI following it exits as the same failure
    /// run in place would (EACCES alone reads as "key unusable", EIO as "damaged").
    #[test]
    fn a_failed_job_keeps_its_error_kind() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::new(dir.path());
        for kind in [ErrorKind::Denied, ErrorKind::Io, ErrorKind::NoSpace] {
            let job = store.create("copy", "disks/d", "images/i").unwrap();
            let p = JobProgress::new(JobStore::new(dir.path()), job);
            p.finish(&Err(Error::new(kind, "no".to_string())));
            let j = store.get(&p.id()).unwrap();
            assert_eq!(j.state, JobState::Failed);
            assert_eq!(j.error_kind(), kind);
        }
        // A record from before the field: its errno.
        let mut j = Job::new("copy", "a", "b");
        j.errno = Some(libc::ENOSPC);
        assert_eq!(j.error_kind(), ErrorKind::NoSpace);
    }
}
