//! Directories mounted for an executor that runs outside a container (`--mount HOST_DIR:PATH`).
//!
//! In a pod, the kubelet mounts the pod's volumes into the executor's container: OpenSandbox's
//! sandboxes, for one, find `/opt/opensandbox/bootstrap.sh` on a volume there. An executor started
//! on a plain machine (the local executor runner does this for kwok pods, which run no
//! containers) gets the same view from a private mount namespace: the executor, and so every
//! task and command it starts, sees `HOST_DIR` at `PATH`, while nothing changes for any other
//! process on the machine.
//!
//! * A `PATH` that exists is bind-mounted over.
//! * A `PATH` that does not exist is created in an overlay on its nearest existing ancestor (say
//!   `/opt`), whose writable layer is a tmpfs inside the namespace: the ancestor keeps its
//!   content, and nothing is written outside the executor's data directory.
//! * As root the namespace is a mount namespace; otherwise it is a user namespace that maps the
//!   caller's own uid and gid, so processes keep their identity (kernel 5.11+ for overlays there).
//!
//! [`enter`] must be called while the process has one thread, before any async runtime starts.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::thread::UnshareFlags;

/// One `HOST_DIR:PATH` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl FromStr for BindMount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (source, target) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected HOST_DIR:PATH"))?;
        let (source, target) = (PathBuf::from(source), PathBuf::from(target));
        if !source.is_absolute() || !target.is_absolute() {
            return Err(format!("{s:?}: both paths must be absolute"));
        }
        if target == Path::new("/") {
            return Err(format!("{s:?}: cannot mount over /"));
        }
        Ok(BindMount { source, target })
    }
}

impl fmt::Display for BindMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.display(), self.target.display())
    }
}

/// Why the mounts could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> MountError {
    let what = what.into();
    move |errno| MountError::Sys {
        what,
        source: errno.into(),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MountError {
    let what = what.into();
    move |source| MountError::Sys { what, source }
}

/// Where each target's overlay goes: the nearest existing ancestor of a missing target (`None`
/// for a target that exists and is bind-mounted over directly).
pub fn plan(
    mounts: &[BindMount],
    exists: impl Fn(&Path) -> bool,
) -> Result<Vec<Option<PathBuf>>, MountError> {
    mounts
        .iter()
        .map(|m| {
            if exists(&m.target) {
                return Ok(None);
            }
            let ancestor = m
                .target
                .ancestors()
                .skip(1)
                .find(|a| exists(a))
                .unwrap_or(Path::new("/"));
            if ancestor == Path::new("/") {
                return Err(MountError::Invalid(format!(
                    "{}: no existing ancestor below / to put it in",
                    m.target.display()
                )));
            }
            Ok(Some(ancestor.to_path_buf()))
        })
        .collect()
}

/// Enters a private mount namespace with `mounts` in place; `scratch` (created if missing, in
/// the executor's data directory) holds the overlays' writable layers.
pub fn enter(mounts: &[BindMount], scratch: &Path) -> Result<(), MountError> {
    if mounts.is_empty() {
        return Ok(());
    }
    for m in mounts {
        if !m.source.is_dir() {
            return Err(MountError::Invalid(format!(
                "{}: not a directory",
                m.source.display()
            )));
        }
    }
    let overlays = plan(mounts, |p| p.is_dir())?;
    for path in overlays.iter().flatten().chain([&scratch.to_path_buf()]) {
        let text = path.to_string_lossy();
        if text.contains(',') || text.contains(':') {
            return Err(MountError::Invalid(format!(
                "{text}: overlay paths cannot contain ',' or ':'"
            )));
        }
    }
    std::fs::create_dir_all(scratch).map_err(io(format!("creating {}", scratch.display())))?;

    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    if rustix::process::geteuid().is_root() {
        unshare(UnshareFlags::NEWNS)?;
    } else {
        unshare(UnshareFlags::NEWUSER | UnshareFlags::NEWNS)?;
        let write = |file: &str, text: String| {
            std::fs::write(format!("/proc/self/{file}"), text)
                .map_err(io(format!("writing /proc/self/{file}")))
        };
        write("setgroups", "deny".into())?;
        write("uid_map", format!("{0} {0} 1", uid.as_raw()))?;
        write("gid_map", format!("{0} {0} 1", gid.as_raw()))?;
    }
    // Nothing mounted from here on propagates back to the machine.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(sys("making / private in the new mount namespace"))?;
    rustix::mount::mount(
        "tmpfs",
        scratch,
        "tmpfs",
        MountFlags::empty(),
        Some(c"mode=0700"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", scratch.display())))?;

    let mut layered: BTreeSet<PathBuf> = BTreeSet::new();
    for (index, (m, overlay)) in mounts.iter().zip(&overlays).enumerate() {
        if let Some(ancestor) = overlay
            && !layered.contains(ancestor)
        {
            let upper = scratch.join(format!("{index}/upper"));
            let work = scratch.join(format!("{index}/work"));
            for dir in [&upper, &work] {
                std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            }
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                ancestor.display(),
                upper.display(),
                work.display()
            );
            let options = CString::new(options).map_err(|_| {
                MountError::Invalid(format!("{}: NUL in a path", ancestor.display()))
            })?;
            rustix::mount::mount(
                "overlay",
                ancestor,
                "overlay",
                MountFlags::empty(),
                Some(options.as_c_str()),
            )
            .map_err(sys(format!(
                "mounting an overlay on {}",
                ancestor.display()
            )))?;
            layered.insert(ancestor.clone());
        }
        std::fs::create_dir_all(&m.target)
            .map_err(io(format!("creating {}", m.target.display())))?;
        rustix::mount::mount_bind(&m.source, &m.target)
            .map_err(sys(format!("bind-mounting {m}")))?;
    }
    Ok(())
}

/// `unshare(2)` with namespace flags only. rustix deprecates its safe wrapper because of
/// `CLONE_FILES` (threads could then see different descriptor tables); with the namespace flags
/// used here, on a single-threaded process, there is no such hazard.
#[allow(deprecated)]
fn unshare(flags: UnshareFlags) -> Result<(), MountError> {
    debug_assert!(!flags.contains(UnshareFlags::FILES));
    rustix::thread::unshare(flags).map_err(sys(format!("unshare({flags:?})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_of_absolute_paths() {
        assert_eq!(
            "/data/x:/opt/opensandbox".parse::<BindMount>(),
            Ok(BindMount {
                source: "/data/x".into(),
                target: "/opt/opensandbox".into()
            })
        );
        assert!("relative:/opt".parse::<BindMount>().is_err());
        assert!("/a".parse::<BindMount>().is_err());
        assert!("/a:/".parse::<BindMount>().is_err());
    }

    #[test]
    fn missing_targets_go_into_an_overlay_on_their_nearest_existing_ancestor() {
        let existing = ["/", "/opt", "/srv", "/srv/app"];
        let exists = |p: &Path| existing.iter().any(|e| Path::new(e) == p);
        let mounts: Vec<BindMount> = ["/d/1:/opt/opensandbox", "/d/2:/srv/app", "/d/3:/opt/a/b"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let plan = plan(&mounts, exists).unwrap();
        assert_eq!(
            plan,
            [
                Some(PathBuf::from("/opt")),
                None,
                Some(PathBuf::from("/opt"))
            ]
        );
        let top = ["/d/4:/nowhere/x".parse().unwrap()];
        assert!(matches!(
            super::plan(&top, exists),
            Err(MountError::Invalid(_))
        ));
    }
}
