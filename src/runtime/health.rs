//! Liveness, readiness and Prometheus metrics over plain HTTP (bind it to a private address).
//!
//! `/readyz` is ready only while every cache has synced and, with leader election, this instance
//! can prove it leads (its lease fence is open, see [`Fence`]): a controller that has not seen
//! the whole cluster, or that has stopped writing because its lease renewals stall, must not look
//! healthy. It turns ready again once a renewal is proven.

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

use super::leader::Fence;

/// Whether this instance is ready, also exported as `sandbox_controller_ready`. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Every cache has synced.
    synced: Arc<std::sync::atomic::AtomicBool>,
    /// Open while this instance may write (always, without leader election).
    fence: Arc<std::sync::OnceLock<Fence>>,
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

    /// Readiness also follows `fence`: ready only while it is open. Set once, before serving.
    pub fn follow_fence(&self, fence: Fence) {
        let _ = self.fence.set(fence);
        self.refresh();
    }

    /// Records whether every cache has synced.
    pub fn set_synced(&self, synced: bool) {
        self.synced
            .store(synced, std::sync::atomic::Ordering::SeqCst);
        self.refresh();
    }

    /// Ready: caches synced and, with leader election, the lease proven right now. Also brings
    /// the gauge up to date.
    pub fn is_ready(&self) -> bool {
        self.refresh()
    }

    fn refresh(&self) -> bool {
        let leading = self.fence.get().is_none_or(|fence| fence.check().is_ok());
        let ready = self.synced.load(std::sync::atomic::Ordering::SeqCst) && leading;
        self.ready.set(i64::from(ready));
        ready
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
            "caches not synced, or not (provably) leading".to_string(),
        ),
        "/metrics" => {
            // The fence closes on its own clock: the gauge is brought up to date when read.
            health.refresh();
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn without_leader_election_ready_means_synced() {
        let health = Health::default();
        assert!(!health.is_ready());
        health.set_synced(true);
        assert!(health.is_ready());
        health.follow_fence(Fence::default());
        assert!(
            health.is_ready(),
            "a fence without leader election is always open"
        );
    }

    #[test]
    fn with_leader_election_ready_follows_the_lease_fence() {
        let health = Health::default();
        let fence = Fence::leased();
        health.follow_fence(fence.clone());
        health.set_synced(true);
        assert!(!health.is_ready(), "never proven: not leading");
        fence.prove_until(Instant::now() + Duration::from_secs(60));
        assert!(health.is_ready());
        assert_eq!(health.ready.get(), 1);
        fence.revoke();
        assert!(!health.is_ready(), "the lease is someone else's");
        assert_eq!(health.ready.get(), 0, "the gauge follows");
        fence.prove_until(Instant::now() + Duration::from_millis(30));
        assert!(health.is_ready(), "leading again");
        let limit = Instant::now() + Duration::from_secs(5);
        while health.is_ready() {
            assert!(
                Instant::now() < limit,
                "the proof ran out but /readyz stayed ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        health.set_synced(false);
        fence.prove_until(Instant::now() + Duration::from_secs(60));
        assert!(!health.is_ready(), "caches not synced");
    }

    #[tokio::test]
    async fn readyz_answers_503_while_fenced() {
        let health = Health::default();
        let fence = Fence::leased();
        health.follow_fence(fence.clone());
        health.set_synced(true);
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = probe.local_addr().expect("an address");
        drop(probe);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            addr,
            health.clone(),
            Arc::new(Registry::default()),
            async {
                let _ = stopped.await;
            },
        ));
        let status = |addr: SocketAddr| async move {
            let limit = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    stream
                        .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                        .await
                        .expect("a request");
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer).await.expect("an answer");
                    return answer.split(' ').nth(1).unwrap_or_default().to_string();
                }
                assert!(Instant::now() < limit, "the health server never listened");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert_eq!(status(addr).await, "503");
        fence.prove_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(status(addr).await, "200");
        fence.revoke();
        assert_eq!(status(addr).await, "503");
        let _ = stop.send(());
        server.await.expect("the server task").expect("the server");
    }
}
