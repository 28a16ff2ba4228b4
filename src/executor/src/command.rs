//! Commands of OpenSandbox's in-sandbox command API (execd's `POST /command`), as real processes.
//!
//! A command is shell text (run with `bash --noprofile --norc -c`, or `sh -c` where there is no
//! bash) or an argv, started as the leader of its own process group with stdin on `/dev/null`.
//! Its output streams back as it is produced, as execd's events, one JSON object per frame, each
//! frame followed by a blank line:
//!
//! ```text
//! {"type":"init","text":"<id>","timestamp":1764620306555}
//! {"type":"stdout","text":"hello from batch sandbox","timestamp":1764620306561}
//! {"type":"execution_complete","execution_time":6,"timestamp":1764620306561}
//! ```
//!
//! * `stdout`/`stderr` carry one line each, without its terminator (`\n`, `\r` or `\r\n`); an
//!   empty line is `"\n"`, a last line without terminator is sent when the stream ends, and a
//!   line longer than [`CommandConfig::max_line_bytes`] is sent in pieces of at most that size.
//! * Exit status 0 ends with `execution_complete` (`execution_time` in ms); anything else with
//!   `error` `{"ename":"CommandExecError","evalue":"<exit code>","traceback":[...]}`, where a
//!   process killed by signal N has code 128+N, a command that could not start 127 (not found)
//!   or 126 (not executable).
//! * `timeout` (ms) kills the whole process group with SIGKILL when it passes (code 137).
//! * A client that goes away kills the group, as does the executor's shutdown.
//! * `ping` events keep an idle stream alive (and find dead connections) every
//!   [`CommandConfig::ping_interval`].
//! * `background: true` answers `init` and `execution_complete` at once and lets the process run
//!   on, its output appended to `<output dir>/<id>.log`; its `timeout` still applies.
//!
//! When the leader exits, output already written is delivered; processes it left running in the
//! background keep their (drained, no longer forwarded) pipes and are not killed.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// The port of execd's API, which OpenSandbox's SDK calls inside every sandbox.
pub const COMMAND_PORT: u16 = 44772;
/// The header carrying the access token, when one is configured (as execd's).
pub const ACCESS_TOKEN_HEADER: &str = "X-EXECD-ACCESS-TOKEN";
/// The init container with which OpenSandbox's server installs its own execd into a sandbox pod.
pub const EXECD_INSTALLER: &str = "execd-installer";
/// The environment variable execd reads its access token from. The executor refuses it (a secret
/// in its environment would be readable in `/proc/<pid>/environ`): use `--command-token-file`.
pub const ACCESS_TOKEN_ENV: &str = "EXECD_ACCESS_TOKEN";

/// The body of `POST /command`, as OpenSandbox's SDK sends it. Unknown fields are ignored.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct RunCommandRequest {
    /// Shell text. Exactly one of `command` and `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// An executable and its literal arguments.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory; `~`, `$NAME` and `${NAME}` are expanded.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub background: Option<bool>,
    /// Milliseconds, at least 1; absent or 0: no limit.
    #[serde(default)]
    pub timeout: Option<i64>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Added to (and overriding) the executor's environment.
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
}

/// Why a request names no command that can be run. Reported as `400` with a JSON body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidCommand {
    #[error("exactly one of a non-empty command or argv is required")]
    NoCommand,
    #[error("argv must contain a non-empty executable")]
    EmptyArgv,
    #[error("{0} must not contain NUL bytes")]
    Nul(&'static str),
    #[error("timeout must be a positive number of milliseconds, got {0}")]
    Timeout(i64),
    #[error("uid is required when gid is provided")]
    GidWithoutUid,
    #[error("envs: {0:?} is not a valid variable name")]
    EnvName(String),
    #[error("cwd {cwd:?}: {reason}")]
    Cwd { cwd: String, reason: String },
}

/// A validated command.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
    /// Shown in logs: the shell text or the argv.
    pub content: String,
    pub cwd: Option<PathBuf>,
    pub envs: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    pub background: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl RunCommandRequest {
    /// Checks the request and resolves the program and working directory. `lookup` reads the
    /// executor's own environment (for `$NAME` in `cwd`, after `envs`, and `~`).
    pub fn validate(
        self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<CommandSpec, InvalidCommand> {
        let (program, args, content) = match (self.command, self.argv) {
            (Some(command), None) if !command.is_empty() => {
                if command.contains('\0') {
                    return Err(InvalidCommand::Nul("command"));
                }
                let (shell, mut args) = shell();
                args.extend(["-c".to_string(), command.clone()]);
                (shell, args, command)
            }
            (None, Some(argv)) => {
                let Some((program, args)) = argv.split_first() else {
                    return Err(InvalidCommand::EmptyArgv);
                };
                if program.is_empty() {
                    return Err(InvalidCommand::EmptyArgv);
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(InvalidCommand::Nul("argv"));
                }
                let content = argv.join(" ");
                (program.clone(), args.to_vec(), content)
            }
            _ => return Err(InvalidCommand::NoCommand),
        };
        let timeout = match self.timeout {
            None | Some(0) => None,
            Some(ms) if ms < 0 => return Err(InvalidCommand::Timeout(ms)),
            Some(ms) => Some(Duration::from_millis(ms.unsigned_abs())),
        };
        if self.gid.is_some() && self.uid.is_none() {
            return Err(InvalidCommand::GidWithoutUid);
        }
        let envs: Vec<(String, String)> = self.envs.unwrap_or_default().into_iter().collect();
        for (name, value) in &envs {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(InvalidCommand::EnvName(name.clone()));
            }
            if value.contains('\0') {
                return Err(InvalidCommand::Nul("envs"));
            }
        }
        let cwd = match self.cwd.filter(|c| !c.is_empty()) {
            None => None,
            Some(raw) => {
                let env_lookup = |name: &str| {
                    envs.iter()
                        .rev()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .or_else(|| lookup(name))
                };
                let expanded =
                    expand_cwd(&raw, &env_lookup).map_err(|reason| InvalidCommand::Cwd {
                        cwd: raw.clone(),
                        reason,
                    })?;
                if !expanded.is_dir() {
                    return Err(InvalidCommand::Cwd {
                        cwd: raw,
                        reason: format!("{} is not a directory", expanded.display()),
                    });
                }
                Some(expanded)
            }
        };
        Ok(CommandSpec {
            program,
            args,
            content,
            cwd,
            envs,
            timeout,
            background: self.background.unwrap_or(false),
            uid: self.uid,
            gid: self.gid,
        })
    }
}

/// `bash --noprofile --norc` where bash is on `PATH`, else `sh` (execd's choice).
fn shell() -> (String, Vec<String>) {
    static BASH: OnceLock<bool> = OnceLock::new();
    let has_bash = *BASH.get_or_init(|| {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| is_executable(&dir.join("bash")))
        })
    });
    if has_bash {
        ("bash".into(), vec!["--noprofile".into(), "--norc".into()])
    } else {
        ("sh".into(), Vec::new())
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Expands a leading `~` (to `$HOME`) and `$NAME` / `${NAME}`; an undefined name is an error.
pub fn expand_cwd(raw: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    let mut out = String::new();
    let rest = if raw == "~" || raw.starts_with("~/") {
        out.push_str(&lookup("HOME").ok_or("~ needs HOME, which is not set")?);
        &raw[1..]
    } else {
        raw
    };
    let mut chars = rest.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let name = if rest[i + 1..].starts_with('{') {
            let end = rest[i + 2..]
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ at {i}"))?;
            let name = &rest[i + 2..i + 2 + end];
            for _ in 0..end + 2 {
                chars.next();
            }
            name
        } else {
            let len = rest[i + 1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len() - i - 1);
            if len == 0 {
                out.push('$');
                continue;
            }
            for _ in 0..len {
                chars.next();
            }
            &rest[i + 1..i + 1 + len]
        };
        if name.is_empty() {
            return Err("empty variable name".into());
        }
        out.push_str(&lookup(name).ok_or_else(|| format!("${name} is not defined"))?);
    }
    Ok(PathBuf::from(out))
}

// ------------------------------------------------------------------ events --

/// One event of the stream.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_time: Option<u64>,
    pub timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorOutput>,
}

/// The `error` of a failed command.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorOutput {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Event {
    fn new(kind: &'static str, text: Option<String>) -> Self {
        Event {
            kind,
            text,
            execution_time: None,
            timestamp: now_ms(),
            error: None,
        }
    }

    pub fn init(id: &str) -> Self {
        Event::new("init", Some(id.to_string()))
    }

    pub fn output(stream: Stream, text: String) -> Self {
        Event::new(stream.kind(), Some(text))
    }

    pub fn ping() -> Self {
        Event::new("ping", Some("pong".into()))
    }

    pub fn complete(elapsed: Duration) -> Self {
        Event {
            execution_time: Some(elapsed.as_millis() as u64),
            ..Event::new("execution_complete", None)
        }
    }

    pub fn failed(exit_code: i32, traceback: String) -> Self {
        Event {
            error: Some(ErrorOutput {
                ename: "CommandExecError".into(),
                evalue: exit_code.to_string(),
                traceback: vec![traceback],
            }),
            ..Event::new("error", None)
        }
    }

    /// The event as it goes on the wire: compact JSON, then a blank line.
    pub fn frame(&self) -> Bytes {
        let mut json = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        json.extend_from_slice(b"\n\n");
        Bytes::from(json)
    }
}

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn kind(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Cuts a byte stream into the texts of `stdout`/`stderr` events (see the module docs).
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    last_was_cr: bool,
    max: usize,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            pending: Vec::new(),
            last_was_cr: false,
            max: max_line_bytes.max(4),
        }
    }

    /// Feeds `data`; returns the texts it completes.
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' || b == b'\r' {
                if !self.pending.is_empty() {
                    out.push(self.take(self.pending.len()));
                } else if !(b == b'\n' && self.last_was_cr) {
                    out.push("\n".to_string());
                }
                self.last_was_cr = b == b'\r';
                continue;
            }
            self.last_was_cr = false;
            self.pending.push(b);
            if self.pending.len() >= self.max {
                // Cut at the last complete UTF-8 character, so no character is split.
                let cut = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    Err(e) if e.valid_up_to() > 0 && e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => self.pending.len(),
                };
                out.push(self.take(cut));
            }
        }
        out
    }

    /// The unterminated rest, if any, at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take(self.pending.len()))
    }

    fn take(&mut self, n: usize) -> String {
        let rest = self.pending.split_off(n);
        let line = std::mem::replace(&mut self.pending, rest);
        String::from_utf8_lossy(&line).into_owned()
    }
}

// ---------------------------------------------------------------- running --

/// How commands run.
#[derive(Clone, Debug)]
pub struct CommandConfig {
    /// Where background commands write their output (`<id>.log`).
    pub output_dir: PathBuf,
    /// Environment variables of the executor that commands must not see (its secrets).
    pub scrub_env: Vec<String>,
    /// The user a command runs as when its request names none (`None`: the executor's own).
    pub default_identity: Option<super::identity::TaskIdentity>,
    /// Longest text of one `stdout`/`stderr` event.
    pub max_line_bytes: usize,
    /// Time between `ping` events.
    pub ping_interval: Duration,
    /// Frames buffered per stream before the command waits for the client to read.
    pub buffer_frames: usize,
    /// Finished commands remembered for `status` (the oldest are forgotten first, with their
    /// background output).
    pub max_finished: usize,
}

impl CommandConfig {
    pub fn new(output_dir: PathBuf) -> Self {
        CommandConfig {
            output_dir,
            scrub_env: Vec::new(),
            default_identity: None,
            max_line_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(3),
            buffer_frames: 64,
            max_finished: 1024,
        }
    }
}

/// What is known of a command, for `GET /command/status/{id}`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CommandStatus {
    pub id: String,
    pub content: String,
    pub running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

struct Record {
    status: CommandStatus,
    /// The leader's pid (= its process group) while it has not been reaped.
    pgid: Option<u32>,
    background_log: Option<PathBuf>,
    /// Order of finishing, for forgetting the oldest.
    finished: Option<u64>,
}

/// The commands of one executor.
pub struct Commands {
    config: CommandConfig,
    records: Mutex<HashMap<String, Record>>,
    next: AtomicU64,
}

/// How a command ended.
struct Outcome {
    exit_code: i32,
    traceback: String,
}

impl Commands {
    pub fn new(config: CommandConfig) -> Arc<Self> {
        Arc::new(Commands {
            config,
            records: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &CommandConfig {
        &self.config
    }

    /// Starts `spec`; the frames of its event stream arrive on the receiver, which closes after
    /// the last one. Dropping the receiver kills a foreground command's process group.
    pub fn start(self: &Arc<Self>, spec: CommandSpec) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(self.config.buffer_frames.max(1));
        let id = self.new_id();
        let this = self.clone();
        tokio::spawn(async move {
            if spec.background {
                this.run_background(id, spec, tx).await;
            } else {
                this.run_foreground(id, spec, tx).await;
            }
        });
        rx
    }

    /// The status of a command this executor ran, if it knows it.
    pub fn status(&self, id: &str) -> Option<CommandStatus> {
        self.lock().get(id).map(|r| r.status.clone())
    }

    /// A background command's output from byte `cursor` on, and the cursor after it.
    pub fn background_output(&self, id: &str, cursor: u64) -> Option<io::Result<(Vec<u8>, u64)>> {
        let path = self.lock().get(id)?.background_log.clone()?;
        Some((|| {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(cursor))?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            let next = cursor + data.len() as u64;
            Ok((data, next))
        })())
    }

    /// Kills every command still running (the executor is going away). Returns how many.
    pub fn kill_all(&self) -> usize {
        let records = self.lock();
        let mut killed = 0;
        for record in records.values() {
            if let Some(pgid) = record.pgid {
                signal_group(pgid, Signal::KILL);
                killed += 1;
            }
        }
        killed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn new_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        format!("{nanos:016x}{:08x}{n:08x}", std::process::id())
    }

    fn command(&self, spec: &CommandSpec) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&spec.program);
        command.args(&spec.args);
        for name in &self.config.scrub_env {
            command.env_remove(name);
        }
        command.envs(spec.envs.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let (euid, egid) = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        // The same identity needs no switch (which would need CAP_SETGID for setgroups).
        if let Some(uid) = spec
            .uid
            .filter(|u| *u != euid || spec.gid.is_some_and(|g| g != egid))
        {
            command.uid(uid);
            if let Some(gid) = spec.gid {
                command.gid(gid);
            }
        } else if spec.uid.is_none() {
            super::identity::apply(&mut command, self.config.default_identity);
        }
        command
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        command
    }

    fn register(&self, id: &str, spec: &CommandSpec, pgid: Option<u32>, log: Option<PathBuf>) {
        let status = CommandStatus {
            id: id.to_string(),
            content: spec.content.clone(),
            running: pgid.is_some(),
            exit_code: None,
            error: None,
            started_at: rfc3339_now(),
            finished_at: None,
        };
        self.lock().insert(
            id.to_string(),
            Record {
                status,
                pgid,
                background_log: log,
                finished: None,
            },
        );
    }

    fn finish(&self, id: &str, outcome: &Outcome) {
        let mut records = self.lock();
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(record) = records.get_mut(id) {
            record.pgid = None;
            record.finished = Some(sequence);
            record.status.running = false;
            record.status.exit_code = Some(outcome.exit_code);
            record.status.error = (outcome.exit_code != 0).then(|| outcome.traceback.clone());
            record.status.finished_at = Some(rfc3339_now());
        }
        let mut finished: Vec<(u64, String)> = records
            .iter()
            .filter_map(|(id, r)| r.finished.map(|n| (n, id.clone())))
            .collect();
        if finished.len() > self.config.max_finished {
            finished.sort();
            let excess = finished.len() - self.config.max_finished;
            for (_, old) in finished.into_iter().take(excess) {
                if let Some(log) = records.remove(&old).and_then(|r| r.background_log) {
                    let _ = std::fs::remove_file(log);
                }
            }
        }
    }

    async fn run_foreground(
        self: Arc<Self>,
        id: String,
        spec: CommandSpec,
        tx: mpsc::Sender<Bytes>,
    ) {
        let started = Instant::now();
        if tx.send(Event::init(&id).frame()).await.is_err() {
            return;
        }
        let mut command = self.command(&spec);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let outcome = start_failure(&spec, &error);
                self.register(&id, &spec, None, None);
                self.finish(&id, &outcome);
                let _ = tx
                    .send(Event::failed(outcome.exit_code, outcome.traceback).frame())
                    .await;
                return;
            }
        };
        let pid = child.id();
        self.register(&id, &spec, pid, None);
        info!(command = %id, pid = pid.unwrap_or_default(), content = %spec.content, "started command");

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut pumps = Vec::new();
        for (pipe, stream) in [
            (child.stdout.take().map(Pipe::Out), Stream::Stdout),
            (child.stderr.take().map(Pipe::Err), Stream::Stderr),
        ] {
            if let Some(pipe) = pipe {
                let (done_tx, done_rx) = oneshot::channel();
                tokio::spawn(pump(
                    pipe,
                    stream,
                    tx.clone(),
                    stop_rx.clone(),
                    self.config.max_line_bytes,
                    done_tx,
                ));
                pumps.push(done_rx);
            }
        }

        let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.tick().await;
        let mut timed_out = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = sleep_until_opt(deadline), if !timed_out => {
                    timed_out = true;
                    if let Some(pid) = pid {
                        signal_group(pid, Signal::KILL);
                    }
                }
                _ = tx.closed() => {
                    if let Some(pid) = pid {
                        signal_group(pid, Signal::KILL);
                    }
                    let _ = child.wait().await;
                    self.finish(&id, &Outcome { exit_code: 137, traceback: "the client went away; the command was killed".into() });
                    info!(command = %id, "client went away; killed the command");
                    return;
                }
                _ = ping.tick() => {
                    let _ = tx.try_send(Event::ping().frame());
                }
            }
        };
        // Output written before the exit is in the pipes; take it, then stop forwarding.
        let _ = stop_tx.send(true);
        for done in pumps {
            let _ = done.await;
        }
        let outcome = match status {
            Ok(status) => exit_outcome(status, timed_out.then_some(spec.timeout).flatten()),
            Err(error) => Outcome {
                exit_code: 1,
                traceback: format!("waiting for the command: {error}"),
            },
        };
        self.finish(&id, &outcome);
        info!(command = %id, exit_code = outcome.exit_code, "command finished");
        let last = if outcome.exit_code == 0 {
            Event::complete(started.elapsed())
        } else {
            Event::failed(outcome.exit_code, outcome.traceback)
        };
        let _ = tx.send(last.frame()).await;
    }

    async fn run_background(
        self: Arc<Self>,
        id: String,
        spec: CommandSpec,
        tx: mpsc::Sender<Bytes>,
    ) {
        let started = Instant::now();
        let _ = tx.send(Event::init(&id).frame()).await;
        let log = self.config.output_dir.join(format!("{id}.log"));
        let opened = std::fs::create_dir_all(&self.config.output_dir).and_then(|()| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            Ok((file.try_clone()?, file))
        });
        let spawned = opened.and_then(|(out, err)| {
            let mut command = self.command(&spec);
            command.stdout(out).stderr(err);
            command.spawn()
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let outcome = start_failure(&spec, &error);
                self.register(&id, &spec, None, Some(log));
                self.finish(&id, &outcome);
                let _ = tx
                    .send(Event::failed(outcome.exit_code, outcome.traceback).frame())
                    .await;
                return;
            }
        };
        let pid = child.id();
        self.register(&id, &spec, pid, Some(log));
        info!(command = %id, pid = pid.unwrap_or_default(), content = %spec.content, "started background command");
        let _ = tx.send(Event::complete(started.elapsed()).frame()).await;
        drop(tx);
        let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut timed_out = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = sleep_until_opt(deadline), if !timed_out => {
                    timed_out = true;
                    if let Some(pid) = pid {
                        signal_group(pid, Signal::KILL);
                    }
                }
            }
        };
        let outcome = match status {
            Ok(status) => exit_outcome(status, timed_out.then_some(spec.timeout).flatten()),
            Err(error) => Outcome {
                exit_code: 1,
                traceback: format!("waiting for the command: {error}"),
            },
        };
        info!(command = %id, exit_code = outcome.exit_code, "background command finished");
        self.finish(&id, &outcome);
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

enum Pipe {
    Out(tokio::process::ChildStdout),
    Err(tokio::process::ChildStderr),
}

impl Pipe {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Pipe::Out(p) => p.read(buf).await,
            Pipe::Err(p) => p.read(buf).await,
        }
    }
}

/// Forwards one pipe's lines until `stop`; then forwards what the pipe already holds, reports
/// `done`, and discards the rest until EOF (so processes left behind never write into a closed
/// pipe).
async fn pump(
    mut pipe: Pipe,
    stream: Stream,
    tx: mpsc::Sender<Bytes>,
    mut stop: watch::Receiver<bool>,
    max_line: usize,
    done: oneshot::Sender<()>,
) {
    let mut splitter = LineSplitter::new(max_line);
    let mut buf = vec![0u8; 64 * 1024];
    let mut forwarding = true;
    // Until the leader exits.
    loop {
        tokio::select! {
            read = pipe.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let rest = splitter.finish().into_iter().collect();
                    forward(&tx, stream, rest, &mut forwarding).await;
                    let _ = done.send(());
                    return;
                }
                Ok(n) => {
                    let texts = splitter.push(&buf[..n]);
                    forward(&tx, stream, texts, &mut forwarding).await;
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
    // The leader has exited: what it wrote is already in the pipe. Take it (a pause of 20 ms
    // means the pipe is empty), but no more than half a second of what others keep writing.
    let mut eof = false;
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(20), pipe.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                break;
            }
            Ok(Ok(n)) => {
                let texts = splitter.push(&buf[..n]);
                forward(&tx, stream, texts, &mut forwarding).await;
            }
            Err(_) => break,
        }
    }
    let rest = splitter.finish().into_iter().collect();
    forward(&tx, stream, rest, &mut forwarding).await;
    drop(tx);
    let _ = done.send(());
    while !eof {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => eof = true,
            Ok(_) => {}
        }
    }
}

/// Sends each text as an event while the client is there; stops forwarding once it is gone.
async fn forward(
    tx: &mpsc::Sender<Bytes>,
    stream: Stream,
    texts: Vec<String>,
    forwarding: &mut bool,
) {
    for text in texts {
        if *forwarding && tx.send(Event::output(stream, text).frame()).await.is_err() {
            *forwarding = false;
        }
    }
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

fn start_failure(spec: &CommandSpec, error: &io::Error) -> Outcome {
    let exit_code = match error.kind() {
        io::ErrorKind::NotFound => 127,
        io::ErrorKind::PermissionDenied => 126,
        _ => 1,
    };
    warn!(program = %spec.program, %error, "command could not start");
    Outcome {
        exit_code,
        traceback: format!("cannot start {}: {error}", spec.program),
    }
}

fn exit_outcome(status: ExitStatus, timed_out: Option<Duration>) -> Outcome {
    let (exit_code, how) = match (status.code(), status.signal()) {
        (Some(code), _) => (code, format!("exit status {code}")),
        (None, Some(signal)) => (128 + signal, format!("killed by signal {signal}")),
        (None, None) => (1, "ended without a status".to_string()),
    };
    match timed_out {
        Some(timeout) => Outcome {
            exit_code: if exit_code == 0 { 124 } else { exit_code },
            traceback: format!(
                "timed out after {} ms; the process group was killed ({how})",
                timeout.as_millis()
            ),
        },
        None => Outcome {
            exit_code,
            traceback: how,
        },
    }
}

/// Sends `signal` to the process group led by `pid`; never to pid 0 or 1.
fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn rfc3339_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}
