//! The default expiry policy: expire exactly at `expireTime` by deleting the batch; before it,
//! recheck when it falls due. The controller's built-in behaviour, proven identical by a property
//! test in the controller.

wit_bindgen::generate!({ world: "expiry-policy", path: "../../../wit" });

use exports::opensandbox::policy::expiry::{
    BatchSnapshot, ExpireAction, ExpiryDecision, Guest, PolicyError,
};

struct AtExpireTime;

impl Guest for AtExpireTime {
    fn validate_settings(settings: String) -> Result<(), PolicyError> {
        match settings.trim() {
            "" | "{}" => Ok(()),
            _ => Err(PolicyError::InvalidSettings(
                "the default expiry policy takes no settings".into(),
            )),
        }
    }

    fn decide(_settings: String, batch: BatchSnapshot) -> Result<ExpiryDecision, PolicyError> {
        Ok(match batch.expire_time_unix_ms {
            None => ExpiryDecision::Keep(None),
            Some(at) if at <= batch.now_unix_ms => ExpiryDecision::Expire(ExpireAction::Delete),
            Some(at) => ExpiryDecision::Keep(Some(
                u64::try_from(at - batch.now_unix_ms).unwrap_or(u64::MAX),
            )),
        })
    }
}

export!(AtExpireTime);
