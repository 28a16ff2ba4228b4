//! JSON annotations the controller keeps on its objects (the ledger, released pods).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses a JSON annotation; a missing one is the empty value. A corrupt one is an error, never
/// read as empty: an empty ledger could hand its pods to someone else.
pub(crate) fn parse_json<T: DeserializeOwned + Default>(
    annotation: Option<&str>,
) -> Result<T, serde_json::Error> {
    match annotation {
        None => Ok(T::default()),
        Some(text) => serde_json::from_str(text),
    }
}

/// The JSON text of an annotation's value.
pub(crate) fn to_json<T: Serialize>(value: &T) -> String {
    // The annotation types hold only strings, numbers and lists of them.
    serde_json::to_string(value).expect("plain strings always serialize")
}
