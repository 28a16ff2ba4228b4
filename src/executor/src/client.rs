//! The controller's client for the task executor in each sandbox pod.
//!
//! Every call has a short overall deadline and fails with a typed [`ExecutorError`], so the caller
//! can tell "this executor cannot be reached" (count the task as Unknown and retry) from "it
//! refused us" (a configuration problem worth an event) from "it answered nonsense".

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::EXECUTOR_PORT;
use super::credential::SigningKey;
use super::wire::{ErrorBody, Task};

/// Default deadline of one call, connection included. Executors sit next to the controller in
/// the cluster network; one that takes longer than this is treated as unreachable.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response body read (a task list of a few hundred tasks fits easily).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Why a call to an executor failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("pod IP {0:?} is not an IP address")]
    InvalidAddress(String),
    #[error("task executor at {endpoint} is unreachable: {source}")]
    Unreachable {
        endpoint: SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("task executor at {endpoint} did not answer within {after:?}")]
    Timeout {
        endpoint: SocketAddr,
        after: Duration,
    },
    #[error("task executor at {endpoint} rejected our credential (401): {message}")]
    Unauthorized {
        endpoint: SocketAddr,
        message: String,
    },
    #[error("task executor at {endpoint} answered {status}: {message}")]
    Status {
        endpoint: SocketAddr,
        status: u16,
        message: String,
    },
    #[error("task executor at {endpoint} sent a response we cannot read: {reason}")]
    BadResponse {
        endpoint: SocketAddr,
        reason: String,
    },
}

impl ExecutorError {
    /// True when the executor could not be reached at all (down, not yet listening, too slow):
    /// its tasks' state is unknown, not finished.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ExecutorError::Unreachable { .. } | ExecutorError::Timeout { .. }
        )
    }
}

/// The executor of one pod: its IP, and its UID, for which each request is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub ip: &'a str,
    pub uid: &'a str,
}

/// A client for task executors, shared by all reconciles (connections are pooled per pod).
#[derive(Clone)]
pub struct ExecutorClient {
    http: Client<HttpConnector, Full<Bytes>>,
    /// Signs every request for its target pod; `None` sends no credential.
    signing_key: Option<Arc<SigningKey>>,
    port: u16,
    timeout: Duration,
}

impl std::fmt::Debug for ExecutorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorClient")
            .field("signing_key", &self.signing_key)
            .field("port", &self.port)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ExecutorClient {
    /// A client that signs each request with `signing_key` for the pod it goes to (`None`: no
    /// credential, for executors started with `--allow-unauthenticated`), on port
    /// [`EXECUTOR_PORT`], with [`DEFAULT_TIMEOUT`].
    pub fn new(signing_key: Option<Arc<SigningKey>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(connector);
        ExecutorClient {
            http,
            signing_key,
            port: EXECUTOR_PORT,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Talks to executors on `port` instead of [`EXECUTOR_PORT`] (tests bind port 0).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Gives every call `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Replaces the executor's task list with `tasks` (`POST /setTasks`) and returns the list it
    /// now holds, with each task's status.
    ///
    /// Semantics: a task whose name is new is started; a known name keeps running as it is (its
    /// spec is not updated); a task missing from `tasks` is stopped (SIGTERM, SIGKILL after the
    /// grace period) and stays in the returned list, with `deletionTimestamp` set, until its
    /// process has terminated. `set_tasks(pod, &[])` therefore stops everything: the executor is
    /// idle once a later call returns an empty list.
    pub async fn set_tasks(
        &self,
        pod: PodRef<'_>,
        tasks: &[Task],
    ) -> Result<Vec<Task>, ExecutorError> {
        let endpoint = self.endpoint(pod.ip)?;
        let body = serde_json::to_vec(tasks).map_err(|e| ExecutorError::BadResponse {
            endpoint,
            reason: format!("cannot encode the request: {e}"),
        })?;
        self.call_json(
            endpoint,
            pod.uid,
            Method::POST,
            "/setTasks",
            Bytes::from(body),
        )
        .await
    }

    /// The executor's current task list with each task's status (`GET /getTasks`).
    pub async fn get_tasks(&self, pod: PodRef<'_>) -> Result<Vec<Task>, ExecutorError> {
        let endpoint = self.endpoint(pod.ip)?;
        self.call_json(endpoint, pod.uid, Method::GET, "/getTasks", Bytes::new())
            .await
    }

    /// Succeeds when the executor answers `GET /health` (which needs no credential).
    pub async fn health(&self, pod_ip: &str) -> Result<(), ExecutorError> {
        let endpoint = self.endpoint(pod_ip)?;
        self.call(endpoint, None, Method::GET, "/health", Bytes::new())
            .await
            .map(|_| ())
    }

    fn endpoint(&self, pod_ip: &str) -> Result<SocketAddr, ExecutorError> {
        let ip: IpAddr = pod_ip
            .trim()
            .parse()
            .map_err(|_| ExecutorError::InvalidAddress(pod_ip.to_string()))?;
        Ok(SocketAddr::new(ip, self.port))
    }

    async fn call_json(
        &self,
        endpoint: SocketAddr,
        pod_uid: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Vec<Task>, ExecutorError> {
        let bytes = self
            .call(endpoint, Some(pod_uid), method, path, body)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ExecutorError::BadResponse {
            endpoint,
            reason: format!("not a JSON task list: {e}"),
        })
    }

    /// One request; signed for `pod_uid` when it is given and this client has a key.
    async fn call(
        &self,
        endpoint: SocketAddr,
        pod_uid: Option<&str>,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ExecutorError> {
        let authorization = match (&self.signing_key, pod_uid) {
            (Some(key), Some(uid)) => {
                Some(key.authorization(uid, method.as_str(), path, &body, SystemTime::now()))
            }
            _ => None,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{endpoint}{path}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(authorization) = &authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ExecutorError::BadResponse {
                endpoint,
                reason: format!("cannot build the request: {e}"),
            })?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|source| ExecutorError::Unreachable { endpoint, source })?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ExecutorError::BadResponse {
                    endpoint,
                    reason: format!("reading the body: {e}"),
                })?
                .to_bytes();
            Ok::<_, ExecutorError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExecutorError::Timeout {
                endpoint,
                after: self.timeout,
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|body| body.message)
            .unwrap_or_else(|_| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned()
            });
        if status == StatusCode::UNAUTHORIZED {
            return Err(ExecutorError::Unauthorized { endpoint, message });
        }
        Err(ExecutorError::Status {
            endpoint,
            status: status.as_u16(),
            message,
        })
    }
}
