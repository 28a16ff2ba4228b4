//! Settings checks shared by the default policies.

use alloc::format;

use crate::PolicyError;

/// Accepts only "no settings": empty text or `{}`. The default policies take none, so an operator
/// who passes some learns at load time that they would be ignored.
pub fn none(policy: &str, settings: &str) -> Result<(), PolicyError> {
    match settings.trim() {
        "" | "{}" => Ok(()),
        _ => Err(PolicyError::InvalidSettings(format!(
            "the default {policy} policy takes no settings"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_empty_object_are_no_settings() {
        assert_eq!(none("expiry", ""), Ok(()));
        assert_eq!(none("expiry", " {} \n"), Ok(()));
    }

    #[test]
    fn anything_else_is_refused_with_the_policy_named() {
        assert_eq!(
            none("pool-sizing", r#"{"x":1}"#),
            Err(PolicyError::InvalidSettings(
                "the default pool-sizing policy takes no settings".into()
            ))
        );
    }
}
