//! The state folder: uploaded files, jobs, their events and checkpoints, kept across restarts.
//! Every JSON document is written whole to a temporary name and renamed over the old one, so a
//! kill at any moment leaves the previous or the next version, never half of one.
//!
//! ```text
//! <state>/files/<file id>.json      the file object
//! <state>/files/<file id>.jsonl     its content
//! <state>/jobs/<job id>/job.json    the job object
//! <state>/jobs/<job id>/events.jsonl, checkpoints.json
//! <state>/jobs/<job id>/train-state/ the trainer's resumable state (parameters, AdamW moments)
//! ```

use super::objects::{Checkpoint, Event, FileObject, Job};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One job with what it has reported.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub job: Job,
    pub events: Vec<Event>,
    pub checkpoints: Vec<Checkpoint>,
}

pub struct Store {
    root: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable state file skipped");
            None
        }
    }
}

impl Store {
    /// Opens (creating) the state folder and reads everything in it, oldest first.
    pub fn open(root: &Path) -> std::io::Result<(Store, Vec<FileObject>, Vec<JobRecord>)> {
        std::fs::create_dir_all(root.join("files"))?;
        std::fs::create_dir_all(root.join("jobs"))?;
        let store = Store { root: root.to_path_buf() };
        // Uploads that never finished (a client that went away, a killed process) are swept.
        for e in std::fs::read_dir(root.join("files"))?.filter_map(|e| e.ok()) {
            if e.path().extension().is_some_and(|x| x == "upload") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut files: Vec<FileObject> = std::fs::read_dir(root.join("files"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| read_json(&p))
            .filter(|f: &FileObject| store.content_path(&f.id).exists())
            .collect();
        files.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut jobs: Vec<JobRecord> = std::fs::read_dir(root.join("jobs"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let dir = e.path();
                let job: Job = read_json(&dir.join("job.json"))?;
                let events = std::fs::read_to_string(dir.join("events.jsonl"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let checkpoints = read_json(&dir.join("checkpoints.json")).unwrap_or_default();
                Some(JobRecord { job, events, checkpoints })
            })
            .collect();
        jobs.sort_by(|a, b| (a.job.created_at, &a.job.id).cmp(&(b.job.created_at, &b.job.id)));
        Ok((store, files, jobs))
    }

    pub fn content_path(&self, file_id: &str) -> PathBuf {
        self.root.join("files").join(format!("{file_id}.jsonl"))
    }

    /// Where an upload is written while it arrives (renamed to its content path once valid).
    pub fn upload_path(&self, file_id: &str) -> PathBuf {
        self.root.join("files").join(format!("{file_id}.upload"))
    }

    pub fn save_file(&self, f: &FileObject) -> std::io::Result<()> {
        let path = self.root.join("files").join(format!("{}.json", f.id));
        write_atomic(&path, &serde_json::to_vec_pretty(f)?)
    }

    pub fn delete_file(&self, id: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.root.join("files").join(format!("{id}.json")))?;
        let _ = std::fs::remove_file(self.content_path(id));
        Ok(())
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    pub fn save_job(&self, job: &Job) -> std::io::Result<()> {
        let dir = self.job_dir(&job.id);
        std::fs::create_dir_all(&dir)?;
        write_atomic(&dir.join("job.json"), &serde_json::to_vec_pretty(job)?)
    }

    pub fn append_event(&self, job_id: &str, ev: &Event) -> std::io::Result<()> {
        let dir = self.job_dir(job_id);
        std::fs::create_dir_all(&dir)?;
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.jsonl"))?;
        let mut line = serde_json::to_vec(ev)?;
        line.push(b'\n');
        f.write_all(&line)
    }

    pub fn save_checkpoints(&self, job_id: &str, cps: &[Checkpoint]) -> std::io::Result<()> {
        write_atomic(&self.job_dir(job_id).join("checkpoints.json"), &serde_json::to_vec(cps)?)
    }

    /// The trainer's resumable state of a job.
    pub fn train_state(&self, job_id: &str) -> PathBuf {
        self.job_dir(job_id).join("train-state")
    }
}
