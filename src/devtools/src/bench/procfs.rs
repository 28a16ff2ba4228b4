//! CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/<pid>/stat` times: Linux reports them in USER_HZ, which is
/// 100 on every architecture it exposes to user space.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected format of {0}")]
    Format(String),
}

fn read(path: String) -> Result<String, ProcError> {
    std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
}

/// User plus system CPU time of `pid` so far, in milliseconds.
pub fn cpu_ms(pid: u32) -> Result<f64, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(path.clone())?;
    parse_cpu_ms(&text).ok_or(ProcError::Format(path))
}

/// utime and stime are fields 14 and 15; the command name (field 2) is in parentheses and may
/// hold spaces, so fields are counted after its closing parenthesis.
pub fn parse_cpu_ms(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 * 1000.0 / TICKS_PER_SECOND)
}

/// Resident memory now and at its peak, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory, ProcError> {
    let path = format!("/proc/{pid}/status");
    let text = read(path.clone())?;
    parse_memory(&text).ok_or(ProcError::Format(path))
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text.
pub fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        peak_rss_kib: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_from_stat_with_spaces_in_the_name() {
        let stat = "4242 (sandbox ctl) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 123 456 789";
        assert_eq!(parse_cpu_ms(stat), Some(3250.0));
        assert_eq!(parse_cpu_ms("garbage"), None);
    }

    #[test]
    fn memory_from_status() {
        let status =
            "Name:\tsandbox-control\nVmHWM:\t   81234 kB\nVmRSS:\t   65432 kB\nThreads:\t9\n";
        assert_eq!(
            parse_memory(status),
            Some(Memory {
                rss_kib: 65432,
                peak_rss_kib: 81234
            })
        );
        assert_eq!(parse_memory("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_ms(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().peak_rss_kib > 0);
    }
}
