//! The default pool-sizing policy: buffer-based sizing, the controller's built-in behaviour.
//!
//! Keep `bufferMin` idle pods beyond unmet demand, no more than `bufferMax` idle, and between
//! `poolMin` and `poolMax` pods in all. Allocated pods are never counted as removable. The
//! controller proves with a property test that this makes the same decisions as its native code.

wit_bindgen::generate!({ world: "pool-sizing-policy", path: "../../../wit" });

use exports::opensandbox::policy::pool_sizing::{
    Bounds, Guest, PolicyError, PoolSnapshot, SizingDecision,
};

struct BufferSizing;

impl Guest for BufferSizing {
    fn validate_settings(settings: String) -> Result<(), PolicyError> {
        match settings.trim() {
            "" | "{}" => Ok(()),
            _ => Err(PolicyError::InvalidSettings(
                "the default pool-sizing policy takes no settings".into(),
            )),
        }
    }

    fn decide(_settings: String, pool: PoolSnapshot) -> Result<SizingDecision, PolicyError> {
        let b = pool.bounds;
        let idle = pool.total.saturating_sub(pool.allocated);
        let wanted_idle = idle
            .max(b.buffer_min.saturating_add(pool.unmet_demand))
            .min(
                b.buffer_max
                    .max(b.buffer_min)
                    .saturating_add(pool.unmet_demand),
            );
        let wanted = pool.allocated.saturating_add(wanted_idle);
        let desired_total = clamp_to_bounds(wanted, &b);
        let reason = if desired_total < wanted {
            format!(
                "capped at poolMax {}: wanted {wanted} ({} allocated + {wanted_idle} idle)",
                b.pool_max, pool.allocated
            )
        } else if desired_total > wanted {
            format!("raised to poolMin {}", b.pool_min)
        } else if pool.unmet_demand > 0 {
            format!(
                "{} allocated + {} unmet demand + buffer",
                pool.allocated, pool.unmet_demand
            )
        } else {
            format!(
                "{} allocated + {wanted_idle} idle within buffer [{}, {}]",
                pool.allocated, b.buffer_min, b.buffer_max
            )
        };
        Ok(SizingDecision {
            desired_total,
            reason,
        })
    }
}

/// `value` within `[poolMin, poolMax]`; `poolMax` wins if the bounds conflict.
fn clamp_to_bounds(value: u32, bounds: &Bounds) -> u32 {
    value.max(bounds.pool_min).min(bounds.pool_max)
}

export!(BufferSizing);
