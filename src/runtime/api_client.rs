//! The client for the Kubernetes API: kube's own (HTTP/1.1), or the same stack (timeouts, retries
//! of 429/503/504, authentication, impersonation headers) offering HTTP/2.
//!
//! kube's client speaks HTTP/1.1 only, so every request in flight needs a connection of its own:
//! a burst of 100 claims holds about 100 TLS connections to the API server. Over HTTP/2 all
//! requests and watches share one connection, as client-go's do, for the same claim latency and
//! CPU here (docs/benchmarks.md). The price is that a fault on that connection fails every
//! request and watch at once, so under a flaky network the watches back off together and a
//! controller recovers more slowly; HTTP/1.1 stays the default. A connection that goes silent
//! would stall everything on it, so the HTTP/2 client pings it and drops it when a ping goes
//! unanswered (client-go's read-idle and ping timeouts).

use std::time::Duration;

use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::retry::RetryPolicy;
use kube::client::{ClientBuilder, ConfigExt};
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// Which HTTP versions the client offers the API server (`--api-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiProtocol {
    /// HTTP/1.1 (kube's client): a connection per request in flight.
    #[default]
    Http1,
    /// HTTP/2 where the API server accepts it (by ALPN), else HTTP/1.1.
    Negotiate,
}

/// A connection on which nothing has arrived for this long is pinged.
pub const PING_AFTER_SILENCE: Duration = Duration::from_secs(30);
/// A ping unanswered for this long closes the connection; its requests and watches fail and are
/// retried on a new one.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The HTTP/2 client connects directly; going around the configured proxy would be wrong.
    #[error(
        "the kubeconfig sends requests through the proxy {0}, which --api-protocol negotiate does not support: use --api-protocol http1"
    )]
    ProxyWithHttp2(String),
}

/// A client for the cluster the environment names (in-cluster, or `KUBECONFIG`).
pub async fn connect(protocol: ApiProtocol) -> Result<kube::Client, ClientError> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    client(config, protocol)
}

/// A client for `config`.
pub fn client(config: kube::Config, protocol: ApiProtocol) -> Result<kube::Client, ClientError> {
    match protocol {
        ApiProtocol::Http1 => Ok(kube::Client::try_from(config)?),
        ApiProtocol::Negotiate => match &config.proxy_url {
            Some(proxy) => Err(ClientError::ProxyWithHttp2(proxy.to_string())),
            None => Ok(http2_client(config)?),
        },
    }
}

/// kube's default stack with ALPN `h2` offered, and HTTP/2 pings.
fn http2_client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    // HTTP/2 writes a request's headers and body as separate frames: with Nagle's algorithm the
    // body would wait for the peer's delayed acknowledgement of the headers (tens of ms).
    tcp.set_nodelay(true);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp);
    let mut connector = TimeoutConnector::new(tls);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_AFTER_SILENCE)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http);
    Ok(ClientBuilder::new(service, config.default_namespace).build())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::net::TcpListener;
    use tokio::sync::Barrier;

    use super::*;

    /// What a TLS server offering both versions saw: each connection's negotiated protocol and
    /// each request's HTTP version.
    #[derive(Default)]
    struct Seen {
        connections: Vec<Option<Vec<u8>>>,
        versions: Vec<Version>,
    }

    /// Serves on 127.0.0.1 with ALPN `h2` and `http/1.1`; a request for `/together` waits until
    /// `together` of them are in flight, so a client without HTTP/2 needs that many connections.
    async fn server(together: usize) -> (kube::Config, Arc<Mutex<Seen>>) {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let barrier = Arc::new(Barrier::new(together));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let stream = acceptor.accept(tcp).await.unwrap();
                let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                let h2 = alpn.as_deref() == Some(b"h2");
                record.lock().unwrap().connections.push(alpn);
                let (record, barrier) = (record.clone(), barrier.clone());
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let (record, barrier) = (record.clone(), barrier.clone());
                    async move {
                        record.lock().unwrap().versions.push(request.version());
                        if request.uri().path() == "/together" {
                            barrier.wait().await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let io = TokioIo::new(stream);
                tokio::spawn(async move {
                    if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    }
                });
            }
        });
        let mut config = kube::Config::new(format!("https://{addr}").parse().unwrap());
        config.root_cert = Some(vec![cert.to_vec()]);
        (config, seen)
    }

    async fn requests_in_flight_together(protocol: ApiProtocol, count: usize) -> Seen {
        let (config, seen) = server(count).await;
        let client = client(config, protocol).unwrap();
        let get =
            |path: &str| client.request_text(http::Request::get(path).body(Vec::new()).unwrap());
        // The first request learns what the server speaks (ALPN); until a connection has, every
        // request in flight opens one of its own.
        assert_eq!(get("/first").await.unwrap(), "ok");
        let calls = (0..count).map(|_| get("/together"));
        let answers =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
                .await
                .expect("every request answered");
        for answer in answers {
            assert_eq!(answer.unwrap(), "ok");
        }
        std::mem::take(&mut *seen.lock().unwrap())
    }

    #[tokio::test]
    async fn requests_in_flight_together_share_one_http2_connection() {
        let seen = requests_in_flight_together(ApiProtocol::Negotiate, 20).await;
        assert_eq!(seen.connections, vec![Some(b"h2".to_vec())]);
        assert_eq!(seen.versions, vec![Version::HTTP_2; 21]);
    }

    #[test]
    fn http2_refuses_a_proxy_it_would_go_around() {
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        config.proxy_url = Some("http://127.0.0.1:3128".parse().unwrap());
        let Err(refused) = client(config, ApiProtocol::Negotiate) else {
            panic!("a client that would go around the proxy");
        };
        assert!(
            matches!(&refused, ClientError::ProxyWithHttp2(proxy) if proxy == "http://127.0.0.1:3128/"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn http1_only_offers_http1_and_opens_a_connection_per_request_in_flight() {
        let seen = requests_in_flight_together(ApiProtocol::Http1, 20).await;
        // No ALPN at all, as kube's own client: the server's default, HTTP/1.1.
        assert_eq!(seen.connections, vec![None; 20]);
        assert_eq!(seen.versions, vec![Version::HTTP_11; 21]);
    }
}
