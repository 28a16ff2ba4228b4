//! The server over real TLS on loopback: routing, limits, timeouts, certificate reload and
//! graceful shutdown. No apiserver involved (registration is exercised by the e2e tests).

use super::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Running {
    addr: SocketAddr,
    reloads: tokio::sync::watch::Receiver<CertReloads>,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    fn ca(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join(certs::CA_FILE)).unwrap()
    }

    async fn stop(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .expect("server task")
    }
}

async fn start(limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let config = WebhookConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: TlsSettings {
            cert_dir: dir.path().to_path_buf(),
            generate_for: Some(default_sans()),
            reload_interval: Duration::from_millis(100),
        },
        rules: RuleSettings::default(),
        limits,
        registration: None,
    };
    let webhook = Webhook::bind(config).await.expect("bind");
    let addr = webhook.local_addr();
    let reloads = webhook.cert_reloads();
    assert_ne!(addr.port(), 0);
    assert_eq!(
        webhook.url(),
        format!("https://127.0.0.1:{}/validate", addr.port())
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(webhook.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        reloads,
        dir,
        stop: Some(stop),
        task,
    }
}

async fn tls(addr: SocketAddr, ca_pem: &[u8]) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

async fn client(addr: SocketAddr, ca_pem: &[u8]) -> SendRequest<Full<Bytes>> {
    let stream = tls(addr, ca_pem).await.expect("TLS handshake");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn call(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn pool_review() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "operation": "CREATE", "userInfo": {},
            "kind": {"group": "sandbox.opensandbox.io", "version": "v1alpha1", "kind": "Pool"},
            "resource": {"group": "sandbox.opensandbox.io", "version": "v1alpha1", "resource": "pools"},
            "object": {"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": "p"},
                       "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                                "capacitySpec": {"bufferMax": 1, "bufferMin": 2, "poolMax": 3, "poolMin": 0}}},
        }
    }))
    .unwrap()
}

/// Reads until the server closes the stream (or errors); returns what arrived and how long it took.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("server closes within 10 s")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn answers_reviews_health_checks_and_nothing_else() {
    let server = start(Limits::default()).await;
    let mut sender = client(server.addr, &server.ca()).await;

    let (status, body) = call(&mut sender, "POST", "/validate", pool_review()).await;
    assert_eq!(status, StatusCode::OK);
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["response"]["uid"], "u-1");
    assert_eq!(reply["response"]["allowed"], false);
    assert_eq!(
        reply["response"]["status"]["message"],
        "spec.capacitySpec.bufferMin: 2 must be <= bufferMax (1)"
    );

    // Same connection, kept alive.
    assert_eq!(
        call(&mut sender, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&mut sender, "GET", "/validate", vec![]).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        call(&mut sender, "POST", "/mutate", vec![]).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = call(&mut sender, "POST", "/validate", b"{}".to_vec()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a malformed review still gets a review back"
    );
    assert!(body.contains("\"allowed\":false"), "{body}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_bodies_are_refused_declared_or_streamed() {
    let server = start(Limits {
        max_body_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let mut sender = client(server.addr, &server.ca()).await;
    let (status, _) = call(&mut sender, "POST", "/validate", vec![b' '; 4096]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Chunked, so no Content-Length to refuse up front: the limit trips while reading.
    let mut stream = tls(server.addr, &server.ca()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 800, " ".repeat(800));
    let request = format!(
        "POST /validate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = start(limits).await;

    // Connects, never says hello.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (_, waited) = read_until_closed(&mut silent).await;
    assert!(
        waited < Duration::from_secs(3),
        "handshake timeout took {waited:?}"
    );

    // Half a request line, then nothing.
    let mut slow_headers = tls(server.addr, &server.ca()).await.unwrap();
    slow_headers
        .write_all(b"POST /validate HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, waited) = read_until_closed(&mut slow_headers).await;
    assert!(
        waited < Duration::from_secs(3),
        "header timeout took {waited:?}"
    );

    // Headers promise 100 bytes, 10 arrive.
    let mut slow_body = tls(server.addr, &server.ca()).await.unwrap();
    slow_body
        .write_all(b"POST /validate HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (reply, waited) = read_until_closed(&mut slow_body).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        waited < Duration::from_secs(3),
        "body timeout took {waited:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn changed_certificate_files_are_served_without_a_restart() {
    let server = start(Limits::default()).await;
    let old_ca = server.ca();
    assert!(tls(server.addr, &old_ca).await.is_ok());

    let mut reloads = server.reloads.clone();
    let new_ca = write_certificates(server.dir.path(), &default_sans())
        .unwrap()
        .into_bytes();
    assert_ne!(old_ca, new_ca);
    tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|r| r.loaded >= 1))
        .await
        .expect("the new certificate was picked up")
        .unwrap();
    assert!(
        tls(server.addr, &new_ca).await.is_ok(),
        "the new CA verifies the server"
    );
    assert!(
        tls(server.addr, &old_ca).await.is_err(),
        "the old CA no longer verifies the server"
    );

    // Garbage in the files keeps the last good certificate in service.
    let rejected_before = reloads.borrow().rejected;
    std::fs::write(server.dir.path().join(certs::CERT_FILE), "garbage").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        reloads.wait_for(|r| r.rejected > rejected_before),
    )
    .await
    .expect("the changed files were looked at")
    .unwrap();
    let mut sender = client(server.addr, &new_ca).await;
    assert_eq!(
        call(&mut sender, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_listening() {
    let server = start(Limits::default()).await;
    let addr = server.addr;
    let body = pool_review();
    let (head, tail) = body.split_at(body.len() / 2);

    let mut stream = tls(addr, &server.ca()).await.unwrap();
    // `Expect: 100-continue` makes the server say when it has parsed the headers and starts on
    // the body: from then on the request is in flight.
    let headers = format!(
        "POST /validate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(headers.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("the server answers 100 Continue")
            .unwrap();
        assert_eq!(read, 1, "connection closed before 100 Continue");
        interim.push(byte[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(head).await.unwrap();

    let Running {
        stop, task, dir, ..
    } = server;
    stop.unwrap().send(()).unwrap();
    // The listener closes first; the request in flight must still be answered after that.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the webhook kept listening after shutdown"
        );
        tokio::task::yield_now().await;
    }
    stream.write_all(tail).await.unwrap();
    let (reply, _) = read_until_closed(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"uid\":\"u-1\""), "{reply}");

    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run returns")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    drop(dir);
}

#[tokio::test]
async fn registration_without_a_ca_file_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    write_certificates(dir.path(), &default_sans()).unwrap();
    std::fs::remove_file(dir.path().join(certs::CA_FILE)).unwrap();
    // A client that is never used: bind fails before any request.
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let registration = Registration {
        name: "x".into(),
        target: Target::ListenAddress,
        only_namespace: None,
        exclude_namespace: None,
        timeout_seconds: 5,
        delete_on_shutdown: true,
        exempt_username: None,
    };
    let config = WebhookConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: TlsSettings {
            cert_dir: dir.path().to_path_buf(),
            generate_for: None,
            reload_interval: Duration::from_secs(1),
        },
        rules: RuleSettings::default(),
        limits: Limits::default(),
        registration: Some((client, registration)),
    };
    assert!(matches!(
        Webhook::bind(config).await,
        Err(Error::NoCaBundle { .. })
    ));
}

#[test]
fn known_policies_accepts_exactly_its_names() {
    let check = known_policies(["demand-aware".to_string()]);
    assert!(check("demand-aware"));
    assert!(!check("demand"));
    assert!(!known_policies([])("anything"));
}
