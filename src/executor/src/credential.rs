//! Per-request credentials for the task API, bound to one pod.
//!
//! The controller holds an Ed25519 signing key; every executor holds only the matching public key
//! and its own pod's UID. Each request carries
//!
//! ```text
//! Authorization: Sandbox-Ed25519 <unix-seconds>.<hex signature>
//! ```
//!
//! signed over [`DOMAIN`], the target pod's UID, the method, the path, the time and the SHA-256 of
//! the body. An executor accepts it only for its own pod UID, within [`MAX_SKEW`] of its clock, and
//! for exactly that request. So whatever a task can read inside its pod (the public key, the pod
//! UID, a captured request) neither opens another pod's executor nor lets anyone make new
//! credentials. Signatures are made and checked by `ring`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

/// The `Authorization` scheme of a signed request.
pub const SCHEME: &str = "Sandbox-Ed25519";
/// First line of every signed message, so a signature made here means nothing anywhere else.
pub const DOMAIN: &str = "sandbox-task-executor/v1";
/// How far a credential's time may be from the executor's clock, either way.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// Why key material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} must be {bytes} bytes written as {} hex digits", bytes * 2)]
    Format { what: &'static str, bytes: usize },
    #[error("the signing key is not a valid Ed25519 seed")]
    Rejected,
    #[error("the system's random number generator failed")]
    Random,
}

/// Why a request's credential was refused. Clients only ever see `401`: the reason is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no credential")]
    Missing,
    #[error("not a {SCHEME} credential")]
    Malformed,
    #[error("the credential's time is more than {}s away from now", MAX_SKEW.as_secs())]
    Stale,
    #[error("the signature does not match this pod and request")]
    BadSignature,
}

/// The 32-byte Ed25519 seed of the controller's signing key, written as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed([u8; 32]);

impl Seed {
    /// A fresh random seed.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| KeyError::Random)?;
        Ok(Seed(seed))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Seed {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s, "the signing key").map(Seed)
    }
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

/// The public half, which executors hold; 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s, "the public key").map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut bytes).map_err(|_| KeyError::Format { what, bytes: 32 })?;
    Ok(bytes)
}

/// Reads a key file (hex, surrounding whitespace ignored).
pub fn read_key_file<K: FromStr<Err = KeyError>>(path: &Path) -> Result<K, KeyError> {
    std::fs::read_to_string(path)
        .map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?
        .parse()
}

/// The controller's signing key.
pub struct SigningKey(Ed25519KeyPair);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public: {})", self.public_key())
    }
}

impl SigningKey {
    pub fn from_seed(seed: &Seed) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_seed_unchecked(&seed.0)
            .map(SigningKey)
            .map_err(|_| KeyError::Rejected)
    }

    pub fn public_key(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(key)
    }

    /// The `Authorization` header value for one request to the executor of pod `pod_uid`, made
    /// at `now`.
    pub fn authorization(
        &self,
        pod_uid: &str,
        method: &str,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> String {
        let time = unix_seconds(now);
        let signature = self.0.sign(&message(pod_uid, method, path, time, body));
        format!("{SCHEME} {time}.{}", hex::encode(signature.as_ref()))
    }
}

/// A credential as presented, before its signature is checked (which needs the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    time: i64,
    signature: [u8; 64],
}

/// What an executor checks credentials against: the controller's public key and its own pod.
#[derive(Clone, Debug)]
pub struct Verifier {
    key: PublicKey,
    pod_uid: String,
}

impl Verifier {
    pub fn new(key: PublicKey, pod_uid: &str) -> Self {
        Verifier {
            key,
            pod_uid: pod_uid.trim().to_string(),
        }
    }

    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    /// Parses an `Authorization` header and checks its time; cheap, so it runs before the body
    /// is read.
    pub fn presented(
        &self,
        authorization: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Presented, Refusal> {
        let value = authorization.ok_or(Refusal::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| Refusal::Malformed)?;
        let rest = value
            .trim()
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(Refusal::Malformed)?;
        let (time, signature) = rest.trim().split_once('.').ok_or(Refusal::Malformed)?;
        let time: i64 = time.parse().map_err(|_| Refusal::Malformed)?;
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(signature, &mut bytes).map_err(|_| Refusal::Malformed)?;
        if time.abs_diff(unix_seconds(now)) > MAX_SKEW.as_secs() {
            return Err(Refusal::Stale);
        }
        Ok(Presented {
            time,
            signature: bytes,
        })
    }

    /// Checks the signature of `presented` over this pod and this exact request.
    pub fn verify(
        &self,
        presented: &Presented,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), Refusal> {
        let message = message(&self.pod_uid, method, path, presented.time, body);
        UnparsedPublicKey::new(&ED25519, self.key.0)
            .verify(&message, &presented.signature)
            .map_err(|_| Refusal::BadSignature)
    }

    /// Both steps at once.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        method: &str,
        path: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let presented = self.presented(authorization, now)?;
        self.verify(&presented, method, path, body)
    }
}

fn unix_seconds(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// What is signed. Every field is on its own line and none can hold a newline (pod UIDs, methods
/// and paths cannot), so no two requests share a message.
fn message(pod_uid: &str, method: &str, path: &str, time: i64, body: &[u8]) -> Vec<u8> {
    let body = hex::encode(Sha256::digest(body));
    format!("{DOMAIN}\n{pod_uid}\n{method}\n{path}\n{time}\n{body}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POD_A: &str = "0b6a3f0e-8d1c-4a55-9a43-7f2d6c1e9a01";
    const POD_B: &str = "5c1e2d7a-2b9f-4f0e-8c6d-3a7b9e4d2c10";

    fn key() -> SigningKey {
        SigningKey::from_seed(&Seed::generate().unwrap()).unwrap()
    }

    fn sign(key: &SigningKey, pod: &str, now: SystemTime) -> String {
        key.authorization(pod, "POST", "/setTasks", b"[]", now)
    }

    #[test]
    fn a_credential_opens_its_own_pod_only() {
        let key = key();
        let now = SystemTime::now();
        let for_a = sign(&key, POD_A, now);
        let a = Verifier::new(key.public_key(), POD_A);
        let b = Verifier::new(key.public_key(), POD_B);
        assert_eq!(
            a.check(Some(for_a.as_bytes()), "POST", "/setTasks", b"[]", now),
            Ok(())
        );
        assert_eq!(
            b.check(Some(for_a.as_bytes()), "POST", "/setTasks", b"[]", now),
            Err(Refusal::BadSignature),
            "pod A's credential must not open pod B"
        );
    }

    #[test]
    fn stale_and_future_credentials_are_refused() {
        let key = key();
        let now = SystemTime::now();
        let verifier = Verifier::new(key.public_key(), POD_A);
        let old = sign(&key, POD_A, now - MAX_SKEW - Duration::from_secs(1));
        let future = sign(&key, POD_A, now + MAX_SKEW + Duration::from_secs(1));
        let edge = sign(&key, POD_A, now - MAX_SKEW + Duration::from_secs(1));
        for stale in [old, future] {
            assert_eq!(
                verifier.check(Some(stale.as_bytes()), "POST", "/setTasks", b"[]", now),
                Err(Refusal::Stale)
            );
        }
        assert_eq!(
            verifier.check(Some(edge.as_bytes()), "POST", "/setTasks", b"[]", now),
            Ok(())
        );
    }

    #[test]
    fn tampering_with_any_part_is_refused() {
        let key = key();
        let now = SystemTime::now();
        let verifier = Verifier::new(key.public_key(), POD_A);
        let good = sign(&key, POD_A, now);
        let check = |header: &str, method: &str, path: &str, body: &[u8]| {
            verifier.check(Some(header.as_bytes()), method, path, body, now)
        };
        assert_eq!(check(&good, "POST", "/setTasks", b"[]"), Ok(()));
        assert_eq!(
            check(&good, "POST", "/setTasks", br#"[{"name":"x"}]"#),
            Err(Refusal::BadSignature),
            "another body"
        );
        assert_eq!(
            check(&good, "GET", "/getTasks", b"[]"),
            Err(Refusal::BadSignature),
            "another request"
        );
        // Another time with the same signature.
        let (time, signature) = good
            .strip_prefix("Sandbox-Ed25519 ")
            .unwrap()
            .split_once('.')
            .unwrap();
        let shifted = format!(
            "Sandbox-Ed25519 {}.{signature}",
            time.parse::<i64>().unwrap() - 1
        );
        assert_eq!(
            check(&shifted, "POST", "/setTasks", b"[]"),
            Err(Refusal::BadSignature)
        );
        // A flipped bit in the signature.
        let mut bytes = hex::decode(signature).unwrap();
        bytes[10] ^= 1;
        let flipped = format!("Sandbox-Ed25519 {time}.{}", hex::encode(bytes));
        assert_eq!(
            check(&flipped, "POST", "/setTasks", b"[]"),
            Err(Refusal::BadSignature)
        );
        // Signed by another key.
        let other = sign(&self::key(), POD_A, now);
        assert_eq!(
            check(&other, "POST", "/setTasks", b"[]"),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn anything_but_a_well_formed_credential_is_refused() {
        let key = key();
        let now = SystemTime::now();
        let verifier = Verifier::new(key.public_key(), POD_A);
        assert_eq!(
            verifier.check(None, "GET", "/getTasks", b"", now),
            Err(Refusal::Missing)
        );
        let public = key.public_key().to_string();
        for header in [
            "Bearer s3cret".to_string(),
            format!("Bearer {public}"),
            public.clone(),
            format!("Sandbox-Ed25519 {public}"),
            "Sandbox-Ed25519 1.zz".into(),
            "Sandbox-Ed25519 x.00".into(),
            "Sandbox-Ed25519".into(),
        ] {
            assert_eq!(
                verifier.check(Some(header.as_bytes()), "GET", "/getTasks", b"", now),
                Err(Refusal::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn keys_round_trip_through_hex_and_reject_junk() {
        let seed = Seed::generate().unwrap();
        let parsed: Seed = format!(" {}\n", seed.to_hex()).parse().unwrap();
        assert_eq!(parsed, seed);
        let key = SigningKey::from_seed(&seed).unwrap();
        let public: PublicKey = key.public_key().to_string().parse().unwrap();
        assert_eq!(public, key.public_key());
        assert!("abc".parse::<Seed>().is_err());
        assert!("zz".repeat(32).parse::<PublicKey>().is_err());
        assert!(!format!("{seed:?}").contains(&seed.to_hex()));
    }

    proptest! {
        #[test]
        fn a_credential_for_one_pod_never_opens_another(a in "[a-z0-9-]{1,40}", b in "[a-z0-9-]{1,40}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assume!(a != b);
            let key = SigningKey::from_seed(&Seed([7; 32])).unwrap();
            let now = SystemTime::now();
            let header = key.authorization(&a, "POST", "/setTasks", &body, now);
            prop_assert_eq!(Verifier::new(key.public_key(), &a).check(Some(header.as_bytes()), "POST", "/setTasks", &body, now), Ok(()));
            prop_assert_eq!(Verifier::new(key.public_key(), &b).check(Some(header.as_bytes()), "POST", "/setTasks", &body, now), Err(Refusal::BadSignature));
        }
    }
}
