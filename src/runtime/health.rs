//! Liveness, readiness and Prometheus metrics over plain HTTP (bind it to a private address).
//!
//! `/readyz` turns ready only once every cache has synced and, with leader election, this
//! instance leads: a controller that has not seen the whole cluster must not look healthy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Whether this instance is ready, also exported as `sandbox_controller_ready`. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Gauge,
}

impl Health {
    /// Adds the readiness gauge to `registry`, whose prefix should be `sandbox_controller`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ready",
            "Whether caches are synced (and this instance leads)",
            self.ready.clone(),
        );
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` (everything in `registry`) until `shutdown`
/// resolves.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "health and metrics listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => return Ok(()),
        };
        let (health, registry) = (health.clone(), registry.clone());
        tokio::spawn(async move {
            let service =
                service_fn(move |request| respond(health.clone(), registry.clone(), request));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(%error, "health connection failed");
            }
        });
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn respond(
    health: Health,
    registry: Arc<Registry>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, TEXT, "ok".to_string()),
        "/readyz" if health.is_ready() => (StatusCode::OK, TEXT, "ready".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "caches not synced or not leading".to_string(),
        ),
        "/metrics" => {
            let mut text = String::new();
            match encode(&mut text, &registry) {
                Ok(()) => (StatusCode::OK, OPENMETRICS, text),
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding metrics: {error}"),
                ),
            }
        }
        _ => (StatusCode::NOT_FOUND, TEXT, "not found".to_string()),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default())
}
