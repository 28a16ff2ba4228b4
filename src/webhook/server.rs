//! HTTPS plumbing: TLS handshakes, HTTP/1.1 connections, limits, and graceful shutdown. The
//! admission decision itself is [`super::review::review`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::jiff::Timestamp;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::registration::VALIDATE_PATH;
use super::review::review;
use super::{Limits, RuleSettings};
use sandbox_domain::admission::AdmissionContext;

/// What every connection shares.
pub(super) struct Shared {
    pub rules: RuleSettings,
    pub limits: Limits,
    pub admissions: super::AdmissionMetrics,
}

/// Serves one TCP connection until the client closes it, a limit trips, or `stop` turns true
/// (then in-flight requests finish and the connection closes).
pub(super) async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let tls =
        match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
    let service_shared = shared.clone();
    let service = service_fn(move |request| {
        let shared = service_shared.clone();
        async move { Ok::<_, Infallible>(handle(request, &shared).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "connection ended with an error");
            }
        }
        () = stopped(stop) => {
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                debug!(%error, "connection ended with an error while shutting down");
            }
        }
    }
}

/// Resolves once shutdown begins (or the server is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn handle(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, VALIDATE_PATH) => validate(request, shared).await,
        (&Method::GET, "/healthz" | "/readyz") => text(StatusCode::OK, "ok"),
        (_, VALIDATE_PATH) => text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn validate(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let limit = shared.limits.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return too_large(limit);
    }
    let body = Limited::new(request.into_body(), limit);
    let bytes = match tokio::time::timeout(shared.limits.body_timeout, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(limit);
        }
        Ok(Err(error)) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {error}"),
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            );
        }
    };

    let rules = &shared.rules;
    let ctx = AdmissionContext {
        now: Timestamp::now(),
        max_replicas: rules.max_replicas,
        policy_exists: &*rules.policy_exists,
        controller_username: rules.controller_username.as_deref(),
    };
    // The rules are pure and tested never to panic; should one anyway, the request is denied by
    // the apiserver (failurePolicy Fail) and the server keeps serving.
    let reply =
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| review(&bytes, &ctx))) {
            Ok(reply) => reply,
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the admission rules failed on this request",
                );
            }
        };
    if let Some(response) = &reply.response {
        shared.admissions.count(&bytes, response.allowed);
        if response.allowed {
            debug!(uid = %response.uid, warnings = response.warnings.as_ref().map_or(0, Vec::len), "admitted");
        } else {
            info!(uid = %response.uid, reason = %response.result.message, "denied");
        }
    }
    match serde_json::to_vec(&reply) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => {
            warn!(%error, "could not encode an AdmissionReview reply");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the reply",
            )
        }
    }
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body exceeds {limit} bytes"),
    )
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Pauses accepting briefly after an accept error (e.g. out of file descriptors), so the loop
/// does not spin.
pub(super) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
