//! The executor's HTTP API (hyper 1, HTTP/1.1): `POST /setTasks`, `GET /getTasks`, `GET /health`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::auth::Auth;
use super::manager::{SetTasksError, TaskManager};
use super::wire::{ErrorBody, Task};

/// Largest accepted request body: a task list, far below this in practice.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request handler needs.
pub struct Api {
    pub manager: Arc<TaskManager>,
    pub auth: Auth,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets in-flight requests
/// finish (up to 10 s) and returns.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let api = api.clone();
                    let mut stop = stop_rx.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(api.clone(), request));
                        let connection = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            _ = stop.changed() => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        if let Err(error) = result {
                            debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.abort_all();
    }
}

async fn handle(
    api: Arc<Api>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if path == "/health" {
        return Ok(match method {
            Method::GET | Method::HEAD => {
                json(StatusCode::OK, &serde_json::json!({"status": "healthy"}))
            }
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        });
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !api.auth.allows(authorization) {
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return Ok(response);
    }
    Ok(match (method, path.as_str()) {
        (Method::GET, "/getTasks") => json(StatusCode::OK, &api.manager.list().await),
        (Method::POST, "/setTasks") => set_tasks(&api, request).await,
        (_, "/getTasks") => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, "/setTasks") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint; try POST /setTasks, GET /getTasks or GET /health",
        ),
    })
}

async fn set_tasks(api: &Api, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        );
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    // `null` is what a Go client sends for a nil slice: no tasks.
    let desired: Vec<Task> = match serde_json::from_slice::<Option<Vec<Task>>>(&body) {
        Ok(tasks) => tasks.unwrap_or_default(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid request body: {e}"),
            );
        }
    };
    match api.manager.set_tasks(desired).await {
        Ok(tasks) => json(StatusCode::OK, &tasks),
        Err(e @ (SetTasksError::Invalid(_) | SetTasksError::TooMany { .. })) => {
            error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        Err(e @ SetTasksError::Store(_)) => {
            warn!(error = %e, "could not apply a task list");
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let code = status.canonical_reason().unwrap_or("Error").to_string();
    json(
        status,
        &ErrorBody {
            code,
            message: message.to_string(),
        },
    )
}
