//! Serving certificates: generated locally with rcgen, or read from a directory that cert-manager
//! (or anyone) keeps up to date, and swapped in without a restart when the files change.
//!
//! The directory layout is the one of a `kubernetes.io/tls` Secret as cert-manager writes it:
//! `tls.crt` (serving certificate, then any intermediates), `tls.key`, and `ca.crt`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use k8s_openapi::jiff::{SignedDuration, Timestamp, tz::TimeZone};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// The CA that signed the serving certificate; its PEM goes into the webhook's `caBundle`.
pub const CA_FILE: &str = "ca.crt";
/// The serving certificate chain, leaf first.
pub const CERT_FILE: &str = "tls.crt";
/// The serving certificate's private key.
pub const KEY_FILE: &str = "tls.key";

/// How long generated certificates are valid. They are made afresh at every start.
const VALIDITY: SignedDuration = SignedDuration::from_hours(24 * 365);
/// Generated certificates start a day early, so a clock a little behind still accepts them.
const BACKDATE: SignedDuration = SignedDuration::from_hours(24);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: the private key is unsupported or does not match {CERT_FILE}: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the time {0} cannot be expressed as a certificate validity date")]
    Date(Timestamp),
}

/// A freshly generated CA and serving certificate, already written to the directory.
pub struct GeneratedCerts {
    /// PEM of the CA certificate, for the webhook configuration's `caBundle`.
    pub ca_pem: String,
}

/// Generates a CA and a serving certificate for `sans` (IP addresses or DNS names) signed by it,
/// and writes [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] into `dir`. The CA's key is never
/// written: nothing else is to be signed with it.
pub fn generate(dir: &Path, sans: &[String], now: Timestamp) -> Result<GeneratedCerts, CertError> {
    let (from, until) = (ymd(now - BACKDATE)?, ymd(now + VALIDITY)?);
    let validity = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    };

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sandbox-controller webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        sans.first()
            .map_or("sandbox-controller webhook", String::as_str),
    );
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_pem = ca.pem();
    write_atomically(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    // Key before certificate: a watcher that sees the new certificate then finds its key.
    write_atomically(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    Ok(GeneratedCerts { ca_pem })
}

/// The UTC calendar date of `t`, as rcgen takes validity dates.
fn ymd(t: Timestamp) -> Result<(i32, u8, u8), CertError> {
    let date = t.to_zoned(TimeZone::UTC).date();
    let month = u8::try_from(date.month()).map_err(|_| CertError::Date(t))?;
    let day = u8::try_from(date.day()).map_err(|_| CertError::Date(t))?;
    Ok((i32::from(date.year()), month, day))
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A serving key pair as loaded from disk, with a digest of the files it came from.
pub struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    pub digest: [u8; 32],
}

/// SHA-256 over the certificate and key files, to notice when either changes.
pub fn pair_digest(dir: &Path) -> Result<[u8; 32], CertError> {
    let mut hasher = Sha256::new();
    for name in [CERT_FILE, KEY_FILE] {
        hasher.update(read(&dir.join(name))?);
    }
    Ok(hasher.finalize().into())
}

/// Reads the serving certificate chain and key from `dir` and checks they belong together.
pub fn load_pair(dir: &Path, provider: &CryptoProvider) -> Result<LoadedPair, CertError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;

    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::Pem {
            path: cert_path,
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::Pem {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Key {
        path: key_path,
        source,
    })?;

    let mut hasher = Sha256::new();
    hasher.update(&cert_pem);
    hasher.update(&key_pem);
    Ok(LoadedPair {
        key: Arc::new(key),
        digest: hasher.finalize().into(),
    })
}

/// Reads the CA bundle, if the directory has one.
pub fn read_ca(dir: &Path) -> Result<Option<Vec<u8>>, CertError> {
    let path = dir.join(CA_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Io { path, source }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificate every TLS handshake gets; [`ReloadingCert::replace`] swaps it for the next ones.
#[derive(Debug)]
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(key),
        }
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a writer panicked mid-swap of an Arc: the value is intact.
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn generated_files_load_and_the_key_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(
            dir.path(),
            &["127.0.0.1".into(), "localhost".into()],
            Timestamp::now(),
        )
        .unwrap();
        assert!(generated.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let pair = load_pair(dir.path(), &provider()).unwrap();
        assert_eq!(pair.key.cert.len(), 1);
        assert_eq!(pair.digest, pair_digest(dir.path()).unwrap());
        assert_eq!(
            read_ca(dir.path()).unwrap().unwrap(),
            generated.ca_pem.as_bytes()
        );
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(!dir.path().join(".tls.key.tmp").exists());
    }

    #[test]
    fn a_new_generation_changes_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["127.0.0.1".into()], Timestamp::now()).unwrap();
        let first = pair_digest(dir.path()).unwrap();
        generate(dir.path(), &["127.0.0.1".into()], Timestamp::now()).unwrap();
        assert_ne!(first, pair_digest(dir.path()).unwrap());
    }

    #[test]
    fn mismatched_or_missing_files_are_errors_that_name_the_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate(a.path(), &["127.0.0.1".into()], Timestamp::now()).unwrap();
        generate(b.path(), &["127.0.0.1".into()], Timestamp::now()).unwrap();
        std::fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = load_pair(a.path(), &provider())
            .err()
            .expect("mismatched key");
        assert!(err.to_string().contains(KEY_FILE), "{err}");

        std::fs::write(a.path().join(CERT_FILE), "not pem").unwrap();
        let err = load_pair(a.path(), &provider())
            .err()
            .expect("no certificate");
        assert!(err.to_string().contains(CERT_FILE), "{err}");

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_pair(empty.path(), &provider()),
            Err(CertError::Io { .. })
        ));
        assert!(read_ca(empty.path()).unwrap().is_none());
    }
}
