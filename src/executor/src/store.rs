//! The executor's data directory: what survives a restart of the executor.
//!
//! ```text
//! <data>/tasks.json                 the task list: name, process, deletionTimestamp (executor)
//! <data>/tasks/<name>/lock          flock-ed by the task's supervisor for as long as it lives
//! <data>/tasks/<name>/started.json  supervisor and process ids, start time    (supervisor)
//! <data>/tasks/<name>/exit.json     how the process terminated                (supervisor)
//! <data>/tasks/<name>/stdout.log    the process's output
//! <data>/tasks/<name>/stderr.log
//! ```
//!
//! Every JSON file is written atomically (temp file, fsync, rename, fsync of the directory), so a
//! crash leaves either the old or the new content. The lock tells whether a supervisor is alive
//! without trusting pids, which the kernel recycles: the kernel drops it when the holder dies.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::wire::{Process, Terminated};

/// Errors reading or writing the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One task as the executor remembers it across restarts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredTask {
    pub name: String,
    pub process: Process,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
}

#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    version: u32,
    tasks: Vec<StoredTask>,
}

/// Written by the supervisor once the process runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StartRecord {
    /// The supervisor, which stops the process when it gets SIGTERM.
    pub supervisor_pid: u32,
    /// The process, leader of its own process group.
    pub pid: u32,
    pub started_at: Time,
}

/// Paths inside one executor's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens (creating if needed) the data directory at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        // Supervisors get paths inside it; make them independent of anyone's working directory.
        let root = std::path::absolute(&root).map_err(io_error(&root))?;
        let tasks = root.join("tasks");
        fs::create_dir_all(&tasks).map_err(io_error(&tasks))?;
        Ok(DataDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("tasks.json")
    }

    /// The directory of task `name` (a name that passed [`super::wire::valid_task_name`]).
    pub fn task_dir(&self, name: &str) -> TaskDir {
        TaskDir {
            path: self.root.join("tasks").join(name),
        }
    }

    /// The remembered task list; empty when none was ever written.
    pub fn load_tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        Ok(read_json::<StateFile>(&self.state_path())?
            .map(|s| s.tasks)
            .unwrap_or_default())
    }

    pub fn save_tasks(&self, tasks: &[StoredTask]) -> Result<(), StoreError> {
        write_json_atomic(
            &self.state_path(),
            &StateFile {
                version: 1,
                tasks: tasks.to_vec(),
            },
        )
    }
}

/// The files of one task.
#[derive(Clone, Debug)]
pub struct TaskDir {
    path: PathBuf,
}

/// Whether a task's supervisor holds its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervisor {
    Alive,
    Gone,
}

impl TaskDir {
    pub fn at(path: impl Into<PathBuf>) -> Self {
        TaskDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory empty, removing what an earlier task of the same name left.
    pub fn recreate(&self) -> Result<(), StoreError> {
        self.remove()?;
        fs::create_dir_all(&self.path).map_err(io_error(&self.path))
    }

    pub fn remove(&self) -> Result<(), StoreError> {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(&self.path)(e)),
            _ => Ok(()),
        }
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    fn lock_path(&self) -> PathBuf {
        self.path.join("lock")
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.path.join("stdout.log")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.path.join("stderr.log")
    }

    /// Takes the task's lock for the life of the returned file (the supervisor's side).
    /// `Ok(None)`: someone else holds it.
    pub fn lock(&self) -> Result<Option<File>, StoreError> {
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(io_error(&path)(e)),
        }
    }

    /// Whether a supervisor holds the lock now. Probing takes the lock for an instant when it is
    /// free; a supervisor takes it before doing anything else, so that cannot hide a live one.
    pub fn supervisor(&self) -> Result<Supervisor, StoreError> {
        let path = self.lock_path();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Supervisor::Gone),
            Err(e) => return Err(io_error(&path)(e)),
        };
        match file.try_lock() {
            Ok(()) => Ok(Supervisor::Gone),
            Err(TryLockError::WouldBlock) => Ok(Supervisor::Alive),
            Err(TryLockError::Error(e)) => Err(io_error(&path)(e)),
        }
    }

    pub fn read_started(&self) -> Result<Option<StartRecord>, StoreError> {
        read_json(&self.path.join("started.json"))
    }

    pub fn write_started(&self, record: &StartRecord) -> Result<(), StoreError> {
        write_json_atomic(&self.path.join("started.json"), record)
    }

    pub fn read_exit(&self) -> Result<Option<Terminated>, StoreError> {
        read_json(&self.path.join("exit.json"))
    }

    pub fn write_exit(&self, terminated: &Terminated) -> Result<(), StoreError> {
        write_json_atomic(&self.path.join("exit.json"), terminated)
    }
}

/// `Ok(None)` when the file does not exist.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Replaces `path` with `value` as JSON, atomically and durably.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// Replaces `path` with `bytes`: a crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create(&temp).map_err(io_error(&temp))?;
        file.write_all(bytes).map_err(io_error(&temp))?;
        file.sync_all().map_err(io_error(&temp))?;
        fs::rename(&temp, path).map_err(io_error(path))?;
        // The rename itself must reach the disk too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_list_round_trips_and_starts_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path().join("data")).unwrap();
        assert!(data.load_tasks().unwrap().is_empty());
        let tasks = vec![StoredTask {
            name: "a".into(),
            process: Process {
                command: vec!["true".into()],
                ..Process::default()
            },
            deletion_timestamp: None,
        }];
        data.save_tasks(&tasks).unwrap();
        assert_eq!(
            DataDir::open(data.root()).unwrap().load_tasks().unwrap(),
            tasks
        );
        let leftovers: Vec<_> = fs::read_dir(data.root())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temp files stay behind");
    }

    #[test]
    fn corrupt_state_is_reported_not_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("tasks.json"), b"{not json").unwrap();
        assert!(matches!(data.load_tasks(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn the_lock_tells_whether_a_supervisor_lives() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap().task_dir("t");
        dir.recreate().unwrap();
        assert_eq!(
            dir.supervisor().unwrap(),
            Supervisor::Gone,
            "no lock file yet"
        );
        let held = dir.lock().unwrap().expect("free lock");
        assert_eq!(dir.supervisor().unwrap(), Supervisor::Alive);
        assert!(dir.lock().unwrap().is_none(), "a second holder is refused");
        drop(held);
        assert_eq!(dir.supervisor().unwrap(), Supervisor::Gone);
    }

    #[test]
    fn recreate_wipes_an_earlier_task_of_the_same_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap().task_dir("t");
        dir.recreate().unwrap();
        dir.write_exit(&Terminated {
            exit_code: 1,
            ..Terminated::default()
        })
        .unwrap();
        assert!(dir.read_exit().unwrap().is_some());
        dir.recreate().unwrap();
        assert!(dir.read_exit().unwrap().is_none());
        dir.remove().unwrap();
        assert!(!dir.exists());
        dir.remove().unwrap();
    }
}
