//! When a Pool reconcile does the work that can wait behind claims: sizing (whose refills create
//! pods) and the Pool status write.
//!
//! Claims are the latency that matters. While a pool's grants are being written, a refill's pod
//! creations and a status write would compete with them for the API server, so sizing waits until
//! the claims are served (or for at most [`MAX_SIZING_DEFERRAL`], so a steady stream of claims
//! never starves refills), and the status, which only reports counts, is written at most once per
//! [`STATUS_INTERVAL`], with whatever changed in between coalesced into that one write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::index::Key;

/// Longest time sizing waits behind claims being served.
pub const MAX_SIZING_DEFERRAL: Duration = Duration::from_millis(500);
/// How soon a deferred sizing is looked at again when no event comes first.
pub const SIZING_RECHECK: Duration = Duration::from_millis(50);
/// Shortest time between two status writes of one pool.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What a reconcile does about sizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    Now,
    /// Claims are being served: look again after this long (or on the next event).
    Defer(Duration),
}

/// What a reconcile does about a status that differs from the one the Pool shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    Now,
    /// The last write was too recent: write after this long (or on a later reconcile).
    After(Duration),
}

/// One pool's pacing state.
#[derive(Clone, Debug, Default)]
pub struct PoolPace {
    /// Since when sizing has been waiting behind claims.
    deferred_since: Option<Instant>,
    last_status_write: Option<Instant>,
}

impl PoolPace {
    /// `serving`: grants were planned in this round or are still being written, and none of the
    /// demand is short of idle pods (a short pool needs its refill at once).
    pub fn sizing(&mut self, now: Instant, serving: bool) -> Sizing {
        if !serving {
            self.deferred_since = None;
            return Sizing::Now;
        }
        let since = *self.deferred_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited >= MAX_SIZING_DEFERRAL {
            self.deferred_since = None;
            return Sizing::Now;
        }
        Sizing::Defer(SIZING_RECHECK.min(MAX_SIZING_DEFERRAL - waited))
    }

    /// Whether a changed status may be written now; call [`Self::status_written`] once it was.
    pub fn status(&self, now: Instant) -> StatusWrite {
        match self.last_status_write {
            Some(at) if now.saturating_duration_since(at) < STATUS_INTERVAL => {
                StatusWrite::After(STATUS_INTERVAL - now.saturating_duration_since(at))
            }
            _ => StatusWrite::Now,
        }
    }

    pub fn status_written(&mut self, now: Instant) {
        self.last_status_write = Some(now);
    }
}

/// Pacing state of every pool this process reconciles.
#[derive(Default)]
pub struct Pacing {
    inner: Mutex<HashMap<Key, PoolPace>>,
}

impl Pacing {
    pub fn with<T>(&self, pool: &Key, f: impl FnOnce(&mut PoolPace) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(inner.entry(pool.clone()).or_default())
    }

    pub fn forget(&self, pool: &Key) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn sizing_waits_behind_claims_but_never_longer_than_the_bound() {
        let start = Instant::now();
        let mut pace = PoolPace::default();
        assert_eq!(pace.sizing(start, false), Sizing::Now);
        assert_eq!(pace.sizing(start, true), Sizing::Defer(SIZING_RECHECK));
        // Still serving later on: the wait is counted from the first deferral.
        let late = start + MAX_SIZING_DEFERRAL - 10 * MS;
        assert_eq!(pace.sizing(late, true), Sizing::Defer(10 * MS));
        assert_eq!(
            pace.sizing(start + MAX_SIZING_DEFERRAL, true),
            Sizing::Now,
            "a steady stream of claims does not starve refills"
        );
        // The bound starts over with the next deferral.
        let next = start + MAX_SIZING_DEFERRAL + MS;
        assert_eq!(pace.sizing(next, true), Sizing::Defer(SIZING_RECHECK));
        // Once claims are served, sizing runs and the deferral is forgotten.
        assert_eq!(pace.sizing(next + MS, false), Sizing::Now);
        assert_eq!(
            pace.sizing(next + 2 * MS, true),
            Sizing::Defer(SIZING_RECHECK)
        );
    }

    #[test]
    fn status_writes_are_at_least_an_interval_apart() {
        let start = Instant::now();
        let mut pace = PoolPace::default();
        assert_eq!(pace.status(start), StatusWrite::Now, "the first goes out");
        pace.status_written(start);
        assert_eq!(
            pace.status(start + 300 * MS),
            StatusWrite::After(STATUS_INTERVAL - 300 * MS)
        );
        assert_eq!(pace.status(start + STATUS_INTERVAL), StatusWrite::Now);
    }
}
