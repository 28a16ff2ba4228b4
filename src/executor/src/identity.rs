//! The identity tasks and commands run under.
//!
//! An executor running as root runs what it is asked to run as another, unprivileged user
//! (`--task-user`, by default `65534:65534`, "nobody"): such a process cannot read the
//! executor's `/proc/<pid>/environ` or memory, nor files only root may read, nor signal the
//! executor. An executor that is not root cannot switch users; its tasks run as itself, and the
//! executor makes itself non-dumpable so that its `/proc` entries at least stay closed to them.

use std::fmt;
use std::str::FromStr;

/// The user tasks run as, unless the executor runs as root: `UID:GID`.
pub const DEFAULT_TASK_USER: &str = "65534:65534";

/// A numeric user and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskIdentity {
    pub uid: u32,
    pub gid: u32,
}

impl FromStr for TaskIdentity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (uid, gid) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected UID:GID, numeric"))?;
        let number = |part: &str| {
            part.trim()
                .parse::<u32>()
                .map_err(|e| format!("{s:?}: {part:?} is not a numeric id ({e})"))
        };
        Ok(TaskIdentity {
            uid: number(uid)?,
            gid: number(gid)?,
        })
    }
}

impl fmt::Display for TaskIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Which identity tasks get: `configured` when the executor runs as root and it differs from
/// root, else none (they keep the executor's own).
pub fn effective(configured: Option<TaskIdentity>) -> Option<TaskIdentity> {
    let root = rustix::process::geteuid().is_root();
    configured.filter(|id| root && id.uid != 0)
}

/// Makes `command` run as `identity` (group first, supplementary groups dropped by the standard
/// library when it switches from root). Nothing changes for `None` or for the current identity.
pub fn apply(command: &mut tokio::process::Command, identity: Option<TaskIdentity>) {
    let Some(identity) = identity else {
        return;
    };
    let current = TaskIdentity {
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    };
    if identity != current {
        command.gid(identity.gid).uid(identity.uid);
    }
}

/// Keeps this process's `/proc/<pid>` entries (environ, mem, fds) closed to processes of the
/// same uid. Reset by every `execve`, so the programs it starts are not affected.
pub fn make_undumpable() -> std::io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_as_uid_colon_gid() {
        assert_eq!(
            DEFAULT_TASK_USER.parse::<TaskIdentity>(),
            Ok(TaskIdentity {
                uid: 65534,
                gid: 65534
            })
        );
        assert_eq!(
            "1000:100".parse::<TaskIdentity>().unwrap().to_string(),
            "1000:100"
        );
        for bad in ["1000", "a:b", "1000:", ":1", "-1:0"] {
            assert!(bad.parse::<TaskIdentity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn root_is_never_a_task_identity() {
        assert_eq!(effective(Some(TaskIdentity { uid: 0, gid: 0 })), None);
        assert_eq!(effective(None), None);
    }
}
