//! The in-sandbox command API of OpenSandbox's execd, served by the executor on port
//! [`COMMAND_PORT`] so OpenSandbox's SDK (`sandbox.commands.run(...)`) works unchanged:
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /ping` | `200`, empty |
//! | `POST /command` | `{"command": "..."}` or `{"argv": [...]}`, optional `cwd`, `timeout` (ms), `envs`, `background`, `uid`, `gid`; the event stream of [`super::command`] as `text/event-stream` |
//! | `GET /command/status/{id}` | `{"id","content","running","exit_code","error","started_at","finished_at"}` |
//! | `GET /command/{id}/logs?cursor=N` | a background command's output from byte N (`text/plain`), the next cursor in `EXECD-COMMANDS-TAIL-CURSOR` |
//!
//! A request that cannot be run gets `400` with `{"code":"INVALID_REQUEST_BODY","message":...}`.
//! With an access token configured, every request must carry it in [`ACCESS_TOKEN_HEADER`]
//! (`401` otherwise), as execd requires.
//!
//! [`COMMAND_PORT`]: super::command::COMMAND_PORT

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::command::{ACCESS_TOKEN_HEADER, Commands, RunCommandRequest};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The body of every answer: a JSON document or an event stream.
pub type ApiBody = Either<Full<Bytes>, EventStream>;

/// What the handlers need.
pub struct CommandApi {
    pub commands: Arc<Commands>,
    /// Digest of the access token, when one is required.
    token: Option<[u8; 32]>,
}

impl CommandApi {
    pub fn new(commands: Arc<Commands>, token: Option<&str>) -> Self {
        CommandApi {
            commands,
            token: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    fn allows(&self, given: Option<&[u8]>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let Some(given) = given else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim_ascii()).into();
        given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// The frames of one command, as a response body.
pub struct EventStream(mpsc::Receiver<Bytes>);

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|frame| frame.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Serialize)]
struct ErrorResponse<'a> {
    code: &'a str,
    message: String,
}

pub async fn handle(
    api: Arc<CommandApi>,
    request: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let token = request
        .headers()
        .get(ACCESS_TOKEN_HEADER)
        .map(|v| v.as_bytes());
    if !api.allows(token) {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            format!("invalid or missing header {ACCESS_TOKEN_HEADER}"),
        ));
    }
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Ok(match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["ping"]) => empty(StatusCode::OK),
        (&Method::POST, ["command"]) => run(&api, request).await,
        (&Method::GET, ["command", "status", id]) => match api.commands.status(id) {
            Some(status) => json(StatusCode::OK, &status),
            None => not_found(id),
        },
        (&Method::GET, ["command", id, "logs"]) => {
            let cursor = request
                .uri()
                .query()
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("cursor="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            logs(&api, id, cursor)
        }
        (_, ["ping"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "INVALID_REQUEST_BODY",
            "use GET".into(),
        ),
        (_, ["command"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "INVALID_REQUEST_BODY",
            "use POST".into(),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "NOT_SUPPORTED",
            format!("{method} {path} is not served here; try GET /ping or POST /command"),
        ),
    })
}

async fn run(api: &CommandApi, request: Request<Incoming>) -> Response<ApiBody> {
    let body = match crate::http::read_body(request, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e @ crate::http::BodyError::TooLarge(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "INVALID_REQUEST_BODY",
                e.to_string(),
            );
        }
        Err(e) => return invalid(e.to_string()),
    };
    let request: RunCommandRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return invalid(format!("the body is not a command request: {e}")),
    };
    let spec = match request.validate(|name| std::env::var(name).ok()) {
        Ok(spec) => spec,
        Err(e) => return invalid(e.to_string()),
    };
    let frames = api.commands.start(spec);
    let mut response = Response::new(Either::Right(EventStream(frames)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

fn logs(api: &CommandApi, id: &str, cursor: u64) -> Response<ApiBody> {
    match api.commands.background_output(id, cursor) {
        None if api.commands.status(id).is_some() => invalid(format!(
            "command {id} ran in the foreground; its output was streamed"
        )),
        None => not_found(id),
        Some(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RUNTIME_ERROR",
            format!("reading the output of {id}: {e}"),
        ),
        Some(Ok((data, next))) => {
            let mut response = Response::new(Either::Left(Full::new(Bytes::from(data))));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if let Ok(value) = header::HeaderValue::from_str(&next.to_string()) {
                headers.insert("EXECD-COMMANDS-TAIL-CURSOR", value);
            }
            response
        }
    }
}

fn empty(status: StatusCode) -> Response<ApiBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: String) -> Response<ApiBody> {
    json(status, &ErrorResponse { code, message })
}

fn invalid(message: String) -> Response<ApiBody> {
    error(StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY", message)
}

fn not_found(id: &str) -> Response<ApiBody> {
    error(
        StatusCode::NOT_FOUND,
        "INVALID_REQUEST_BODY",
        format!("no command {id} is known here"),
    )
}
