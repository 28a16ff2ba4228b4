//! A fault-injecting TCP proxy for loopback chaos runs: it sits between a client (the controller)
//! and a server (the kube-apiserver) and, chosen by a seeded RNG, drops a response after
//! forwarding its request, resets a connection right after a request, delays every chunk of a
//! connection, or stalls a connection's server-to-client direction (a watch goes silent).
//!
//! TLS passes through untouched: the proxy never decrypts. It finds requests by TLS record
//! framing ([`Framing::Tls`]: an application-data record of at least [`TLS_REQUEST_MIN_LEN`] bytes
//! sent after the server last spoke; handshake records and the client's `Finished` are smaller)
//! or, for plain-text servers in tests, by turn-taking ([`Framing::Raw`]: the first client chunk
//! after the server last spoke).
//!
//! Fault decisions are drawn from one RNG seeded with [`FaultConfig::seed`], in connection and
//! request order, so a run with the same seed draws the same sequence (which requests it hits
//! still depends on timing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A client application-data record at least this long is a request (an HTTP request with its
/// headers always is; the TLS 1.3 client `Finished`, 53 bytes, is not).
pub const TLS_REQUEST_MIN_LEN: usize = 100;
const TLS_APPLICATION_DATA: u8 = 0x17;

/// How long a dropped response's bytes are swallowed before the connection is closed, so a
/// response that follows a session ticket is swallowed too rather than delivered.
const DROP_GRACE: Duration = Duration::from_millis(200);

/// How requests are recognised on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// TLS records (content type and length from each 5-byte header; payloads stay opaque).
    Tls,
    /// Plain bytes: a client chunk after the server spoke starts a request.
    Raw,
}

/// What faults the proxy injects, and how often.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    pub seed: u64,
    pub framing: Framing,
    /// Per request: forward it, then swallow the response and close the connection.
    pub drop_response: f64,
    /// Per request: forward it, then reset (RST) both sides at once.
    pub reset: f64,
    /// Per connection: delay every chunk in both directions by a time drawn from `latency`.
    pub latency_conn: f64,
    pub latency: (Duration, Duration),
    /// Per connection: after a time drawn from `stall_after`, forward nothing from the server for
    /// `stall` (the client sees a silent watch or a hung response), then resume.
    pub stall_conn: f64,
    pub stall_after: (Duration, Duration),
    pub stall: Duration,
}

impl FaultConfig {
    /// No faults at all: a plain pass-through.
    pub fn none(seed: u64, framing: Framing) -> Self {
        Self {
            seed,
            framing,
            drop_response: 0.0,
            reset: 0.0,
            latency_conn: 0.0,
            latency: (Duration::ZERO, Duration::ZERO),
            stall_conn: 0.0,
            stall_after: (Duration::ZERO, Duration::ZERO),
            stall: Duration::ZERO,
        }
    }
}

/// Counts of what the proxy did, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub connections: u64,
    pub requests: u64,
    pub dropped_responses: u64,
    pub resets: u64,
    pub delayed_connections: u64,
    pub stalls: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    dropped_responses: AtomicU64,
    resets: AtomicU64,
    delayed_connections: AtomicU64,
    stalls: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FaultCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            connections: get(&self.connections),
            requests: get(&self.requests),
            dropped_responses: get(&self.dropped_responses),
            resets: get(&self.resets),
            delayed_connections: get(&self.delayed_connections),
            stalls: get(&self.stalls),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "{what} {addr} is not a loopback address: the fault proxy only runs on 127.0.0.0/8 or [::1]"
    )]
    NotLoopback {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("binding the fault proxy to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    config: FaultConfig,
    upstream: SocketAddr,
    rng: Mutex<fastrand::Rng>,
    counters: Counters,
    /// Faults are drawn only while true; turning it off also ends running stalls.
    enabled: watch::Sender<bool>,
}

impl Shared {
    fn chance(&self, p: f64) -> bool {
        *self.enabled.borrow()
            && p > 0.0
            && self.rng.lock().unwrap_or_else(|e| e.into_inner()).f64() < p
    }

    fn between(&self, (low, high): (Duration, Duration)) -> Duration {
        if high <= low {
            return low;
        }
        let span = (high - low).as_millis() as u64;
        low + Duration::from_millis(
            self.rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .u64(0..=span),
        )
    }
}

/// A running proxy; dropping it stops accepting (open connections end with their peers).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream`; both must be loopback.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: FaultConfig,
    ) -> Result<Self, ProxyError> {
        for (what, addr) in [("listen address", listen), ("upstream", upstream)] {
            if !addr.ip().is_loopback() {
                return Err(ProxyError::NotLoopback { what, addr });
            }
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            config,
            upstream,
            counters: Counters::default(),
            enabled: watch::channel(true).0,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Turns fault injection on or off; off also releases running stalls at once.
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.enabled.send_replace(enabled);
    }

    pub fn counts(&self) -> FaultCounts {
        self.shared.counters.snapshot()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: wait a little rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(shared.upstream).await {
                serve(client, server, shared).await;
            }
        });
    }
}

/// What one connection does, decided when it opens.
struct ConnPlan {
    delay: Option<Duration>,
    stall_at: Option<Duration>,
}

/// State both directions of one connection share.
struct Conn {
    shared: Arc<Shared>,
    /// The server sent bytes since the last request began.
    server_spoke: AtomicBool,
    /// Swallow server bytes and close shortly after the first one.
    dropping: AtomicBool,
    /// Set to end the connection; `true` asks for a reset rather than a close.
    end: watch::Sender<Option<bool>>,
}

async fn serve(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let plan = ConnPlan {
        delay: shared
            .chance(shared.config.latency_conn)
            .then(|| shared.between(shared.config.latency)),
        stall_at: shared
            .chance(shared.config.stall_conn)
            .then(|| shared.between(shared.config.stall_after)),
    };
    if plan.delay.is_some() {
        shared
            .counters
            .delayed_connections
            .fetch_add(1, Ordering::Relaxed);
    }
    let conn = Arc::new(Conn {
        shared,
        server_spoke: AtomicBool::new(true),
        dropping: AtomicBool::new(false),
        end: watch::channel(None).0,
    });
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = tokio::spawn(client_to_server(
        conn.clone(),
        client_read,
        server_write,
        plan.delay,
    ));
    let downstream = tokio::spawn(server_to_client(
        conn.clone(),
        server_read,
        client_write,
        plan.delay,
        plan.stall_at,
    ));
    let _ = tokio::join!(upstream, downstream);
}

/// Tracks TLS record boundaries across reads.
#[derive(Default)]
struct TlsFramer {
    header: Vec<u8>,
    remaining: usize,
}

impl TlsFramer {
    /// Feeds a chunk; returns the payload length of every application-data record whose header
    /// completes in it.
    fn feed(&mut self, mut chunk: &[u8]) -> Vec<usize> {
        let mut starts = Vec::new();
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(chunk.len());
                self.remaining -= skip;
                chunk = &chunk[skip..];
                continue;
            }
            let need = 5 - self.header.len();
            let take = need.min(chunk.len());
            self.header.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.header.len() == 5 {
                let len = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.header[0] == TLS_APPLICATION_DATA {
                    starts.push(len);
                }
                self.remaining = len;
                self.header.clear();
            }
        }
        starts
    }
}

async fn client_to_server(
    conn: Arc<Conn>,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Option<Duration>,
) {
    let mut framer = TlsFramer::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = conn.end.subscribe();
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = end.wait_for(Option::is_some) => break,
        };
        let chunk = &buf[..n];
        let request_starts = match conn.shared.config.framing {
            Framing::Raw => usize::from(conn.server_spoke.load(Ordering::Relaxed)),
            Framing::Tls => framer
                .feed(chunk)
                .into_iter()
                .filter(|len| *len >= TLS_REQUEST_MIN_LEN)
                .count()
                .min(usize::from(conn.server_spoke.load(Ordering::Relaxed))),
        };
        // A request starts in this chunk: decide its fate before it leaves, so its response
        // cannot slip through ahead of the decision.
        let mut reset = false;
        if request_starts > 0 {
            conn.server_spoke.store(false, Ordering::Relaxed);
            let shared = &conn.shared;
            shared.counters.requests.fetch_add(1, Ordering::Relaxed);
            if shared.chance(shared.config.reset) {
                reset = true;
            } else if shared.chance(shared.config.drop_response) {
                shared
                    .counters
                    .dropped_responses
                    .fetch_add(1, Ordering::Relaxed);
                conn.dropping.store(true, Ordering::Relaxed);
            }
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if to.write_all(chunk).await.is_err() {
            break;
        }
        if reset {
            // The request's bytes (this read) reached the server's socket; now both sides get a
            // reset. HTTP/1.1 requests of this client fit in one read or follow at once.
            let _ = to.flush().await;
            conn.shared.counters.resets.fetch_add(1, Ordering::Relaxed);
            let _ = to.as_ref().set_zero_linger();
            conn.end.send_replace(Some(true));
            // With zero linger, closing without a prior FIN sends a reset.
            to.forget();
            return;
        }
    }
    // The client finished (or the connection ends): pass the half-close on.
    let _ = to.shutdown().await;
}

async fn server_to_client(
    conn: Arc<Conn>,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Option<Duration>,
    stall_at: Option<Duration>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = conn.end.subscribe();
    let mut enabled = conn.shared.enabled.subscribe();
    let opened = tokio::time::Instant::now();
    let mut stall_at = stall_at.map(|d| opened + d);
    let mut drop_deadline: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = stall_at
            && tokio::time::Instant::now() >= at
        {
            stall_at = None;
            conn.shared.counters.stalls.fetch_add(1, Ordering::Relaxed);
            // Read nothing: the server's bytes queue up in the kernel, the client hears nothing.
            tokio::select! {
                _ = tokio::time::sleep(conn.shared.config.stall) => {}
                _ = enabled.wait_for(|on| !on) => {}
                _ = end.wait_for(Option::is_some) => break,
            }
        }
        let stall_sleep = async {
            match stall_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let drop_sleep = async {
            match drop_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let n = tokio::select! {
            read = from.read(&mut buf) => match read { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = end.wait_for(Option::is_some) => break,
            _ = stall_sleep => continue,
            _ = drop_sleep => {
                conn.end.send_replace(Some(false));
                break;
            }
        };
        conn.server_spoke.store(true, Ordering::Relaxed);
        if conn.dropping.load(Ordering::Relaxed) {
            drop_deadline.get_or_insert_with(|| tokio::time::Instant::now() + DROP_GRACE);
            continue;
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if *conn.end.borrow() == Some(true) {
        let _ = to.as_ref().set_zero_linger();
        to.forget();
        return;
    }
    conn.end.send_if_modified(|end| {
        if end.is_none() {
            *end = Some(false);
            true
        } else {
            false
        }
    });
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use tokio::time::{Instant, timeout};

    /// An echo server on 127.0.0.1 that answers every chunk with the same bytes.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn proxy(config: FaultConfig) -> FaultProxy {
        let upstream = echo_server().await;
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream, config)
            .await
            .unwrap()
    }

    /// Sends `msg` and reads until `msg.len()` bytes came back, the connection ended, or 3 s.
    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(msg).await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < msg.len() {
            match timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
                Err(_) => return Err(ErrorKind::TimedOut.into()),
                Ok(Ok(0)) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(got)
    }

    #[tokio::test]
    async fn passes_bytes_through_without_faults() {
        let p = proxy(FaultConfig::none(1, Framing::Raw)).await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        for i in 0..5 {
            let msg = format!("hello {i}");
            assert_eq!(
                round_trip(&mut s, msg.as_bytes()).await.unwrap(),
                msg.as_bytes()
            );
        }
        let counts = p.counts();
        assert_eq!((counts.connections, counts.requests), (1, 5));
        assert_eq!(counts.dropped_responses + counts.resets + counts.stalls, 0);
    }

    #[tokio::test]
    async fn drops_the_response_after_forwarding_the_request() {
        let p = proxy(FaultConfig {
            drop_response: 1.0,
            ..FaultConfig::none(2, Framing::Raw)
        })
        .await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        // The echo server got the request (it answered); the client gets nothing back, then EOF.
        let err = round_trip(&mut s, b"request").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert_eq!(p.counts().dropped_responses, 1);
    }

    #[tokio::test]
    async fn resets_the_connection_after_a_request() {
        let p = proxy(FaultConfig {
            reset: 1.0,
            ..FaultConfig::none(3, Framing::Raw)
        })
        .await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        let err = round_trip(&mut s, b"request").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert_eq!(p.counts().resets, 1);
    }

    #[tokio::test]
    async fn delays_every_chunk_of_a_slow_connection() {
        let p = proxy(FaultConfig {
            latency_conn: 1.0,
            latency: (Duration::from_millis(150), Duration::from_millis(150)),
            ..FaultConfig::none(4, Framing::Raw)
        })
        .await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        let start = Instant::now();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        // One delay each way: the exchange cannot be faster than both.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(p.counts().delayed_connections, 1);
    }

    #[tokio::test]
    async fn stalls_the_server_side_until_disabled() {
        let p = proxy(FaultConfig {
            stall_conn: 1.0,
            stall_after: (Duration::ZERO, Duration::ZERO),
            stall: Duration::from_secs(3600),
            ..FaultConfig::none(5, Framing::Raw)
        })
        .await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        s.write_all(b"watch").await.unwrap();
        let mut buf = [0u8; 16];
        // Nothing arrives while the stall lasts...
        assert!(
            timeout(Duration::from_millis(500), s.read(&mut buf))
                .await
                .is_err()
        );
        assert_eq!(p.counts().stalls, 1);
        // ...and the queued response arrives once faults are turned off.
        p.set_enabled(false);
        let n = timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"watch");
    }

    #[tokio::test]
    async fn disabled_proxy_draws_no_faults() {
        let p = proxy(FaultConfig {
            drop_response: 1.0,
            reset: 1.0,
            ..FaultConfig::none(6, Framing::Raw)
        })
        .await;
        p.set_enabled(false);
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"fine").await.unwrap(), b"fine");
        assert_eq!(p.counts().dropped_responses + p.counts().resets, 0);
    }

    fn tls_record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, len));
        r
    }

    #[tokio::test]
    async fn tls_framing_drops_only_after_a_request_sized_record() {
        let p = proxy(FaultConfig {
            drop_response: 1.0,
            ..FaultConfig::none(7, Framing::Tls)
        })
        .await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        // Handshake (type 22) and a Finished-sized application record pass untouched.
        let hello = tls_record(22, 200);
        assert_eq!(round_trip(&mut s, &hello).await.unwrap(), hello);
        let finished = tls_record(TLS_APPLICATION_DATA, 53);
        assert_eq!(round_trip(&mut s, &finished).await.unwrap(), finished);
        assert_eq!(p.counts().requests, 0);
        // A request-sized record is forwarded, its response swallowed.
        let request = tls_record(TLS_APPLICATION_DATA, 300);
        let err = round_trip(&mut s, &request).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert_eq!((p.counts().requests, p.counts().dropped_responses), (1, 1));
    }

    #[test]
    fn tls_framer_follows_records_split_across_reads() {
        let mut framer = TlsFramer::default();
        let mut bytes = tls_record(TLS_APPLICATION_DATA, 120);
        bytes.extend(tls_record(21, 2));
        bytes.extend(tls_record(TLS_APPLICATION_DATA, 7));
        let mut seen = Vec::new();
        for piece in bytes.chunks(3) {
            seen.extend(framer.feed(piece));
        }
        assert_eq!(seen, [120, 7]);
    }

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let draw = |seed| {
            let shared = Shared {
                config: FaultConfig::none(seed, Framing::Raw),
                upstream: "127.0.0.1:1".parse().unwrap(),
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
                counters: Counters::default(),
                enabled: watch::channel(true).0,
            };
            (0..64).map(|_| shared.chance(0.3)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[tokio::test]
    async fn refuses_non_loopback_addresses() {
        let err = FaultProxy::start(
            "0.0.0.0:0".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            FaultConfig::none(0, Framing::Raw),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ProxyError::NotLoopback { .. }));
        let err = FaultProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
            FaultConfig::none(0, Framing::Raw),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ProxyError::NotLoopback { .. }));
    }
}
