//! Ending every process a task started, and proving it.
//!
//! The supervisor is a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever the task leaves
//! behind when its own process ends (`sh -c 'sleep 1000 & exit 0'`, a double-forked daemon, a
//! `setsid` child that left the task's process group) is re-parented to the supervisor instead of
//! to init, so it stays in the supervisor's process tree. When the task ends for any reason, the
//! supervisor walks that tree through `/proc`, sends SIGTERM, waits the grace period, sends SIGKILL
//! until nothing is left, and reaps what became its children. Only then does it record the
//! task's result with `allProcessesEnded: true`.
//!
//! Signals go through pidfds opened after the process was seen in the tree and checked again
//! afterwards, so a recycled pid of an unrelated process is never signalled.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};
use tokio::time::Instant;

/// Makes the calling process the subreaper of its descendants.
pub fn become_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(io::Error::from)
}

/// One line of the process table: a process, its parent, and whether it is a zombie (exited,
/// waiting to be reaped; it runs nothing any more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: i32,
    pub ppid: i32,
    pub zombie: bool,
}

/// Parses `/proc/<pid>/stat`. The command name sits in parentheses and may itself contain
/// spaces and parentheses, so the fields are read after the last `)`.
pub fn parse_stat(stat: &str) -> Option<ProcEntry> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let mut fields = tail.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcEntry {
        pid,
        ppid,
        zombie: matches!(state, "Z" | "X" | "x"),
    })
}

/// Every process below `root` in `table` (children, their children, ...), zombies included.
pub fn descendants(table: &[ProcEntry], root: i32) -> Vec<ProcEntry> {
    let mut children: HashMap<i32, Vec<&ProcEntry>> = HashMap::new();
    for entry in table {
        children.entry(entry.ppid).or_default().push(entry);
    }
    let mut found = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child.pid) {
                found.push(**child);
                queue.push(child.pid);
            }
        }
    }
    found
}

/// The live (non-zombie) processes below `root` right now.
pub fn live_descendants(root: i32) -> io::Result<Vec<ProcEntry>> {
    let table = process_table()?;
    Ok(descendants(&table, root)
        .into_iter()
        .filter(|e| !e.zombie)
        .collect())
}

/// The whole process table as `/proc` shows it. Processes that vanish while it is read are
/// simply left out.
fn process_table() -> io::Result<Vec<ProcEntry>> {
    let mut table = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{name}/stat"))
            && let Some(parsed) = parse_stat(&stat)
        {
            table.push(parsed);
        }
    }
    Ok(table)
}

/// The parent of `pid` now, if it exists.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|e| e.ppid)
}

/// Signals every live process below `root`. A process is signalled only if, after its pidfd was
/// opened, its parent is still `root` or another process of the tree: the pidfd then surely
/// names that process and not a newcomer that reused its pid.
fn signal_tree(root: i32, signal: Signal) -> io::Result<usize> {
    let tree = live_descendants(root)?;
    let members: HashSet<i32> = tree.iter().map(|e| e.pid).chain([root]).collect();
    let mut signalled = 0;
    for entry in &tree {
        let Some(pid) = Pid::from_raw(entry.pid) else {
            continue;
        };
        match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
            Ok(pidfd) => {
                if parent_of(entry.pid).is_some_and(|p| members.contains(&p))
                    && rustix::process::pidfd_send_signal(&pidfd, signal).is_ok()
                {
                    signalled += 1;
                }
            }
            // Kernels before 5.3: plain kill, checked the same way just before.
            Err(rustix::io::Errno::NOSYS) => {
                if parent_of(entry.pid).is_some_and(|p| members.contains(&p))
                    && rustix::process::kill_process(pid, signal).is_ok()
                {
                    signalled += 1;
                }
            }
            Err(_) => {}
        }
    }
    Ok(signalled)
}

/// Reaps every exited child of this process without waiting. Call it only once no one else
/// waits for a specific child any more (the task's own process has been waited for).
pub fn reap_exited_children() {
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            // Nothing exited yet, no children at all, or an error: nothing more to reap now.
            Ok(None) | Err(_) => return,
        }
    }
}

/// What is left after [`end_descendants`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub pids: Vec<i32>,
}

/// How often the tree is looked at while it is being ended.
const POLL: Duration = Duration::from_millis(20);
/// How long SIGKILL is repeated before giving up (a process in uninterruptible sleep may take
/// a while to die).
const KILL_PATIENCE: Duration = Duration::from_secs(10);

/// Ends every process below this one: SIGTERM, up to `grace` for them to go, then SIGKILL until
/// none is left; exited children are reaped on the way. `Ok` means the tree was seen empty.
pub async fn end_descendants(grace: Duration) -> Result<(), Leftovers> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let leftovers = |error: io::Error| {
        // Without a process table nothing can be confirmed.
        tracing::warn!(%error, "cannot read the process table");
        Leftovers { pids: vec![] }
    };
    reap_exited_children();
    if live_descendants(me).map_err(leftovers)?.is_empty() {
        return Ok(());
    }
    signal_tree(me, Signal::TERM).map_err(leftovers)?;
    let kill_at = Instant::now() + grace;
    loop {
        tokio::time::sleep(POLL).await;
        reap_exited_children();
        if live_descendants(me).map_err(leftovers)?.is_empty() {
            return Ok(());
        }
        if Instant::now() >= kill_at {
            break;
        }
    }
    let give_up_at = Instant::now() + KILL_PATIENCE;
    loop {
        signal_tree(me, Signal::KILL).map_err(leftovers)?;
        tokio::time::sleep(POLL).await;
        reap_exited_children();
        let left = live_descendants(me).map_err(leftovers)?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= give_up_at {
            return Err(Leftovers {
                pids: left.iter().map(|e| e.pid).collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(pid: i32, ppid: i32) -> ProcEntry {
        ProcEntry {
            pid,
            ppid,
            zombie: false,
        }
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(
            parse_stat("42 (sleep) S 7 42 7 0 -1 4194304 ..."),
            Some(entry(42, 7))
        );
        assert_eq!(
            parse_stat("43 (a) b) (c) Z 42 1 1"),
            Some(ProcEntry {
                pid: 43,
                ppid: 42,
                zombie: true
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_cover_grandchildren_but_not_siblings() {
        let table = [
            entry(1, 0),
            entry(10, 1),
            entry(11, 10),
            entry(12, 11),
            entry(13, 10),
            entry(20, 1),
            entry(21, 20),
        ];
        let mut below: Vec<i32> = descendants(&table, 10).iter().map(|e| e.pid).collect();
        below.sort();
        assert_eq!(below, [11, 12, 13]);
        assert!(descendants(&table, 12).is_empty());
    }

    #[test]
    fn this_process_sees_its_own_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        let below = live_descendants(me).expect("process table");
        let pid = child.id() as i32;
        let _ = child.kill();
        let _ = child.wait();
        assert!(below.iter().any(|e| e.pid == pid), "{pid} not in {below:?}");
    }

    proptest! {
        /// Whatever the table (cycles from pid reuse included), the walk ends, never reports the
        /// root, and reports each process once, each with its parent in the tree.
        #[test]
        fn the_walk_is_finite_and_closed(edges in proptest::collection::vec((1i32..40, 0i32..40), 0..60)) {
            let mut by_pid = HashMap::new();
            for (pid, ppid) in edges {
                by_pid.insert(pid, ppid);
            }
            let table: Vec<ProcEntry> = by_pid.iter().map(|(p, pp)| entry(*p, *pp)).collect();
            let found = descendants(&table, 1);
            let pids: HashSet<i32> = found.iter().map(|e| e.pid).collect();
            prop_assert_eq!(pids.len(), found.len());
            prop_assert!(!pids.contains(&1));
            for e in &found {
                prop_assert!(e.ppid == 1 || pids.contains(&e.ppid));
            }
        }
    }
}
