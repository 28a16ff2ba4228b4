//! Copies of a batch this process recycled pods from and then wrote past.
//!
//! A batch lets go of pods in a write that follows their recycle: the finalizer taken off, a
//! scale-down's or a release's ledger. Until the watch brings the newer copy, the cache can still
//! hand a reconcile the copy the recycle was planned from (one queued by an earlier event), and
//! acting on it again would stop tasks in, or delete, pods the pool has meanwhile handed to
//! another batch. So each such copy is remembered, by uid and resourceVersion, and a reconcile of
//! it does nothing. A write whose answer was lost (a reset connection, a timeout) may or may not
//! have committed; its copy is remembered as such, and the reconcile that meets it asks the API
//! server first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kube::ResourceExt;
use sandbox_domain::api::BatchSandbox;

use super::Error;

/// What is known of a copy of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecycledCopy {
    /// Nothing was recycled from it, or its write did not commit: act on it.
    Current,
    /// Recycled from and written past: stale, leave it alone.
    WrittenPast,
    /// Recycled from, and the write past it went unanswered: read the batch to tell.
    MaybeWrittenPast,
}

/// Per batch uid, the resourceVersions of copies recycled from; `true` when the write past the
/// copy is known to have committed. A few per batch, kept until the batch is gone.
#[derive(Default)]
pub struct RecycledCopies {
    copies: Mutex<HashMap<String, BTreeMap<String, bool>>>,
}

impl RecycledCopies {
    fn copies(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<String, bool>>> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(copy: &BatchSandbox) -> Option<(String, String)> {
        Some((copy.uid()?, copy.resource_version()?))
    }

    /// What is known of `copy`.
    pub fn of(&self, copy: &BatchSandbox) -> RecycledCopy {
        let Some((uid, version)) = Self::key(copy) else {
            return RecycledCopy::Current;
        };
        match self.copies().get(&uid).and_then(|v| v.get(&version)) {
            None => RecycledCopy::Current,
            Some(true) => RecycledCopy::WrittenPast,
            Some(false) => RecycledCopy::MaybeWrittenPast,
        }
    }

    /// Pods of `copy` were recycled and a write past it committed.
    pub fn written_past(&self, copy: &BatchSandbox) {
        if let Some((uid, version)) = Self::key(copy) {
            self.copies().entry(uid).or_default().insert(version, true);
        }
    }

    /// Records how the write past `copy`, made after recycling its pods, ended, and passes its
    /// result on: committed, or unanswered (it may have committed); a definite refusal changed
    /// nothing, and the copy stays current.
    pub fn after_write<T>(
        &self,
        copy: &BatchSandbox,
        written: Result<T, kube::Error>,
    ) -> Result<T, Error> {
        match written {
            Ok(answer) => {
                self.written_past(copy);
                Ok(answer)
            }
            Err(error) => {
                let error = Error::from(error);
                if !error.is_definite_refusal()
                    && let Some((uid, version)) = Self::key(copy)
                {
                    self.copies()
                        .entry(uid)
                        .or_default()
                        .entry(version)
                        .or_insert(false);
                }
                Err(error)
            }
        }
    }

    /// The API server shows `copy` still current: the write past it did not commit.
    pub fn not_written_past(&self, copy: &BatchSandbox) {
        if let Some((uid, version)) = Self::key(copy)
            && let Some(versions) = self.copies().get_mut(&uid)
        {
            versions.remove(&version);
        }
    }

    /// The watch shows `batch` gone: no copy of it can come any more.
    pub fn forget(&self, batch: &BatchSandbox) {
        if let Some(uid) = batch.uid() {
            self.copies().remove(&uid);
        }
    }

    /// A relist: batches it no longer lists are gone (their Delete events were missed).
    pub fn forget_all_but(&self, listed: &[Arc<BatchSandbox>]) {
        let listed: HashSet<String> = listed.iter().filter_map(|b| b.uid()).collect();
        self.copies().retain(|uid, _| listed.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn copy(uid: &str, version: &str) -> BatchSandbox {
        let mut batch = BatchSandbox::new("b", Default::default());
        batch.metadata = ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        };
        batch
    }

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("refused", "Refused").with_code(code),
        ))
    }

    fn reset() -> kube::Error {
        kube::Error::Service(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )))
    }

    #[test]
    fn each_outcome_of_the_write_past_a_copy_is_remembered_as_it_ended() {
        let copies = RecycledCopies::default();
        let (a, b, c) = (copy("u", "5"), copy("u", "6"), copy("u", "7"));
        copies.after_write(&a, Ok(())).expect("committed");
        copies
            .after_write::<()>(&b, Err(reset()))
            .expect_err("unanswered");
        copies
            .after_write::<()>(&c, Err(status(409)))
            .expect_err("refused");
        assert_eq!(copies.of(&a), RecycledCopy::WrittenPast);
        assert_eq!(copies.of(&b), RecycledCopy::MaybeWrittenPast);
        assert_eq!(
            copies.of(&c),
            RecycledCopy::Current,
            "a refusal changed nothing"
        );
        assert_eq!(copies.of(&copy("other", "5")), RecycledCopy::Current);

        // An unanswered write never downgrades one known to have committed.
        copies
            .after_write::<()>(&a, Err(reset()))
            .expect_err("unanswered");
        assert_eq!(copies.of(&a), RecycledCopy::WrittenPast);
        copies.not_written_past(&b);
        assert_eq!(copies.of(&b), RecycledCopy::Current);
    }

    #[test]
    fn copies_are_forgotten_once_the_batch_is_gone() {
        let copies = RecycledCopies::default();
        let (kept, gone) = (copy("kept", "5"), copy("gone", "5"));
        copies.written_past(&kept);
        copies.written_past(&gone);
        copies.forget_all_but(&[Arc::new(kept.clone())]);
        assert_eq!(copies.of(&kept), RecycledCopy::WrittenPast);
        assert_eq!(copies.of(&gone), RecycledCopy::Current);
        copies.forget(&kept);
        assert_eq!(copies.of(&kept), RecycledCopy::Current);
    }
}
