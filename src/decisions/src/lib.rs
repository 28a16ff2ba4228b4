//! The decisions sandbox-controller delegates to policies, written once.
//!
//! Each decision is a pure function of its input: [`sizing::buffer_sizing`],
//! [`tasks::shard_tasks`], [`expiry::at_expire_time`], [`selection::least_allocated_fit`]. The controller calls them natively
//! (the fail-safe engine), and the default WebAssembly policies under `policies/defaults/` are
//! thin WIT adapters around the same functions, so the two can never drift apart.
//!
//! [`checks`] holds what every policy answer must satisfy and the fail-safe answer used when one
//! does not. The `bridge_*!` macros convert between these types and the types that a WIT
//! binding generator (wasmtime's on the host, wit-bindgen's in a guest) makes from `wit/`.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod checks;
pub mod expiry;
pub mod quantity;
pub mod selection;
pub mod settings;
pub mod sizing;
pub mod tasks;

use alloc::string::String;
use alloc::vec::Vec;

/// Why a policy could not decide; the `policy-error` variant of every WIT interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The settings JSON is malformed or out of range.
    InvalidSettings(String),
    /// The input is one the policy cannot decide on.
    InvalidInput(String),
    /// Anything else.
    Internal(String),
}

impl core::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::InvalidSettings(m) => write!(f, "invalid settings: {m}"),
            Self::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Self::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// A conversion between one of these types and its WIT-generated twin, in either direction.
///
/// `From` cannot be used for the containers (`Vec<A>` to `Vec<B>`), and the generated types
/// belong to the crate that generates them, so the impls are made there by the `bridge_*!` macros.
pub trait Bridge<T> {
    fn bridge(self) -> T;
}

macro_rules! bridge_as_is {
    ($($t:ty),*) => { $(impl Bridge<$t> for $t { fn bridge(self) -> $t { self } })* };
}
bridge_as_is!(bool, u32, u64, i64, String);

impl<A: Bridge<B>, B> Bridge<Vec<B>> for Vec<A> {
    fn bridge(self) -> Vec<B> {
        self.into_iter().map(Bridge::bridge).collect()
    }
}

impl<A: Bridge<B>, B> Bridge<Option<B>> for Option<A> {
    fn bridge(self) -> Option<B> {
        self.map(Bridge::bridge)
    }
}

impl<A: Bridge<C>, B: Bridge<D>, C, D> Bridge<Result<C, D>> for Result<A, B> {
    fn bridge(self) -> Result<C, D> {
        self.map(Bridge::bridge).map_err(Bridge::bridge)
    }
}

/// Both directions of an enum whose variants carry nothing.
#[doc(hidden)]
#[macro_export]
macro_rules! bridge_unit_enum {
    ($ours:ident, $theirs:path { $($o:ident = $t:ident),* $(,)? }) => {
        impl $crate::Bridge<$theirs> for $ours {
            fn bridge(self) -> $theirs {
                type Theirs = $theirs;
                match self { $($ours::$o => Theirs::$t),* }
            }
        }
        impl $crate::Bridge<$ours> for $theirs {
            fn bridge(self) -> $ours {
                type Theirs = $theirs;
                match self { $(Theirs::$t => $ours::$o),* }
            }
        }
    };
}

/// Both directions of a struct with named fields, the same names on both sides.
#[doc(hidden)]
#[macro_export]
macro_rules! bridge_struct {
    ($ours:path, $theirs:path { $($field:ident),* $(,)? }) => {
        impl $crate::Bridge<$theirs> for $ours {
            fn bridge(self) -> $theirs {
                type Theirs = $theirs;
                Theirs { $($field: $crate::Bridge::bridge(self.$field)),* }
            }
        }
        impl $crate::Bridge<$ours> for $theirs {
            fn bridge(self) -> $ours {
                type Ours = $ours;
                Ours { $($field: $crate::Bridge::bridge(self.$field)),* }
            }
        }
    };
}

/// The `policy-error` variant of one WIT interface, both directions.
#[doc(hidden)]
#[macro_export]
macro_rules! bridge_policy_error {
    ($wit:path) => {
        impl $crate::Bridge<$wit> for $crate::PolicyError {
            fn bridge(self) -> $wit {
                type Theirs = $wit;
                match self {
                    $crate::PolicyError::InvalidSettings(m) => Theirs::InvalidSettings(m),
                    $crate::PolicyError::InvalidInput(m) => Theirs::InvalidInput(m),
                    $crate::PolicyError::Internal(m) => Theirs::Internal(m),
                }
            }
        }
        impl $crate::Bridge<$crate::PolicyError> for $wit {
            fn bridge(self) -> $crate::PolicyError {
                type Theirs = $wit;
                match self {
                    Theirs::InvalidSettings(m) => $crate::PolicyError::InvalidSettings(m),
                    Theirs::InvalidInput(m) => $crate::PolicyError::InvalidInput(m),
                    Theirs::Internal(m) => $crate::PolicyError::Internal(m),
                }
            }
        }
    };
}

/// Conversions for the types of the `pool-sizing` interface. `$wit` is the path of the module a
/// binding generator made for it (e.g. `exports::opensandbox::policy::pool_sizing`).
#[macro_export]
macro_rules! bridge_pool_sizing {
    ($($wit:ident)::+) => {
        $crate::bridge_policy_error!($($wit)::+::PolicyError);
        $crate::bridge_struct!($crate::sizing::Bounds, $($wit)::+::Bounds {
            buffer_min, buffer_max, pool_min, pool_max,
        });
        $crate::bridge_struct!($crate::sizing::AllocationEvent, $($wit)::+::AllocationEvent {
            at_unix_ms, count,
        });
        $crate::bridge_struct!($crate::sizing::PoolSnapshot, $($wit)::+::PoolSnapshot {
            pool_name, bounds, total, allocated, available, pending, terminating, unmet_demand,
            recent_allocations, now_unix_ms,
        });
        $crate::bridge_struct!($crate::sizing::SizingDecision, $($wit)::+::SizingDecision {
            desired_total, reason,
        });
    };
}

/// Conversions for the types of the `shard-tasks` interface; see [`bridge_pool_sizing!`].
#[macro_export]
macro_rules! bridge_shard_tasks {
    ($($wit:ident)::+) => {
        $crate::bridge_policy_error!($($wit)::+::PolicyError);
        $crate::bridge_struct!($crate::tasks::EnvVar, $($wit)::+::EnvVar { name, value });
        $crate::bridge_struct!($crate::tasks::ProcessTask, $($wit)::+::ProcessTask {
            command, args, env, working_dir,
        });
        $crate::bridge_struct!($crate::tasks::TaskSpec, $($wit)::+::TaskSpec {
            process, timeout_seconds,
        });
        $crate::bridge_struct!($crate::tasks::TaskTemplateSpec, $($wit)::+::TaskTemplate { spec });
        $crate::bridge_struct!($crate::tasks::ShardTaskInput, $($wit)::+::BatchInput {
            batch_name, replicas, task_template, shard_patches,
        });
    };
}

/// Conversions for the types of the `expiry` interface; see [`bridge_pool_sizing!`].
#[macro_export]
macro_rules! bridge_expiry {
    ($($wit:ident)::+) => {
        $crate::bridge_policy_error!($($wit)::+::PolicyError);
        const _: () = {
            use $crate::tasks::TaskPhase;
            use $crate::expiry::ExpireAction;
            $crate::bridge_unit_enum!(TaskPhase, $($wit)::+::TaskPhase {
                None = NoTask, Pending = Pending, Running = Running, Succeeded = Succeeded,
                Failed = Failed, Unknown = Unknown,
            });
            $crate::bridge_unit_enum!(ExpireAction, $($wit)::+::ExpireAction {
                Delete = Delete, ReturnToPool = ReturnToPool,
            });
        };
        $crate::bridge_struct!($crate::expiry::BatchSnapshot, $($wit)::+::BatchSnapshot {
            name, expire_time_unix_ms, now_unix_ms, pooled, task_phases,
        });
        impl $crate::Bridge<$($wit)::+::ExpiryDecision> for $crate::expiry::ExpiryDecision {
            fn bridge(self) -> $($wit)::+::ExpiryDecision {
                type Theirs = $($wit)::+::ExpiryDecision;
                match self {
                    Self::Keep { recheck_after_ms } => Theirs::Keep(recheck_after_ms),
                    Self::Expire { action } => Theirs::Expire($crate::Bridge::bridge(action)),
                }
            }
        }
        impl $crate::Bridge<$crate::expiry::ExpiryDecision> for $($wit)::+::ExpiryDecision {
            fn bridge(self) -> $crate::expiry::ExpiryDecision {
                type Ours = $crate::expiry::ExpiryDecision;
                match self {
                    Self::Keep(recheck_after_ms) => Ours::Keep { recheck_after_ms },
                    Self::Expire(action) => Ours::Expire { action: $crate::Bridge::bridge(action) },
                }
            }
        }
    };
}

/// Conversions for the types of the `pool-selection` interface; see [`bridge_pool_sizing!`].
/// `bridge_pool_selection!(answers path)` converts only the answer and the error, for a binding
/// generator whose input types borrow.
#[macro_export]
macro_rules! bridge_pool_selection {
    // Only what a guest answers: for a host that lowers the input from borrowed values.
    (answers $($wit:ident)::+) => {
        $crate::bridge_policy_error!($($wit)::+::PolicyError);
        $crate::bridge_struct!($crate::selection::SelectionDecision, $($wit)::+::SelectionDecision {
            pool, reason,
        });
    };
    ($($wit:ident)::+) => {
        $crate::bridge_pool_selection!(answers $($wit)::+);
        $crate::bridge_struct!($crate::sizing::Bounds, $($wit)::+::Bounds {
            buffer_min, buffer_max, pool_min, pool_max,
        });
        $crate::bridge_struct!($crate::selection::Label, $($wit)::+::Label { key, value });
        $crate::bridge_struct!($crate::selection::ResourceRequest, $($wit)::+::ResourceRequest {
            name, quantity,
        });
        $crate::bridge_struct!($crate::selection::ContainerRequirements, $($wit)::+::ContainerRequirements {
            image, requests,
        });
        $crate::bridge_struct!($crate::selection::PodRequirements, $($wit)::+::PodRequirements {
            containers, node_selector,
        });
        $crate::bridge_struct!($crate::selection::BatchRequirements, $($wit)::+::BatchRequirements {
            batch_name, replicas, template,
        });
        $crate::bridge_struct!($crate::selection::CandidatePool, $($wit)::+::CandidatePool {
            pool_name, labels, template, bounds, total, allocated, idle,
        });
        $crate::bridge_struct!($crate::selection::SelectionInput, $($wit)::+::SelectionInput {
            batch, pools,
        });
    };
}
