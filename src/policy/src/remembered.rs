//! The last shard-task and expiry answers for each object, reused while their input stands.
//!
//! Policies are pure functions of their input (`wit/policy.wit`), so asking one again with the
//! same input only spends a WebAssembly call, and a BatchSandbox is reconciled several times
//! over a claim (its grant, its status) with the same template and tasks. Expiry's input carries
//! the clock; its answer says how long it stands: `keep` with no recheck stands until the input
//! changes, `keep` with a recheck stands until that time has passed (the recheck shortened by the
//! time gone), and `expire` is acted on, never reused. Answers that fell back (degraded) are
//! never kept, so a failing custom policy is asked again every time. A change to the custom
//! policies (a load, a failed load, a removal) drops every answer.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use sandbox_decisions::expiry::{BatchSnapshot, ExpiryDecision};
use tokio::sync::watch;

use crate::{Outcome, PolicyEngine, PolicySelector, ShardTaskInput, ShardTasks};

/// One object's last answer to one decision, with what it was asked under.
struct Answer<I, O> {
    selector: Option<String>,
    input: I,
    decision: O,
}

impl<I, O> Answer<I, O> {
    fn asked_under(&self, selector: PolicySelector<'_>) -> bool {
        self.selector.as_deref() == selector
    }
}

#[derive(Default)]
struct Answers {
    /// The value of the engine's change counter the answers below were given under.
    generation: u64,
    shard_tasks: HashMap<String, Answer<ShardTaskInput, ShardTasks>>,
    expiry: HashMap<String, Answer<BatchSnapshot, ExpiryDecision>>,
}

/// Last answers per object (keyed by the caller, normally the object's uid).
pub struct Remembered {
    changes: Option<watch::Receiver<u64>>,
    answers: Mutex<Answers>,
}

impl Remembered {
    /// Answers remembered for `engine`, dropped whenever its custom policies change.
    pub fn new(engine: &dyn PolicyEngine) -> Self {
        let changes = engine.changes();
        let generation = changes.as_ref().map_or(0, |c| *c.borrow());
        Self {
            changes,
            answers: Mutex::new(Answers {
                generation,
                ..Answers::default()
            }),
        }
    }

    /// The answers, emptied first if the custom policies changed since they were given.
    fn answers(&self) -> MutexGuard<'_, Answers> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.changes.as_ref().map_or(0, |c| *c.borrow());
        if generation != answers.generation {
            *answers = Answers {
                generation,
                ..Answers::default()
            };
        }
        answers
    }

    /// The shard tasks last decided for `key` under `selector` from this very input.
    pub fn shard_tasks(
        &self,
        key: &str,
        selector: PolicySelector<'_>,
        input: &ShardTaskInput,
    ) -> Option<ShardTasks> {
        let answers = self.answers();
        let answer = answers.shard_tasks.get(key)?;
        (answer.asked_under(selector) && answer.input == *input).then(|| answer.decision.clone())
    }

    /// Keeps `outcome` as the answer for `key`, unless it is a fallback or deferral.
    pub fn remember_shard_tasks(
        &self,
        key: &str,
        selector: PolicySelector<'_>,
        input: &ShardTaskInput,
        outcome: &Outcome<Option<ShardTasks>>,
    ) {
        let mut answers = self.answers();
        match (&outcome.decision, &outcome.degraded) {
            (Some(tasks), None) => {
                answers.shard_tasks.insert(
                    key.to_owned(),
                    Answer {
                        selector: selector.map(str::to_owned),
                        input: input.clone(),
                        decision: tasks.clone(),
                    },
                );
            }
            _ => {
                answers.shard_tasks.remove(key);
            }
        }
    }

    /// The expiry answer last given for `key` under `selector`, if it still stands for `input`:
    /// the same input but for the clock, and no recheck due yet.
    pub fn expiry(
        &self,
        key: &str,
        selector: PolicySelector<'_>,
        input: &BatchSnapshot,
    ) -> Option<ExpiryDecision> {
        let answers = self.answers();
        let answer = answers.expiry.get(key)?;
        if !answer.asked_under(selector) || !same_but_the_clock(&answer.input, input) {
            return None;
        }
        standing(
            &answer.decision,
            answer.input.now_unix_ms,
            input.now_unix_ms,
        )
    }

    /// Keeps `outcome` as the expiry answer for `key`, unless it is a fallback or an expiry.
    pub fn remember_expiry(
        &self,
        key: &str,
        selector: PolicySelector<'_>,
        input: &BatchSnapshot,
        outcome: &Outcome<ExpiryDecision>,
    ) {
        let mut answers = self.answers();
        match (&outcome.decision, &outcome.degraded) {
            (keep @ ExpiryDecision::Keep { .. }, None) => {
                answers.expiry.insert(
                    key.to_owned(),
                    Answer {
                        selector: selector.map(str::to_owned),
                        input: input.clone(),
                        decision: keep.clone(),
                    },
                );
            }
            _ => {
                answers.expiry.remove(key);
            }
        }
    }

    /// `key`'s object is gone.
    pub fn forget(&self, key: &str) {
        let mut answers = self.answers();
        answers.shard_tasks.remove(key);
        answers.expiry.remove(key);
    }

    /// A relist: objects it no longer lists are gone.
    pub fn forget_all_but(&self, listed: &HashSet<String>) {
        let mut answers = self.answers();
        answers.shard_tasks.retain(|key, _| listed.contains(key));
        answers.expiry.retain(|key, _| listed.contains(key));
    }

    /// How many objects have an answer kept (either decision).
    pub fn len(&self) -> usize {
        let answers = self.answers();
        answers
            .shard_tasks
            .keys()
            .chain(
                answers
                    .expiry
                    .keys()
                    .filter(|k| !answers.shard_tasks.contains_key(*k)),
            )
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn same_but_the_clock(a: &BatchSnapshot, b: &BatchSnapshot) -> bool {
    a.name == b.name
        && a.expire_time_unix_ms == b.expire_time_unix_ms
        && a.pooled == b.pooled
        && a.task_phases == b.task_phases
}

/// The answer `decision`, given at `then`, as it stands at `now`: `keep` until its recheck is
/// due, with the recheck shortened by the time gone; nothing once it is due or if the clock went
/// back.
fn standing(decision: &ExpiryDecision, then: i64, now: i64) -> Option<ExpiryDecision> {
    let ExpiryDecision::Keep { recheck_after_ms } = decision else {
        return None;
    };
    let gone = u64::try_from(now.checked_sub(then)?).ok()?;
    match recheck_after_ms {
        None => Some(ExpiryDecision::Keep {
            recheck_after_ms: None,
        }),
        Some(after) if gone < *after => Some(ExpiryDecision::Keep {
            recheck_after_ms: Some(after - gone),
        }),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NativePolicies;
    use proptest::prelude::*;
    use sandbox_decisions::expiry::ExpireAction;
    use sandbox_decisions::tasks::{ProcessTask, TaskSpec, TaskTemplateSpec};

    /// An engine whose custom policies change when the test says.
    struct Changing(watch::Sender<u64>);

    impl PolicyEngine for Changing {
        fn pool_sizing(
            &self,
            s: PolicySelector<'_>,
            p: &sandbox_decisions::sizing::PoolSnapshot,
        ) -> Outcome<sandbox_decisions::sizing::SizingDecision> {
            NativePolicies.pool_sizing(s, p)
        }
        fn shard_tasks(
            &self,
            s: PolicySelector<'_>,
            b: &ShardTaskInput,
        ) -> Outcome<Option<ShardTasks>> {
            NativePolicies.shard_tasks(s, b)
        }
        fn expiry(&self, s: PolicySelector<'_>, b: &BatchSnapshot) -> Outcome<ExpiryDecision> {
            NativePolicies.expiry(s, b)
        }
        fn pool_selection(
            &self,
            s: PolicySelector<'_>,
            i: &sandbox_decisions::selection::SelectionInput,
        ) -> Outcome<sandbox_decisions::selection::SelectionDecision> {
            NativePolicies.pool_selection(s, i)
        }
        fn changes(&self) -> Option<watch::Receiver<u64>> {
            Some(self.0.subscribe())
        }
    }

    fn tasks_input(command: &str) -> ShardTaskInput {
        ShardTaskInput {
            batch_name: "b".into(),
            replicas: 2,
            task_template: Some(TaskTemplateSpec {
                spec: Some(TaskSpec {
                    process: Some(ProcessTask {
                        command: Some(vec![command.into()]),
                        ..ProcessTask::default()
                    }),
                    timeout_seconds: None,
                }),
            }),
            shard_patches: Vec::new(),
        }
    }

    fn snapshot(expire: Option<i64>, now: i64) -> BatchSnapshot {
        BatchSnapshot {
            name: "b".into(),
            expire_time_unix_ms: expire,
            now_unix_ms: now,
            pooled: true,
            task_phases: Vec::new(),
        }
    }

    #[test]
    fn shard_tasks_are_reused_only_for_the_same_input_and_selector() {
        let memo = Remembered::new(&NativePolicies);
        let input = tasks_input("true");
        assert_eq!(memo.shard_tasks("uid", None, &input), None);
        let outcome = NativePolicies.shard_tasks(None, &input);
        memo.remember_shard_tasks("uid", None, &input, &outcome);
        assert_eq!(memo.shard_tasks("uid", None, &input), outcome.decision);
        assert_eq!(memo.shard_tasks("other", None, &input), None);
        assert_eq!(memo.shard_tasks("uid", Some("custom"), &input), None);
        assert_eq!(memo.shard_tasks("uid", None, &tasks_input("false")), None);
        let mut more = input.clone();
        more.replicas = 3;
        assert_eq!(memo.shard_tasks("uid", None, &more), None);
    }

    #[test]
    fn fallbacks_and_deferrals_are_not_kept_and_drop_the_last_answer() {
        let memo = Remembered::new(&NativePolicies);
        let input = tasks_input("true");
        memo.remember_shard_tasks(
            "uid",
            None,
            &input,
            &NativePolicies.shard_tasks(None, &input),
        );
        let degraded = Outcome {
            degraded: Some("policy failed".into()),
            ..NativePolicies.shard_tasks(None, &input)
        };
        memo.remember_shard_tasks("uid", None, &input, &degraded);
        assert_eq!(memo.shard_tasks("uid", None, &input), None);
        memo.remember_shard_tasks("uid", None, &input, &Outcome::ok(None));
        assert_eq!(memo.shard_tasks("uid", None, &input), None);

        let keep = snapshot(None, 1_000);
        memo.remember_expiry(
            "uid",
            None,
            &keep,
            &Outcome {
                decision: ExpiryDecision::Keep {
                    recheck_after_ms: None,
                },
                degraded: Some("policy failed".into()),
            },
        );
        assert_eq!(memo.expiry("uid", None, &keep), None);
    }

    #[test]
    fn keep_without_recheck_stands_until_the_input_changes() {
        let memo = Remembered::new(&NativePolicies);
        let at = snapshot(None, 1_000);
        memo.remember_expiry("uid", None, &at, &NativePolicies.expiry(None, &at));
        let later = snapshot(None, 1_000_000_000);
        assert_eq!(
            memo.expiry("uid", None, &later),
            Some(ExpiryDecision::Keep {
                recheck_after_ms: None
            })
        );
        let mut running = later.clone();
        running.task_phases = vec![sandbox_decisions::tasks::TaskPhase::Running];
        assert_eq!(memo.expiry("uid", None, &running), None);
        assert_eq!(
            memo.expiry("uid", None, &snapshot(Some(5_000), 2_000)),
            None
        );
        assert_eq!(memo.expiry("uid", Some("custom"), &later), None);
    }

    #[test]
    fn keep_with_recheck_stands_until_it_is_due_and_counts_down() {
        let memo = Remembered::new(&NativePolicies);
        let at = snapshot(Some(10_000), 4_000);
        memo.remember_expiry("uid", None, &at, &NativePolicies.expiry(None, &at));
        assert_eq!(
            memo.expiry("uid", None, &snapshot(Some(10_000), 9_999)),
            Some(ExpiryDecision::Keep {
                recheck_after_ms: Some(1)
            })
        );
        assert_eq!(
            memo.expiry("uid", None, &snapshot(Some(10_000), 10_000)),
            None
        );
        // A clock that went back asks again.
        assert_eq!(
            memo.expiry("uid", None, &snapshot(Some(10_000), 3_999)),
            None
        );
    }

    #[test]
    fn an_expiry_is_never_kept() {
        let memo = Remembered::new(&NativePolicies);
        let due = snapshot(Some(1_000), 2_000);
        let outcome = NativePolicies.expiry(None, &due);
        assert!(matches!(
            outcome.decision,
            ExpiryDecision::Expire {
                action: ExpireAction::Delete
            }
        ));
        memo.remember_expiry("uid", None, &due, &outcome);
        assert_eq!(memo.expiry("uid", None, &due), None);
    }

    #[test]
    fn a_change_to_the_custom_policies_drops_every_answer() {
        let engine = Changing(watch::Sender::new(7));
        let memo = Remembered::new(&engine);
        let input = tasks_input("true");
        let at = snapshot(None, 1_000);
        memo.remember_shard_tasks("uid", Some("p"), &input, &engine.shard_tasks(None, &input));
        memo.remember_expiry("uid", Some("p"), &at, &engine.expiry(None, &at));
        assert_eq!(memo.len(), 1);
        assert!(memo.shard_tasks("uid", Some("p"), &input).is_some());
        engine.0.send_modify(|n| *n += 1);
        assert_eq!(memo.shard_tasks("uid", Some("p"), &input), None);
        assert_eq!(memo.expiry("uid", Some("p"), &at), None);
        assert!(memo.is_empty());
    }

    #[test]
    fn forgetting_drops_an_object_and_a_relist_drops_the_unlisted() {
        let memo = Remembered::new(&NativePolicies);
        let input = tasks_input("true");
        let at = snapshot(None, 1_000);
        for key in ["a", "b", "c"] {
            memo.remember_shard_tasks(key, None, &input, &NativePolicies.shard_tasks(None, &input));
            memo.remember_expiry(key, None, &at, &NativePolicies.expiry(None, &at));
        }
        memo.forget("a");
        assert_eq!(memo.shard_tasks("a", None, &input), None);
        assert_eq!(memo.expiry("a", None, &at), None);
        memo.forget_all_but(&HashSet::from(["c".to_owned()]));
        assert_eq!(memo.shard_tasks("b", None, &input), None);
        assert!(memo.shard_tasks("c", None, &input).is_some());
        assert!(memo.expiry("c", None, &at).is_some());
        assert_eq!(memo.len(), 1);
    }

    fn arb_snapshot() -> impl Strategy<Value = BatchSnapshot> {
        (
            prop::option::of(0i64..20_000),
            0i64..20_000,
            any::<bool>(),
            prop::collection::vec(0u8..3, 0..3),
        )
            .prop_map(|(expire, now, pooled, phases)| BatchSnapshot {
                name: "b".into(),
                expire_time_unix_ms: expire,
                now_unix_ms: now,
                pooled,
                task_phases: phases
                    .into_iter()
                    .map(|p| match p {
                        0 => sandbox_decisions::tasks::TaskPhase::None,
                        1 => sandbox_decisions::tasks::TaskPhase::Running,
                        _ => sandbox_decisions::tasks::TaskPhase::Succeeded,
                    })
                    .collect(),
            })
    }

    proptest! {
        /// For the default (pure) policy, a reused answer is the answer a call would give.
        #[test]
        fn a_reused_expiry_answer_is_the_one_a_call_gives(
            asked in prop::collection::vec(arb_snapshot(), 1..12),
        ) {
            let memo = Remembered::new(&NativePolicies);
            for input in &asked {
                let fresh = NativePolicies.expiry(None, input);
                let answer = match memo.expiry("uid", None, input) {
                    Some(reused) => reused,
                    None => {
                        memo.remember_expiry("uid", None, input, &fresh);
                        fresh.decision.clone()
                    }
                };
                prop_assert_eq!(answer, fresh.decision);
            }
        }
    }
}
