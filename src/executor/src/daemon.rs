//! The executor process: recover the task list, serve the task API and the command API, shut
//! down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use super::auth::Auth;
use super::command::{ACCESS_TOKEN_ENV, CommandConfig, Commands};
use super::command_api::{self, CommandApi};
use super::manager::{ManagerConfig, TaskManager};
use super::server::{Api, serve};
use super::store::{DataDir, StoreError, write_atomic};

/// How the executor runs; set from its command line.
pub struct ExecutorConfig {
    /// The task API (`/setTasks`, `/getTasks`, `/health`); `None` serves none.
    pub listen: Option<SocketAddr>,
    /// OpenSandbox's in-sandbox command API (`/ping`, `/command`); `None` serves none.
    pub command_listen: Option<SocketAddr>,
    /// The access token the command API requires, if any.
    pub command_token: Option<String>,
    pub data_dir: PathBuf,
    pub auth: Auth,
    /// The user tasks and commands run as (`None`: the executor's own).
    pub task_identity: Option<super::identity::TaskIdentity>,
    /// Time between SIGTERM and SIGKILL when a task times out or is stopped.
    pub grace: Duration,
    /// On shutdown, stop every task first (the local runner's "the pod is gone"). Otherwise tasks
    /// keep running under their supervisors and a restarted executor picks them up again.
    pub stop_tasks_on_exit: bool,
    /// Shut down (as on SIGTERM) once this process is no longer our parent.
    pub parent_pid: Option<u32>,
    /// Written once serving, with the task API's bound address (the command API's when there is
    /// no task API); useful with port 0.
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
    #[error("nothing to serve: neither the task API nor the command API has an address")]
    NothingToServe,
}

/// Runs the executor until SIGTERM/SIGINT (or the parent's exit, see
/// [`ExecutorConfig::parent_pid`]).
pub async fn run(config: ExecutorConfig) -> Result<(), DaemonError> {
    if config.listen.is_none() && config.command_listen.is_none() {
        return Err(DaemonError::NothingToServe);
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let data = DataDir::open(&config.data_dir)?;
    let manager_config = ManagerConfig {
        grace: config.grace,
        task_identity: config.task_identity,
        ..ManagerConfig::new(config.shim_exe.clone())
    };
    let manager = TaskManager::recover(data, manager_config).await?;
    let tasks_listener = match config.listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let commands_listener = match config.command_listen {
        // The command port may already be served in this pod, by OpenSandbox's own execd:
        // then tasks are still served, and commands are left to it.
        Some(addr) => match bind(addr).await {
            Ok(listener) => Some(listener),
            Err(DaemonError::Listen { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && tasks_listener.is_some() =>
            {
                warn!(%addr, "the command API's address is in use; serving tasks only");
                None
            }
            Err(error) => return Err(error),
        },
        None => None,
    };
    let tasks_addr = tasks_listener.as_ref().map(|(_, addr)| *addr);
    let commands_addr = commands_listener.as_ref().map(|(_, addr)| *addr);
    if let Some(path) = &config.ready_file
        && let Some(addr) = tasks_addr.or(commands_addr)
    {
        write_atomic(path, addr.to_string().as_bytes())?;
    }
    info!(
        tasks = ?tasks_addr,
        commands = ?commands_addr,
        data_dir = %config.data_dir.display(),
        pod_uid = match &config.auth {
            Auth::Signed(verifier) => verifier.pod_uid(),
            Auth::Open => "<unauthenticated>",
        },
        command_token = config.command_token.is_some(),
        "task executor listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    };
    let commands = Commands::new(CommandConfig {
        scrub_env: vec![ACCESS_TOKEN_ENV.to_string()],
        default_identity: config.task_identity,
        ..CommandConfig::new(config.data_dir.join("commands"))
    });
    let mut servers = tokio::task::JoinSet::new();
    if let Some((listener, _)) = tasks_listener {
        let api = Arc::new(Api {
            manager: manager.clone(),
            auth: config.auth,
        });
        servers.spawn(serve(listener, api, stopped()));
    }
    if let Some((listener, _)) = commands_listener {
        let api = Arc::new(CommandApi::new(
            commands.clone(),
            config.command_token.as_deref(),
        ));
        servers.spawn(super::http::serve(
            listener,
            move |request| command_api::handle(api.clone(), request),
            stopped(),
        ));
    }
    let parent_pid = config.parent_pid;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received; shutting down"),
        _ = sigint.recv() => info!("SIGINT received; shutting down"),
        _ = parent_gone(parent_pid) => info!("parent process exited; shutting down"),
    }
    let _ = stop_tx.send(true);
    let killed = commands.kill_all();
    if killed > 0 {
        info!(killed, "killed the commands still running");
    }
    while servers.join_next().await.is_some() {}

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

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), DaemonError> {
    let error = |source| DaemonError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
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
