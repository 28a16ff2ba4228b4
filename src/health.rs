//! Liveness, readiness and Prometheus metrics over plain HTTP (bind it to a private address).
//!
//! `/readyz` turns ready only once every cache has synced and, with leader election, this
//! instance leads: a controller that has not seen the whole cluster must not look healthy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::controller::WriteCounter;

/// What the health endpoints report.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    pub writes: Arc<WriteCounter>,
    /// Extra metric lines (Prometheus text format) from other parts, e.g. policies.
    pub extra: std::sync::Mutex<Vec<Box<dyn Fn() -> String + Send + Sync>>>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn metrics(&self) -> String {
        let mut out = String::from(
            "# HELP sandbox_controller_api_writes_total API write requests made by the controller, by target.\n\
             # TYPE sandbox_controller_api_writes_total counter\n",
        );
        for (target, count) in self.writes.snapshot() {
            out.push_str(&format!(
                "sandbox_controller_api_writes_total{{target=\"{}\"}} {count}\n",
                target.label()
            ));
        }
        out.push_str(&format!(
            "# HELP sandbox_controller_ready Whether caches are synced (and this instance leads).\n\
             # TYPE sandbox_controller_ready gauge\n\
             sandbox_controller_ready {}\n",
            u8::from(self.is_ready())
        ));
        for extra in self.extra.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&extra());
        }
        out
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
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
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(health.clone(), request));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(%error, "health connection failed");
            }
        });
    }
}

async fn respond(
    health: Arc<Health>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "ok".to_string()),
        "/readyz" if health.is_ready() => (StatusCode::OK, "ready".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches not synced or not leading".to_string(),
        ),
        "/metrics" => (StatusCode::OK, health.metrics()),
        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default())
}
