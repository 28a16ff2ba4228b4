//! The executor process: recover the task list, serve the API, shut down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::auth::Auth;
use super::manager::{ManagerConfig, TaskManager};
use super::server::{Api, serve};
use super::store::{DataDir, StoreError, write_atomic};

/// How the executor runs; set from its command line.
pub struct ExecutorConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub auth: Auth,
    /// Time between SIGTERM and SIGKILL when a task times out or is stopped.
    pub grace: Duration,
    /// On shutdown, stop every task first (the local runner's "the pod is gone"). Otherwise tasks
    /// keep running under their supervisors and a restarted executor picks them up again.
    pub stop_tasks_on_exit: bool,
    /// Shut down (as on SIGTERM) once this process is no longer our parent.
    pub parent_pid: Option<u32>,
    /// Written with the bound address once the API is being served (useful with port 0).
    pub ready_file: Option<PathBuf>,
    /// The executable providing the `shim` subcommand.
    pub shim_exe: PathBuf,
}

/// Why the executor could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("data directory: {0}")]
    Store(#[from] StoreError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

/// Runs the executor until SIGTERM/SIGINT (or the parent's exit, see
/// [`ExecutorConfig::parent_pid`]).
pub async fn run(config: ExecutorConfig) -> Result<(), DaemonError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let data = DataDir::open(&config.data_dir)?;
    let manager_config = ManagerConfig {
        grace: config.grace,
        ..ManagerConfig::new(config.shim_exe.clone())
    };
    let manager = TaskManager::recover(data, manager_config).await?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    if let Some(path) = &config.ready_file {
        write_atomic(path, addr.to_string().as_bytes())?;
    }
    info!(%addr, data_dir = %config.data_dir.display(), authenticated = matches!(config.auth, Auth::Token(_)), "task executor listening");

    let parent_pid = config.parent_pid;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received; shutting down"),
            _ = sigint.recv() => info!("SIGINT received; shutting down"),
            _ = parent_gone(parent_pid) => info!("parent process exited; shutting down"),
        }
    };
    let api = Arc::new(Api {
        manager: manager.clone(),
        auth: config.auth,
    });
    serve(listener, api, shutdown).await;

    if config.stop_tasks_on_exit {
        let still_running = manager
            .stop_all(config.grace + Duration::from_secs(5))
            .await;
        if still_running > 0 {
            warn!(
                still_running,
                "some tasks had not terminated when the executor exited"
            );
        } else {
            info!("all tasks stopped");
        }
    } else {
        info!("tasks keep running under their supervisors; a restarted executor resumes them");
    }
    Ok(())
}

/// Resolves once `parent` is no longer our parent process (never, for `None`).
async fn parent_gone(parent: Option<u32>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    loop {
        if std::os::unix::process::parent_id() != parent {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
