//! CPU time and memory of a process, from `/proc/<pid>/stat`, `/proc/<pid>/task/*/schedstat` and
//! `/proc/<pid>/status`.

use std::collections::BTreeMap;

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

/// The process's CPU time at one moment: in clock ticks (every thread, ended ones included) and
/// per live thread in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuReading {
    ticks_ms: f64,
    thread_ns: BTreeMap<u32, u64>,
}

/// Reads `pid`'s CPU time. A thread that ends while it is read is left out, as if it had ended
/// just before.
pub fn cpu_reading(pid: u32) -> Result<CpuReading, ProcError> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|source| ProcError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut thread_ns = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let path = format!("{dir}/{tid}/schedstat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        thread_ns.insert(tid, parse_run_ns(&text).ok_or(ProcError::Format(path))?);
    }
    Ok(CpuReading {
        ticks_ms: cpu_ms(pid)?,
        thread_ns,
    })
}

/// The first field of a `schedstat` line: time spent running, in nanoseconds.
pub fn parse_run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

impl CpuReading {
    /// CPU time from `before` to `self`, in milliseconds: to the nanosecond when every thread
    /// `before` saw is still there (new threads count from zero), otherwise in clock ticks (10 ms
    /// steps), which also count the threads that ended.
    pub fn ms_since(&self, before: &CpuReading) -> f64 {
        let mut ns = 0u64;
        for (tid, then) in &before.thread_ns {
            match self.thread_ns.get(tid) {
                Some(now) if now >= then => ns += now - then,
                _ => return self.ticks_ms - before.ticks_ms,
            }
        }
        ns += self
            .thread_ns
            .iter()
            .filter(|(tid, _)| !before.thread_ns.contains_key(tid))
            .map(|(_, now)| now)
            .sum::<u64>();
        ns as f64 / 1e6
    }
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

    fn reading(ticks_ms: f64, threads: &[(u32, u64)]) -> CpuReading {
        CpuReading {
            ticks_ms,
            thread_ns: threads.iter().copied().collect(),
        }
    }

    #[test]
    fn cpu_between_readings_counts_nanoseconds_while_every_thread_lives() {
        let before = reading(100.0, &[(1, 5_000_000), (2, 1_000_000)]);
        let after = reading(110.0, &[(1, 7_250_000), (2, 1_500_000), (3, 300_000)]);
        assert_eq!(after.ms_since(&before), 3.05);
    }

    #[test]
    fn cpu_between_readings_falls_back_to_ticks_when_a_thread_ended() {
        let before = reading(100.0, &[(1, 5_000_000), (2, 1_000_000)]);
        let after = reading(130.0, &[(1, 7_000_000)]);
        assert_eq!(after.ms_since(&before), 30.0);
        // A thread id reused by a new thread shows less run time than before.
        let reused = reading(120.0, &[(1, 7_000_000), (2, 10)]);
        assert_eq!(reused.ms_since(&before), 20.0);
    }

    #[test]
    fn schedstat_run_time() {
        assert_eq!(parse_run_ns("341568 3437316 2\n"), Some(341568));
        assert_eq!(parse_run_ns(""), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        // Spinning shows up as CPU time between readings (the wall-clock bound only stops a
        // test that would otherwise never end).
        let before = cpu_reading(pid).unwrap();
        let started = std::time::Instant::now();
        let mut spent = 0.0;
        while spent < 30.0 && started.elapsed() < std::time::Duration::from_secs(30) {
            std::hint::black_box(started.elapsed());
            spent = cpu_reading(pid).unwrap().ms_since(&before);
        }
        assert!(spent >= 30.0, "{spent} ms of CPU after 30 s of spinning");
        let pid = std::process::id();
        assert!(cpu_ms(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().peak_rss_kib > 0);
    }
}
