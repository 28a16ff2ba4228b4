//! When a Pool reconcile does the work that can wait behind claims: sizing (whose refills create
//! pods) and the Pool status write.
//!
//! Claims are the latency that matters. While a pool's grants are being written, a refill's pod
//! creations and a status write would compete with them for the API server, so sizing waits until
//! the claims are served (for at most [`MAX_SIZING_DEFERRAL`], so a steady stream of claims never
//! starves refills) and, when claims come one after another, until none has come for
//! [`CLAIM_QUIET`] (for at most [`MAX_QUIET_DEFERRAL`]). Behind claims that came together it also
//! waits for their batches' statuses, a claim's last write and what OpenSandbox's server waits
//! for (for at most [`MAX_BURST_DEFERRAL`]): the round records which batches it waits on, and the
//! status event that brings the last of them wakes the pool once (see [`Pacing::status_reported`]).
//! A pool short of idle pods sizes at once.
//! The status, which only reports counts, is written at most once per [`STATUS_INTERVAL`], with
//! whatever changed in between coalesced into that one write.
//!
//! A status write that only moves counts also takes a slot of a budget shared by all pools
//! (`--pool-status-writes-per-second`): with many pools, claims spread over all of them would
//! otherwise bring a status write per pool per interval, so the controller's status traffic would
//! grow with the number of pools rather than with the claims. Under that load each pool's counts
//! lag by up to pools / rate seconds. What readers wait on skips the budget: a change of
//! condition, revision or observed generation, or of what the pool's batches read (running out
//! of idle pods, exhaustion).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::index::Key;

/// Longest time sizing waits behind claims being served.
pub const MAX_SIZING_DEFERRAL: Duration = Duration::from_millis(500);
/// Longest time sizing waits behind claims that came together (a round granted several
/// batches), their statuses included: a burst of a hundred claims takes about half a second on
/// a 2-core machine to be granted and reported, and refills sent meanwhile slow every status.
pub const MAX_BURST_DEFERRAL: Duration = Duration::from_secs(1);
/// How soon a deferred sizing is looked at again when no event comes first.
pub const SIZING_RECHECK: Duration = Duration::from_millis(50);
/// How soon sizing waiting for statuses is looked at again: the last awaited status wakes the
/// pool, so this look only matters when a status reports fewer pods than its batch was granted.
pub const STATUS_RECHECK: Duration = Duration::from_millis(250);
/// Grants this close together are claims coming one after another, and sizing waits until the
/// last of them is this long past: a refill sized between two such claims would send its pod's
/// writes (create, binding, the node's status) to the API server with the next claim.
pub const CLAIM_QUIET: Duration = Duration::from_millis(50);
/// Longest time sizing waits for that quiet time. Claims one after another never leave one, and
/// the refills held back meanwhile are created together: a short bound keeps that group small.
pub const MAX_QUIET_DEFERRAL: Duration = Duration::from_millis(100);
/// Shortest time between two status writes of one pool.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What a reconcile does about sizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    Now,
    /// Claims are being served: look again after this long (or on the next event).
    Defer(Duration),
}

/// Where a pool's claims stand after an allocation round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claims {
    /// This round planned grants to this many batches, and every demand was met.
    Granted { batches: usize },
    /// Grants of earlier rounds are still being written, and every demand was met.
    Writing,
    /// Every grant is written, but a batch's status does not count its pods yet: its status
    /// write, the claim's last, is still to come.
    Reporting,
    /// Some demand found no idle pod: the pool needs its refill at once.
    Short,
    /// Nothing to serve.
    Served,
}

/// What a reconcile does about a status that differs from the one the Pool shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    Now,
    /// The last write was too recent: write after this long (or on a later reconcile).
    After(Duration),
}

/// Default of `--pool-status-writes-per-second`.
pub const DEFAULT_POOL_STATUS_WRITES_PER_SECOND: u32 = 5;

/// Slots for Pool status writes shared by all pools, evenly spaced: each reservation takes the
/// next free one, so however many pools ask at once, the writes go out at the budget's rate.
#[derive(Clone, Debug)]
pub struct StatusBudget {
    spacing: Duration,
    next_free: Option<Instant>,
}

impl StatusBudget {
    pub fn new(per_second: u32) -> Self {
        Self {
            spacing: Duration::from_secs(1) / per_second.max(1),
            next_free: None,
        }
    }

    /// The first free slot at or after `earliest`, now taken.
    fn reserve(&mut self, earliest: Instant) -> Instant {
        let slot = self.next_free.map_or(earliest, |free| free.max(earliest));
        self.next_free = Some(slot + self.spacing);
        slot
    }
}

/// How far a status change reaches beyond the pool's own counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Only counts moved: the write waits for its slot of the shared budget.
    Counts,
    /// A condition, the revision, the observed generation or the pool's headroom for its batches
    /// changed: what readers wait on.
    State,
}

/// One pool's pacing state.
#[derive(Clone, Debug, Default)]
pub struct PoolPace {
    /// Since when sizing has been waiting behind claims.
    deferred_since: Option<Instant>,
    /// When a round last planned grants.
    last_grant: Option<Instant>,
    /// Whether that round granted several batches, or came within [`CLAIM_QUIET`] of the one
    /// before: claims are coming together or one after another, not alone.
    in_stream: bool,
    /// Whether a round since sizing last ran granted several batches: a burst, whose statuses
    /// sizing waits for too.
    together: bool,
    /// The batches whose statuses sizing waits for, each with the pod count its status must
    /// reach; the event that empties it wakes the pool.
    awaited_statuses: Vec<AwaitedStatus>,
    last_status_write: Option<Instant>,
    /// The budget slot this pool's next counts-only write holds.
    reserved_slot: Option<Instant>,
}

/// A batch whose status does not count every pod its ledger serves yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwaitedStatus {
    pub batch: String,
    /// `status.allocated` once the status catches up.
    pub allocated: usize,
}

impl PoolPace {
    /// What the round does about sizing. `behind` are the batches whose statuses lag their
    /// ledgers (the round's claims are [`Claims::Reporting`] if there are any): when sizing waits
    /// for them, they are recorded for [`Self::status_reported`].
    pub fn sizing_awaiting(
        &mut self,
        now: Instant,
        claims: Claims,
        behind: Vec<AwaitedStatus>,
    ) -> Sizing {
        let sizing = self.sizing(now, claims);
        self.awaited_statuses =
            if claims == Claims::Reporting && self.together && sizing != Sizing::Now {
                behind
            } else {
                Vec::new()
            };
        sizing
    }

    /// Whether this status event brought the last status sizing waits for: then the pool is
    /// woken, once.
    pub fn status_reported(&mut self, batch: &str, allocated: usize) -> bool {
        let before = self.awaited_statuses.len();
        self.awaited_statuses
            .retain(|awaited| awaited.batch != batch || awaited.allocated > allocated);
        before > 0 && self.awaited_statuses.is_empty()
    }

    /// What the round does about sizing, given where its claims stand.
    pub fn sizing(&mut self, now: Instant, claims: Claims) -> Sizing {
        if let Claims::Granted { batches } = claims {
            self.in_stream = batches > 1
                || self
                    .last_grant
                    .is_some_and(|at| now.saturating_duration_since(at) < CLAIM_QUIET);
            self.together |= batches > 1;
            self.last_grant = Some(now);
        }
        let serving = if self.together {
            MAX_BURST_DEFERRAL
        } else {
            MAX_SIZING_DEFERRAL
        };
        let wait = match claims {
            Claims::Short => None,
            Claims::Granted { .. } | Claims::Writing => Some((SIZING_RECHECK, serving)),
            Claims::Reporting if self.together => Some((STATUS_RECHECK, serving)),
            // Statuses of claims one after another or alone are not waited for: a stream would
            // hold its refills back until the bound and send them in one large group, and a
            // claim alone would pay a timed round.
            Claims::Served | Claims::Reporting if !self.in_stream => None,
            Claims::Served | Claims::Reporting => self
                .last_grant
                .map(|at| (at + CLAIM_QUIET).saturating_duration_since(now))
                .filter(|quiet_in| !quiet_in.is_zero())
                .map(|quiet_in| (quiet_in, MAX_QUIET_DEFERRAL)),
        };
        let Some((recheck, bound)) = wait else {
            return self.size_now();
        };
        let since = *self.deferred_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited >= bound {
            return self.size_now();
        }
        Sizing::Defer(recheck.min(bound - waited))
    }

    /// Sizing runs: the next deferral, and whether its claims came together, start afresh.
    fn size_now(&mut self) -> Sizing {
        self.deferred_since = None;
        self.together = false;
        Sizing::Now
    }

    /// Whether a changed status may be written now; call [`Self::status_written`] once it was.
    pub fn status(
        &mut self,
        now: Instant,
        change: StatusChange,
        budget: &mut StatusBudget,
    ) -> StatusWrite {
        let earliest = self
            .last_status_write
            .map_or(now, |at| (at + STATUS_INTERVAL).max(now));
        let at = match change {
            StatusChange::State => earliest,
            StatusChange::Counts => {
                // A slot left unused for an interval (the counts went back) is given up, so
                // unused slots never add up to a burst of writes.
                if self
                    .reserved_slot
                    .is_some_and(|slot| slot + STATUS_INTERVAL < now)
                {
                    self.reserved_slot = None;
                }
                *self
                    .reserved_slot
                    .get_or_insert_with(|| budget.reserve(earliest))
            }
        };
        if at <= now {
            StatusWrite::Now
        } else {
            StatusWrite::After(at - now)
        }
    }

    pub fn status_written(&mut self, now: Instant) {
        self.last_status_write = Some(now);
        self.reserved_slot = None;
    }
}

/// Pacing state of every pool this process reconciles, and their shared status budget.
pub struct Pacing {
    inner: Mutex<PacingState>,
}

struct PacingState {
    pools: HashMap<Key, PoolPace>,
    budget: StatusBudget,
}

impl Pacing {
    pub fn new(status_writes_per_second: u32) -> Self {
        Self {
            inner: Mutex::new(PacingState {
                pools: HashMap::new(),
                budget: StatusBudget::new(status_writes_per_second),
            }),
        }
    }

    pub fn with<T>(&self, pool: &Key, f: impl FnOnce(&mut PoolPace) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(inner.pools.entry(pool.clone()).or_default())
    }

    /// [`PoolPace::status_reported`] of `pool`: whether to wake it. A round records what it
    /// waits on under the same lock as it reads those statuses from the cache, and the cache
    /// holds an event's copy before the router calls this, so a status that lands while the
    /// round records is either seen by the round or finds its record here.
    pub fn status_reported(&self, pool: &Key, batch: &str, allocated: usize) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pools
            .get_mut(pool)
            .is_some_and(|pace| pace.status_reported(batch, allocated))
    }

    /// [`PoolPace::status`] of `pool` against the shared budget.
    pub fn status(&self, pool: &Key, now: Instant, change: StatusChange) -> StatusWrite {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let PacingState { pools, budget } = &mut *inner;
        pools
            .entry(pool.clone())
            .or_default()
            .status(now, change, budget)
    }

    pub fn forget(&self, pool: &Key) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pools
            .remove(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const GRANTED_ONE: Claims = Claims::Granted { batches: 1 };

    #[test]
    fn sizing_waits_behind_claims_but_never_longer_than_the_bound() {
        let start = Instant::now();
        let mut pace = PoolPace::default();
        assert_eq!(pace.sizing(start, Claims::Served), Sizing::Now);
        assert_eq!(
            pace.sizing(start, GRANTED_ONE),
            Sizing::Defer(SIZING_RECHECK)
        );
        // Still serving later on: the wait is counted from the first deferral.
        let late = start + MAX_SIZING_DEFERRAL - 10 * MS;
        assert_eq!(pace.sizing(late, Claims::Writing), Sizing::Defer(10 * MS));
        assert_eq!(
            pace.sizing(start + MAX_SIZING_DEFERRAL, GRANTED_ONE),
            Sizing::Now,
            "a steady stream of claims does not starve refills"
        );
        // The bound starts over with the next deferral.
        let next = start + MAX_SIZING_DEFERRAL + MS;
        assert_eq!(
            pace.sizing(next, Claims::Writing),
            Sizing::Defer(SIZING_RECHECK)
        );
        // A pool short of idle pods sizes at once, and the deferral is forgotten.
        assert_eq!(pace.sizing(next + MS, Claims::Short), Sizing::Now);
        assert_eq!(
            pace.sizing(next + 2 * MS, GRANTED_ONE),
            Sizing::Defer(SIZING_RECHECK)
        );
    }

    #[test]
    fn sizing_waits_for_the_statuses_of_claims_that_came_together() {
        const GRANTED_TWO: Claims = Claims::Granted { batches: 2 };
        let start = Instant::now();
        let mut pace = PoolPace::default();
        assert_eq!(
            pace.sizing(start, Claims::Reporting),
            Sizing::Now,
            "no grant of this process: nothing to wait for"
        );
        // Two claims served in one round: sizing waits for their grants and statuses, past the
        // bound for claims that did not come together, then for the quiet time after them.
        pace.sizing(start, GRANTED_TWO);
        assert_eq!(
            pace.sizing(start + MAX_SIZING_DEFERRAL, Claims::Writing),
            Sizing::Defer(SIZING_RECHECK)
        );
        assert_eq!(
            pace.sizing(start + MAX_SIZING_DEFERRAL + 20 * MS, Claims::Reporting),
            Sizing::Defer(STATUS_RECHECK)
        );
        let mut reported = PoolPace::default();
        reported.sizing(start, GRANTED_TWO);
        reported.sizing(start + 20 * MS, Claims::Reporting);
        assert_eq!(
            reported.sizing(start + 30 * MS, Claims::Served),
            Sizing::Defer(CLAIM_QUIET - 30 * MS)
        );
        // A status that never catches up holds refills back for the burst's bound, then no
        // more until claims come together again.
        assert_eq!(
            pace.sizing(start + MAX_BURST_DEFERRAL, Claims::Reporting),
            Sizing::Now
        );
        assert_eq!(
            pace.sizing(start + MAX_BURST_DEFERRAL + 50 * MS, Claims::Reporting),
            Sizing::Now
        );
        let again = start + MAX_BURST_DEFERRAL + 60 * MS;
        pace.sizing(again, GRANTED_TWO);
        assert_eq!(
            pace.sizing(again + 10 * MS, Claims::Reporting),
            Sizing::Defer(STATUS_RECHECK)
        );
    }

    fn awaited(batch: &str, allocated: usize) -> AwaitedStatus {
        AwaitedStatus {
            batch: batch.into(),
            allocated,
        }
    }

    #[test]
    fn the_last_status_awaited_wakes_the_pool_once() {
        const GRANTED_TWO: Claims = Claims::Granted { batches: 2 };
        let start = Instant::now();
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_TWO);
        let behind = vec![awaited("a", 1), awaited("b", 3)];
        assert_eq!(
            pace.sizing_awaiting(start + 20 * MS, Claims::Reporting, behind.clone()),
            Sizing::Defer(STATUS_RECHECK)
        );
        assert!(!pace.status_reported("a", 0), "a status short of its pods");
        assert!(!pace.status_reported("a", 1), "b's status is still to come");
        assert!(!pace.status_reported("other", 5), "a batch not awaited");
        assert!(!pace.status_reported("b", 2), "short of b's pods");
        assert!(pace.status_reported("b", 3), "the last one");
        assert!(!pace.status_reported("b", 3), "once");

        // The next round replaces what is awaited; a round that does not wait awaits nothing.
        pace.sizing_awaiting(start + 30 * MS, Claims::Reporting, behind.clone());
        pace.sizing_awaiting(start + 40 * MS, Claims::Writing, behind.clone());
        assert!(!pace.status_reported("a", 1) && !pace.status_reported("b", 3));
        pace.sizing_awaiting(start + 50 * MS, Claims::Reporting, behind.clone());
        assert_eq!(
            pace.sizing_awaiting(
                start + MAX_BURST_DEFERRAL,
                Claims::Reporting,
                behind.clone()
            ),
            Sizing::Now
        );
        assert!(!pace.status_reported("a", 1) && !pace.status_reported("b", 3));

        // Statuses of a claim alone, or of claims one after another, are not waited for, so
        // not recorded either (the latter wait for the quiet time only).
        let mut alone = PoolPace::default();
        alone.sizing(start, GRANTED_ONE);
        alone.sizing_awaiting(start + 10 * MS, Claims::Reporting, vec![awaited("a", 1)]);
        assert!(!alone.status_reported("a", 1));
        let mut stream = PoolPace::default();
        stream.sizing(start, GRANTED_ONE);
        stream.sizing(start + 10 * MS, GRANTED_ONE);
        assert_eq!(
            stream.sizing_awaiting(start + 20 * MS, Claims::Reporting, vec![awaited("a", 1)]),
            Sizing::Defer(CLAIM_QUIET - 10 * MS)
        );
        assert!(!stream.status_reported("a", 1));
    }

    #[test]
    fn statuses_of_claims_alone_or_one_after_another_are_not_waited_for() {
        let start = Instant::now();
        // Alone: refilled once the grant is written, status or not.
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_ONE);
        assert_eq!(pace.sizing(start + 3 * MS, Claims::Reporting), Sizing::Now);
        // One after another: the quiet time after the last grant, as once served.
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_ONE);
        pace.sizing(start + 3 * MS, Claims::Reporting);
        pace.sizing(start + 10 * MS, GRANTED_ONE);
        assert_eq!(
            pace.sizing(start + 13 * MS, Claims::Reporting),
            Sizing::Defer(CLAIM_QUIET - 3 * MS)
        );
        assert_eq!(
            pace.sizing(start + 10 * MS + MAX_QUIET_DEFERRAL, Claims::Reporting),
            Sizing::Now,
            "the quiet time's bound, counted from the second claim's grant"
        );
        // Claims one after another are not held behind their writes past the shorter bound.
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_ONE);
        assert_eq!(
            pace.sizing(start + MAX_SIZING_DEFERRAL, Claims::Writing),
            Sizing::Now
        );
    }

    #[test]
    fn a_claim_that_comes_alone_gets_its_refill_once_served() {
        let start = Instant::now();
        let mut pace = PoolPace::default();
        assert_eq!(
            pace.sizing(start, GRANTED_ONE),
            Sizing::Defer(SIZING_RECHECK)
        );
        assert_eq!(pace.sizing(start + 3 * MS, Claims::Served), Sizing::Now);
        // The next claim, a while later, is alone too.
        let later = start + CLAIM_QUIET + 3 * MS;
        assert_eq!(
            pace.sizing(later, GRANTED_ONE),
            Sizing::Defer(SIZING_RECHECK)
        );
        assert_eq!(pace.sizing(later + 3 * MS, Claims::Served), Sizing::Now);
    }

    #[test]
    fn sizing_waits_for_a_quiet_time_after_claims_one_after_another() {
        let start = Instant::now();
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_ONE);
        assert_eq!(pace.sizing(start + 3 * MS, Claims::Served), Sizing::Now);
        // A second claim within the quiet time: claims are coming one after another.
        let second = start + 10 * MS;
        assert_eq!(
            pace.sizing(second, GRANTED_ONE),
            Sizing::Defer(SIZING_RECHECK)
        );
        assert_eq!(
            pace.sizing(second + 3 * MS, Claims::Served),
            Sizing::Defer(CLAIM_QUIET - 3 * MS)
        );
        // Another claim starts the quiet time over.
        let third = second + 12 * MS;
        pace.sizing(third, GRANTED_ONE);
        assert_eq!(
            pace.sizing(third + CLAIM_QUIET - MS, Claims::Served),
            Sizing::Defer(MS)
        );
        assert_eq!(
            pace.sizing(third + CLAIM_QUIET, Claims::Served),
            Sizing::Now
        );
        // A stream that never leaves a quiet time (a claim every 12 ms, each served in 3 ms)
        // gets its refills at the quiet time's own, shorter bound, counted from its second claim.
        let mut pace = PoolPace::default();
        pace.sizing(start, GRANTED_ONE);
        assert_eq!(pace.sizing(start + 3 * MS, Claims::Served), Sizing::Now);
        let second = start + 12 * MS;
        let mut now = second;
        let mut sized_at = None;
        while now < start + MAX_SIZING_DEFERRAL && sized_at.is_none() {
            if pace.sizing(now, GRANTED_ONE) == Sizing::Now {
                sized_at = Some(now);
            } else if pace.sizing(now + 3 * MS, Claims::Served) == Sizing::Now {
                sized_at = Some(now + 3 * MS);
            }
            now += 12 * MS;
        }
        let sized_at = sized_at.expect("sized before the bound for claims in flight");
        assert!(sized_at - second >= MAX_QUIET_DEFERRAL);
        assert!(sized_at - second < MAX_QUIET_DEFERRAL + 12 * MS);
    }

    #[test]
    fn status_writes_of_a_pool_are_at_least_an_interval_apart() {
        for change in [StatusChange::Counts, StatusChange::State] {
            let start = Instant::now();
            let mut budget = StatusBudget::new(1000);
            let mut pace = PoolPace::default();
            assert_eq!(
                pace.status(start, change, &mut budget),
                StatusWrite::Now,
                "the first goes out"
            );
            pace.status_written(start);
            assert_eq!(
                pace.status(start + 300 * MS, change, &mut budget),
                StatusWrite::After(STATUS_INTERVAL - 300 * MS),
                "{change:?}"
            );
            assert_eq!(
                pace.status(start + STATUS_INTERVAL, change, &mut budget),
                StatusWrite::Now
            );
        }
    }

    #[test]
    fn pools_changing_at_once_share_the_budget_one_slot_each() {
        let start = Instant::now();
        let mut budget = StatusBudget::new(5);
        let mut pools = vec![PoolPace::default(); 50];
        let waits: Vec<StatusWrite> = pools
            .iter_mut()
            .map(|p| p.status(start, StatusChange::Counts, &mut budget))
            .collect();
        assert_eq!(waits[0], StatusWrite::Now);
        for (i, wait) in waits.iter().enumerate().skip(1) {
            assert_eq!(*wait, StatusWrite::After(i as u32 * 200 * MS), "pool {i}");
        }
        // Asking again (an event woke the pool) keeps its place instead of queueing anew.
        assert_eq!(
            pools[10].status(start + 100 * MS, StatusChange::Counts, &mut budget),
            StatusWrite::After(1900 * MS)
        );
        assert_eq!(
            pools[10].status(start + 2000 * MS, StatusChange::Counts, &mut budget),
            StatusWrite::Now
        );
        // All 50 slots went out over ten seconds: the rate, whatever the number of pools.
        let mut fresh = PoolPace::default();
        assert_eq!(
            fresh.status(start, StatusChange::Counts, &mut budget),
            StatusWrite::After(10 * STATUS_INTERVAL)
        );
    }

    #[test]
    fn a_change_of_state_does_not_wait_for_the_budget() {
        let start = Instant::now();
        let mut budget = StatusBudget::new(1);
        let mut busy = PoolPace::default();
        assert_eq!(
            busy.status(start, StatusChange::Counts, &mut budget),
            StatusWrite::Now
        );
        let mut pace = PoolPace::default();
        assert_eq!(
            pace.status(start, StatusChange::Counts, &mut budget),
            StatusWrite::After(STATUS_INTERVAL)
        );
        assert_eq!(
            pace.status(start + MS, StatusChange::State, &mut budget),
            StatusWrite::Now,
            "a condition that changed is written at once"
        );
        pace.status_written(start + MS);
        // Its slot went with that write: the next counts change queues for a new one, behind
        // the slot it held (start + 1 s).
        assert_eq!(
            pace.status(
                start + STATUS_INTERVAL + MS,
                StatusChange::Counts,
                &mut budget
            ),
            StatusWrite::After(STATUS_INTERVAL - MS)
        );
    }

    #[test]
    fn a_slot_left_unused_is_given_up_rather_than_saved() {
        let start = Instant::now();
        let mut budget = StatusBudget::new(10);
        let mut pace = PoolPace::default();
        assert_eq!(
            pace.status(start, StatusChange::Counts, &mut budget),
            StatusWrite::Now
        );
        // The counts went back, so nothing was written; much later they move again.
        let later = start + 5 * STATUS_INTERVAL;
        let mut other = PoolPace::default();
        assert_eq!(
            other.status(later, StatusChange::Counts, &mut budget),
            StatusWrite::Now
        );
        assert_eq!(
            pace.status(later, StatusChange::Counts, &mut budget),
            StatusWrite::After(100 * MS),
            "the old slot is not spent now, beside another pool's"
        );
    }
}
