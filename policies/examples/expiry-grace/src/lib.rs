//! Expiry with a grace period: a batch whose `expireTime` has passed while one of its shards still
//! runs a task is kept for up to `graceSeconds` more, rechecked every `recheckSeconds`, so the
//! task can finish. Without running tasks (or once the grace is over) it expires at once.
//!
//! Settings (all optional):
//! `{"graceSeconds": 300, "recheckSeconds": 10, "action": "delete" | "return-to-pool"}`

wit_bindgen::generate!({ world: "expiry-policy", path: "../../../wit" });

use exports::opensandbox::policy::expiry::{
    BatchSnapshot, ExpireAction, ExpiryDecision, Guest, PolicyError, TaskPhase,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Settings {
    grace_seconds: u32,
    recheck_seconds: u32,
    action: Action,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Delete,
    ReturnToPool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grace_seconds: 300,
            recheck_seconds: 10,
            action: Action::Delete,
        }
    }
}

fn settings(text: &str) -> Result<Settings, PolicyError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let s: Settings =
        serde_json::from_str(text).map_err(|e| PolicyError::InvalidSettings(e.to_string()))?;
    if s.recheck_seconds == 0 {
        return Err(PolicyError::InvalidSettings(
            "recheckSeconds must be at least 1".into(),
        ));
    }
    Ok(s)
}

struct GracePeriod;

impl Guest for GracePeriod {
    fn validate_settings(text: String) -> Result<(), PolicyError> {
        settings(&text).map(drop)
    }

    fn decide(text: String, batch: BatchSnapshot) -> Result<ExpiryDecision, PolicyError> {
        let s = settings(&text)?;
        let Some(at) = batch.expire_time_unix_ms else {
            return Ok(ExpiryDecision::Keep(None));
        };
        if batch.now_unix_ms < at {
            return Ok(ExpiryDecision::Keep(Some(at.abs_diff(batch.now_unix_ms))));
        }
        let grace_ends = at.saturating_add(i64::from(s.grace_seconds) * 1000);
        let running = batch
            .task_phases
            .iter()
            .any(|p| matches!(p, TaskPhase::Running));
        if running && batch.now_unix_ms < grace_ends {
            let left = grace_ends.abs_diff(batch.now_unix_ms);
            return Ok(ExpiryDecision::Keep(Some(
                left.min(u64::from(s.recheck_seconds) * 1000),
            )));
        }
        Ok(ExpiryDecision::Expire(match s.action {
            Action::Delete => ExpireAction::Delete,
            Action::ReturnToPool => ExpireAction::ReturnToPool,
        }))
    }
}

export!(GracePeriod);
