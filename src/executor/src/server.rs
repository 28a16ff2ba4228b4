//! The executor's HTTP API (hyper 1, HTTP/1.1): `POST /setTasks`, `GET /getTasks`, `GET /health`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::auth::Auth;
use super::credential::{Refusal, SCHEME};
use super::manager::{SetTasksError, TaskManager};
use super::wire::{ErrorBody, Task};

/// Largest accepted request body: a task list, far below this in practice.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every request handler needs.
pub struct Api {
    pub manager: Arc<TaskManager>,
    pub auth: Auth,
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets in-flight requests
/// finish (up to 10 s) and returns.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()>) {
    super::http::serve(
        listener,
        move |request| handle(api.clone(), request),
        shutdown,
    )
    .await;
}

async fn handle(
    api: Arc<Api>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if path == "/health" {
        // Says only that something answers: no identity, version or configuration.
        return Ok(match method {
            Method::GET | Method::HEAD => {
                json(StatusCode::OK, &serde_json::json!({"status": "healthy"}))
            }
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        });
    }
    // The credential's form and time are checked before the body is read; its signature, which
    // covers the body, after.
    let presented = match &api.auth {
        Auth::Open => None,
        Auth::Signed(verifier) => {
            let authorization = request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            match verifier.presented(authorization, SystemTime::now()) {
                Ok(presented) => Some(presented),
                Err(refusal) => return Ok(unauthorized(refusal, &method, &path)),
            }
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Ok(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        ));
    }
    let body = match crate::http::read_body(request, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e @ crate::http::BodyError::TooLarge(_)) => {
            return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()));
        }
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    if let (Auth::Signed(verifier), Some(presented)) = (&api.auth, &presented)
        && let Err(refusal) = verifier.verify(presented, method.as_str(), &path, &body)
    {
        return Ok(unauthorized(refusal, &method, &path));
    }
    Ok(match (method, path.as_str()) {
        (Method::GET, "/getTasks") => json(StatusCode::OK, &api.manager.list().await),
        (Method::POST, "/setTasks") => set_tasks(&api, &body).await,
        (_, "/getTasks") => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, "/setTasks") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint; try POST /setTasks, GET /getTasks or GET /health",
        ),
    })
}

fn unauthorized(refusal: Refusal, method: &Method, path: &str) -> Response<Full<Bytes>> {
    debug!(%refusal, %method, path, "refused a request");
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or invalid credential");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(SCHEME),
    );
    response
}

async fn set_tasks(api: &Api, body: &[u8]) -> Response<Full<Bytes>> {
    // `null` is what a Go client sends for a nil slice: no tasks.
    let desired: Vec<Task> = match serde_json::from_slice::<Option<Vec<Task>>>(body) {
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
