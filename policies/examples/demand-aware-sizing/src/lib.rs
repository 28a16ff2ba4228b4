//! Demand-aware pool sizing: the default buffer policy, with a buffer that widens as the recent
//! allocation rate grows.
//!
//! Every pod claimed within the last `windowSeconds` adds `podsPerAllocatedPod` idle pods to the
//! buffer (rounded up), plus a constant `minExtra`, at most `maxExtra` in all. Within that wider
//! buffer the decision is the default one: allocated pods are never removable, unmet demand is
//! served, and the total stays within [poolMin, poolMax].
//!
//! Settings (all optional):
//! `{"windowSeconds": 300, "podsPerAllocatedPod": 1.0, "minExtra": 0, "maxExtra": 100}`

wit_bindgen::generate!({ world: "pool-sizing-policy", path: "../../../wit" });

use exports::opensandbox::policy::pool_sizing::{Guest, PolicyError, PoolSnapshot, SizingDecision};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct Settings {
    window_seconds: u32,
    pods_per_allocated_pod: f64,
    min_extra: u32,
    max_extra: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window_seconds: 300,
            pods_per_allocated_pod: 1.0,
            min_extra: 0,
            max_extra: 100,
        }
    }
}

fn settings(text: &str) -> Result<Settings, PolicyError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let s: Settings =
        serde_json::from_str(text).map_err(|e| PolicyError::InvalidSettings(e.to_string()))?;
    if !(s.pods_per_allocated_pod.is_finite() && s.pods_per_allocated_pod >= 0.0) {
        return Err(PolicyError::InvalidSettings(
            "podsPerAllocatedPod must be a non-negative number".into(),
        ));
    }
    if s.min_extra > s.max_extra {
        return Err(PolicyError::InvalidSettings(
            "minExtra must not exceed maxExtra".into(),
        ));
    }
    Ok(s)
}

struct DemandAware;

impl Guest for DemandAware {
    fn validate_settings(text: String) -> Result<(), PolicyError> {
        settings(&text).map(drop)
    }

    fn decide(text: String, pool: PoolSnapshot) -> Result<SizingDecision, PolicyError> {
        let s = settings(&text)?;
        let since = pool
            .now_unix_ms
            .saturating_sub(i64::from(s.window_seconds) * 1000);
        let recent: u32 = pool
            .recent_allocations
            .iter()
            .filter(|e| e.at_unix_ms > since && e.at_unix_ms <= pool.now_unix_ms)
            .fold(0u32, |sum, e| sum.saturating_add(e.count));
        // The float is bounded by maxExtra before the cast, so the cast cannot wrap.
        let from_rate = (f64::from(recent) * s.pods_per_allocated_pod)
            .ceil()
            .min(f64::from(s.max_extra)) as u32;
        let extra = s.min_extra.saturating_add(from_rate).min(s.max_extra);

        let b = pool.bounds;
        let buffer_min = b.buffer_min.saturating_add(extra);
        let buffer_max = b.buffer_max.max(buffer_min);
        let idle = pool.total.saturating_sub(pool.allocated);
        let wanted_idle = idle
            .max(buffer_min.saturating_add(pool.unmet_demand))
            .min(buffer_max.saturating_add(pool.unmet_demand));
        let wanted = pool.allocated.saturating_add(wanted_idle);
        let desired_total = wanted.max(b.pool_min).min(b.pool_max);
        let reason = format!(
            "{recent} pod(s) claimed in the last {}s widen the buffer by {extra} to [{buffer_min}, {buffer_max}]; {} allocated + {} unmet demand{}",
            s.window_seconds,
            pool.allocated,
            pool.unmet_demand,
            if desired_total != wanted {
                format!(
                    ", wanted {wanted}, bounded to [{}, {}]",
                    b.pool_min, b.pool_max
                )
            } else {
                String::new()
            },
        );
        Ok(SizingDecision {
            desired_total,
            reason,
        })
    }
}

export!(DemandAware);
