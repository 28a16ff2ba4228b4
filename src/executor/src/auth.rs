//! Who may call the executor's APIs, and how its secrets are kept from the tasks it runs.

use std::path::Path;

use super::credential::Verifier;

/// Who may call the task API.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Requests must carry a credential the controller signed for this pod
    /// ([`super::credential`]).
    Signed(Verifier),
    /// Anyone may call (`--allow-unauthenticated`, for OpenSandbox clients that send none).
    Open,
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is empty")]
    Empty(String),
    #[error(
        "{path} has mode {mode:o}: a secret file must not be readable by group or others (chmod 0400)"
    )]
    Exposed { path: String, mode: u32 },
}

/// The trimmed content of a secret file, which must be non-empty and readable by its owner only
/// (no group or other permission bits), so tasks running under another uid cannot read it.
pub fn read_secret_file(path: &Path) -> Result<String, SecretFileError> {
    use std::os::unix::fs::MetadataExt;
    let read = |source| SecretFileError::Read {
        path: path.display().to_string(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Exposed {
            path: path.display().to_string(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretFileError::Empty(path.display().to_string()));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_must_be_private_and_non_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        std::fs::write(&path, " s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretFileError::Exposed { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "  ").unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretFileError::Empty(_))
        ));
        assert!(matches!(
            read_secret_file(&tmp.path().join("nope")),
            Err(SecretFileError::Read { .. })
        ));
    }
}
