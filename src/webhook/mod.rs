//! The validating admission webhook: an HTTPS server (hyper 1 + rustls) that answers
//! AdmissionReview v1 for BatchSandbox and Pool with the rules of [`sandbox_domain::admission`].
//!
//! [`serve`] runs it until a shutdown future resolves, so `sandbox-controller run` can embed it
//! and `sandbox-controller webhook` can run it alone. Locally it generates its own CA and serving
//! certificate and registers itself with the apiserver; in a cluster it reads cert-manager's files.
//! Either way the certificate files are re-read when they change.

pub mod certs;
pub mod registration;
pub mod review;
mod server;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

pub use registration::{Registration, Target};
use sandbox_domain::admission::DEFAULT_MAX_REPLICAS;

/// Decides whether a policy name can be loaded. The policy registry provides the real check; until
/// then [`known_policies`] accepts exactly the names it is given.
pub type PolicyCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A [`PolicyCheck`] that knows exactly these names.
pub fn known_policies(names: impl IntoIterator<Item = String>) -> PolicyCheck {
    let names: std::collections::BTreeSet<String> = names.into_iter().collect();
    Arc::new(move |name: &str| names.contains(name))
}

/// Everything the webhook needs to run.
pub struct WebhookConfig {
    /// Address to listen on; port 0 picks a free port (see [`Webhook::local_addr`]).
    pub listen: SocketAddr,
    pub tls: TlsSettings,
    pub rules: RuleSettings,
    pub limits: Limits,
    /// Register a ValidatingWebhookConfiguration with this client, or leave registration to
    /// manifests (cert-manager) when `None`.
    pub registration: Option<(kube::Client, Registration)>,
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Directory with `tls.crt`, `tls.key` and (for registration) `ca.crt`.
    pub cert_dir: PathBuf,
    /// Generate a fresh CA and serving certificate for these SANs at start (local runs); `None`
    /// uses the files as they are (cert-manager).
    pub generate_for: Option<Vec<String>>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// Settings of the admission rules.
#[derive(Clone)]
pub struct RuleSettings {
    pub max_replicas: i32,
    pub policy_exists: PolicyCheck,
    /// The controller's username: only it may write the controller-owned annotations (`None`:
    /// that check is off).
    pub controller_username: Option<String>,
}

impl Default for RuleSettings {
    fn default() -> Self {
        Self {
            max_replicas: DEFAULT_MAX_REPLICAS,
            policy_exists: known_policies([]),
            controller_username: None,
        }
    }
}

/// Protection against slow or oversized clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body. An AdmissionReview holds the object and the old object, each up to
    /// the apiserver's ~1.5 MiB limit, plus envelope.
    pub max_body_bytes: usize,
    pub handshake_timeout: Duration,
    /// Time to receive a request's headers, also bounding idle keep-alive connections.
    pub header_timeout: Duration,
    /// Time to receive a request's body once its headers are in.
    pub body_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 6 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            max_connections: 512,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registering ValidatingWebhookConfiguration {name}: {source}")]
    Register { name: String, source: kube::Error },
    #[error("cannot register the webhook: {} has no {} to use as caBundle", dir.display(), certs::CA_FILE)]
    NoCaBundle { dir: PathBuf },
}

/// Binds and runs the webhook until `shutdown` resolves; see [`Webhook`].
pub async fn serve(config: WebhookConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Webhook::bind(config).await?.run(shutdown).await
}

/// A webhook whose port is bound and whose certificate is loaded, ready to [`run`](Self::run).
pub struct Webhook {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: TlsAcceptor,
    resolver: Arc<certs::ReloadingCert>,
    provider: Arc<CryptoProvider>,
    cert_digest: [u8; 32],
    /// Digest of changed files that failed to load, so the failure is logged once, not every tick.
    failed_digest: Option<[u8; 32]>,
    tls: TlsSettings,
    shared: Arc<server::Shared>,
    registration: Option<(kube::Client, Registration)>,
    reloads: watch::Sender<CertReloads>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct AdmissionLabels {
    kind: &'static str,
    operation: &'static str,
    allowed: &'static str,
}

/// Admission requests answered, by kind, operation and verdict
/// (`sandbox_webhook_admissions_total`). Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct AdmissionMetrics {
    answered: prometheus_client::metrics::family::Family<
        AdmissionLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl AdmissionMetrics {
    /// Adds the counter to `registry`, whose prefix should be `sandbox_webhook`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "admissions",
            "Admission requests answered, by kind, operation and whether they were allowed",
            self.answered.clone(),
        );
    }

    /// Counts the answer to the review in `body`. Kinds and operations other than ours count as
    /// `other`, so a caller cannot grow the label set.
    pub(crate) fn count(&self, body: &[u8], allowed: bool) {
        #[derive(serde::Deserialize)]
        struct Review {
            request: Option<Request>,
        }
        #[derive(serde::Deserialize)]
        struct Request {
            kind: Option<Gvk>,
            operation: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Gvk {
            kind: String,
        }
        let request = serde_json::from_slice::<Review>(body)
            .ok()
            .and_then(|r| r.request);
        let kind = match request
            .as_ref()
            .and_then(|r| r.kind.as_ref())
            .map(|k| k.kind.as_str())
        {
            Some("BatchSandbox") => "BatchSandbox",
            Some("Pool") => "Pool",
            Some("Scale") => "Scale",
            _ => "other",
        };
        let operation = match request.as_ref().and_then(|r| r.operation.as_deref()) {
            Some("CREATE") => "CREATE",
            Some("UPDATE") => "UPDATE",
            Some("DELETE") => "DELETE",
            _ => "other",
        };
        let allowed = if allowed { "true" } else { "false" };
        self.answered
            .get_or_create(&AdmissionLabels {
                kind,
                operation,
                allowed,
            })
            .inc();
    }
}

/// How often changed certificate files were taken into service or refused, so a rotation can
/// be observed (tests, logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CertReloads {
    pub loaded: u64,
    pub rejected: u64,
}

impl Webhook {
    /// Prepares the certificate (generating it if asked), then binds the port.
    pub async fn bind(config: WebhookConfig) -> Result<Self, Error> {
        let WebhookConfig {
            listen,
            tls,
            rules,
            limits,
            registration,
        } = config;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        if let Some(sans) = &tls.generate_for {
            certs::generate(&tls.cert_dir, sans, Timestamp::now())?;
            info!(dir = %tls.cert_dir.display(), ?sans, "generated a CA and serving certificate");
        }
        let pair = certs::load_pair(&tls.cert_dir, &provider)?;
        if registration.is_some() && certs::read_ca(&tls.cert_dir)?.is_none() {
            return Err(Error::NoCaBundle {
                dir: tls.cert_dir.clone(),
            });
        }
        let resolver = Arc::new(certs::ReloadingCert::new(pair.key));
        let mut server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
        Ok(Self {
            listener,
            local_addr,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            resolver,
            provider,
            cert_digest: pair.digest,
            failed_digest: None,
            tls,
            shared: Arc::new(server::Shared {
                rules,
                limits,
                admissions: AdmissionMetrics::default(),
            }),
            registration,
            reloads: watch::Sender::new(CertReloads::default()),
        })
    }

    /// The admission counters, for the process's metrics registry.
    pub fn admissions(&self) -> AdmissionMetrics {
        self.shared.admissions.clone()
    }

    /// Counts of certificate reloads, updated while [`Webhook::run`] serves.
    pub fn cert_reloads(&self) -> watch::Receiver<CertReloads> {
        self.reloads.subscribe()
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL the apiserver calls for a local registration. An unspecified listen address
    /// (0.0.0.0) is reached through loopback.
    pub fn url(&self) -> String {
        let ip = match self.local_addr.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        format!(
            "https://{}{}",
            SocketAddr::new(ip, self.local_addr.port()),
            registration::VALIDATE_PATH
        )
    }

    /// Registers (if configured), serves until `shutdown` resolves, then unregisters (if
    /// configured) before draining in-flight requests, so the apiserver stops calling first.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let mut registered_ca = None;
        if self.registration.is_some() {
            registered_ca = self.register().await?;
        }
        info!(addr = %self.local_addr, url = %self.url(), "admission webhook serving");

        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.shared.limits.max_connections.max(1)));
        let mut connections = JoinSet::new();
        let mut reload =
            tokio::time::interval(self.tls.reload_interval.max(Duration::from_millis(50)));
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        reload.tick().await;
        tokio::pin!(shutdown);

        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = reload.tick() => {
                    self.reload_certificate();
                    if self.registration.is_some() {
                        registered_ca = self.reregister_if_ca_changed(registered_ca).await;
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            connections.spawn(server::connection(tcp, self.acceptor.clone(), self.shared.clone(), stop_rx.clone(), permit));
                        }
                        Err(_) => warn!(%peer, "connection limit reached; closing a new connection"),
                    },
                    Err(error) => {
                        warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(server::ACCEPT_ERROR_PAUSE).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }

        info!("admission webhook shutting down");
        if let Some((client, registration)) = &self.registration
            && registration.delete_on_shutdown
        {
            match registration::delete(client, &registration.name).await {
                Ok(()) => {
                    info!(name = %registration.name, "deleted the ValidatingWebhookConfiguration")
                }
                Err(error) => {
                    warn!(%error, name = %registration.name, "could not delete the ValidatingWebhookConfiguration")
                }
            }
        }
        drop(self.listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.shared.limits.drain_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                remaining = connections.len(),
                "in-flight requests did not finish in time; closing them"
            );
            connections.shutdown().await;
        }
        Ok(())
    }

    /// Applies the configuration with the current `ca.crt`; returns the CA registered.
    async fn register(&self) -> Result<Option<Vec<u8>>, Error> {
        let Some((client, registration)) = &self.registration else {
            return Ok(None);
        };
        let ca = certs::read_ca(&self.tls.cert_dir)?.ok_or_else(|| Error::NoCaBundle {
            dir: self.tls.cert_dir.clone(),
        })?;
        let url = match &registration.target {
            Target::Url(url) => url.clone(),
            _ => self.url(),
        };
        let config = registration::configuration(registration, &url, &ca);
        registration::apply(client, &config)
            .await
            .map_err(|source| Error::Register {
                name: registration.name.clone(),
                source,
            })?;
        info!(name = %registration.name, %url, "registered the ValidatingWebhookConfiguration");
        Ok(Some(ca))
    }

    async fn reregister_if_ca_changed(&self, registered: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match certs::read_ca(&self.tls.cert_dir) {
            Ok(Some(ca)) if Some(&ca) != registered.as_ref() => match self.register().await {
                Ok(now) => now,
                Err(error) => {
                    warn!(%error, "the CA changed but re-registering failed; will retry");
                    registered
                }
            },
            Ok(_) => registered,
            Err(error) => {
                warn!(%error, "reading the CA bundle failed; keeping the registered one");
                registered
            }
        }
    }

    /// Swaps in the certificate files when they changed and load cleanly; otherwise keeps serving
    /// the current one (files may be mid-rotation).
    fn reload_certificate(&mut self) {
        let digest = match certs::pair_digest(&self.tls.cert_dir) {
            Ok(digest) if digest == self.cert_digest || Some(digest) == self.failed_digest => {
                return;
            }
            Ok(digest) => digest,
            Err(error) => {
                warn!(%error, "cannot read the certificate files; keeping the current certificate");
                return;
            }
        };
        match certs::load_pair(&self.tls.cert_dir, &self.provider) {
            Ok(pair) => {
                self.resolver.replace(pair.key);
                self.cert_digest = pair.digest;
                self.failed_digest = None;
                self.reloads.send_modify(|r| r.loaded += 1);
                info!(dir = %self.tls.cert_dir.display(), "reloaded the serving certificate");
            }
            Err(error) => {
                self.failed_digest = Some(digest);
                self.reloads.send_modify(|r| r.rejected += 1);
                warn!(%error, "the certificate files changed but do not load; keeping the current certificate");
            }
        }
    }
}

/// Default SANs of a generated certificate: the loopback names the apiserver uses locally.
pub fn default_sans() -> Vec<String> {
    vec!["127.0.0.1".to_owned(), "localhost".to_owned()]
}

/// Writes a CA and serving certificate for `sans` into `dir` (for installs that manage the
/// caBundle themselves); returns the CA PEM.
pub fn write_certificates(dir: &Path, sans: &[String]) -> Result<String, Error> {
    Ok(certs::generate(dir, sans, Timestamp::now())?.ca_pem)
}

#[cfg(test)]
mod tests;
