//! Bearer-token authentication of the executor's API.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Why no usable token was found.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token from {0} is empty")]
    Empty(String),
    #[error(
        "no token: pass --token-file or set {}, or run with --allow-unauthenticated",
        super::TOKEN_ENV
    )]
    Missing,
}

/// Who may call the API.
pub enum Auth {
    /// Requests must carry `Authorization: Bearer <token>`. Only the token's digest is kept, and
    /// digests are compared in constant time, so the comparison reveals nothing about the token.
    Token([u8; 32]),
    /// Anyone may call (`--allow-unauthenticated`, for OpenSandbox clients that send no token).
    Open,
}

impl Auth {
    pub fn token(token: &str) -> Self {
        Auth::Token(Sha256::digest(token.as_bytes()).into())
    }

    /// Checks an `Authorization` header value.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Auth::Token(expected) = self else {
            return true;
        };
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(token.trim_ascii()).into();
        given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// The token from `file` (surrounding whitespace ignored) or else from `env_value`.
pub fn load_token(file: Option<&Path>, env_value: Option<String>) -> Result<String, AuthError> {
    let (token, source) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.display().to_string(),
                source,
            })?;
            (text, path.display().to_string())
        }
        None => (
            env_value.ok_or(AuthError::Missing)?,
            super::TOKEN_ENV.to_string(),
        ),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Empty(source));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let auth = Auth::token("s3cret");
        assert!(auth.allows(Some(b"Bearer s3cret")));
        assert!(!auth.allows(Some(b"Bearer s3cre")));
        assert!(!auth.allows(Some(b"Bearer s3cret2")));
        assert!(!auth.allows(Some(b"Basic s3cret")));
        assert!(!auth.allows(Some(b"s3cret")));
        assert!(!auth.allows(None));
        assert!(Auth::Open.allows(None));
    }

    #[test]
    fn tokens_come_from_the_file_first_and_are_never_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        assert_eq!(
            load_token(Some(&path), Some("from-env".into())).unwrap(),
            "from-file"
        );
        assert_eq!(
            load_token(None, Some(" from-env ".into())).unwrap(),
            "from-env"
        );
        assert!(matches!(load_token(None, None), Err(AuthError::Missing)));
        assert!(matches!(
            load_token(None, Some("  ".into())),
            Err(AuthError::Empty(_))
        ));
        assert!(matches!(
            load_token(Some(&tmp.path().join("nope")), None),
            Err(AuthError::Read { .. })
        ));
    }
}
